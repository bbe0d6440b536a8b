/* heatmap.js: a labelled grid of coloured cells (any [row, col] values, such as the logit lens),
 * the value and any text or top-k in a tooltip. */

const PAGE_WIDTH = 1200;
const LABEL_WIDTH = 130;
const MIN_CELL = 14;

/** Cells share the width of the page, shrinking to MIN_CELL; beyond that the widget scrolls. */
function cellWidth(root, columns, hasText) {
  const width = Math.min(root.clientWidth || PAGE_WIDTH, PAGE_WIDTH) - LABEL_WIDTH;
  const widest = hasText ? 84 : 48;
  return Math.max(MIN_CELL, Math.min(widest, Math.floor(width / Math.max(1, columns))));
}

function renderHeatmap(root, data) {
  const rows = data.rows;
  const cols = data.cols;
  const tip = tooltip(root);
  const width = cellWidth(root, cols.length, data.text !== null);
  const height = data.text !== null ? 22 : Math.min(Math.max(width, MIN_CELL), 26);
  const vertical = width < 44;

  const grid = el('div', 'ms-grid');
  grid.style.gridTemplateColumns = 'max-content repeat(' + cols.length + ', ' + width + 'px)';
  grid.style.gridTemplateRows = 'auto repeat(' + rows.length + ', ' + height + 'px)';
  const corner = el('div', 'ms-corner', data.y_label);
  grid.appendChild(corner);
  const colLabels = cols.map(function (col, c) {
    const label = el('div', 'ms-col-label' + (vertical ? ' ms-vertical' : ''), shown(col));
    label.title = col;
    label.dataset.col = String(c);
    grid.appendChild(label);
    return label;
  });
  const rowLabels = rows.map(function (row, r) {
    const label = el('div', 'ms-row-label', shown(row));
    label.title = row;
    label.dataset.row = String(r);
    grid.appendChild(label);
    data.values[r].forEach(function (value, c) {
      const cell = el('div', 'ms-cell', data.text !== null ? shown(data.text[r][c]) : null);
      cell.dataset.row = String(r);
      cell.dataset.col = String(c);
      cell.dataset.value = attr(value);
      const rgb = colourOf(value, data.scale, data.zmin, data.zmax);
      if (rgb) {
        paint(cell, rgb);
      } else {
        cell.classList.add('ms-missing');
      }
      grid.appendChild(cell);
    });
    return label;
  });

  const scroll = el('div', 'ms-scroll');
  scroll.appendChild(grid);
  root.appendChild(scroll);
  if (data.x_label) {
    root.appendChild(el('div', 'ms-axis-label', data.x_label));
  }
  root.appendChild(legend(data.value_label, data.scale, data.zmin, data.zmax));

  let active = null;
  function mark(on) {
    if (active) {
      rowLabels[active[0]].classList.toggle('ms-active', on);
      colLabels[active[1]].classList.toggle('ms-active', on);
    }
  }

  function cellText(r, c) {
    const lines = [shown(rows[r]) + ' \u00b7 ' + shown(cols[c]) + ': ' + num(data.values[r][c])];
    if (data.text !== null && data.text[r][c] !== '') {
      lines.push(quoted(data.text[r][c]));
    }
    if (data.hover && data.hover[r][c]) {
      lines.push(data.hover[r][c]);
    }
    return lines.join('\n');
  }

  grid.addEventListener('mousemove', function (event) {
    const cell = event.target.closest('.ms-cell');
    if (!cell) {
      mark(false);
      active = null;
      tip.hide();
      return;
    }
    const r = Number(cell.dataset.row);
    const c = Number(cell.dataset.col);
    if (!active || active[0] !== r || active[1] !== c) {
      mark(false);
      active = [r, c];
      mark(true);
      tip.show(cellText(r, c), event);
    }
    tip.move(event);
  });
  grid.addEventListener('mouseleave', function () {
    mark(false);
    active = null;
    tip.hide();
  });
}
