/* mechscope widgets: attention patterns, coloured tokens, heatmaps, bars and tables.
 *
 * No dependencies and no network. Every widget is drawn from JSON data with createElement and
 * textContent only: token strings are untrusted and never parsed as HTML.
 *
 *   mechscope.mount(id)                  draws the widget whose data is in <script id="{id}-data">
 *   mechscope.render(element, kind, data) draws into element; returns the widget's root
 *
 * Loading this file twice (two widgets in one notebook) keeps the first definition.
 */
(function () {
  'use strict';

  if (window.mechscope && typeof window.mechscope.render === 'function') {
    return;
  }

  // ---------------------------------------------------------------- DOM and text

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = text;
    }
    return node;
  }

  /** A token as shown: whitespace kept (CSS white-space: pre), newlines and tabs made visible. */
  function shown(token) {
    return String(token).replace(/\r?\n/g, '\u23ce').replace(/\t/g, '\u21e5');
  }

  /** A token quoted, so that leading spaces are visible in a tooltip. */
  function quoted(token) {
    return '\u201c' + shown(token) + '\u201d';
  }

  function num(value) {
    return value === null || value === undefined ? 'n/a' : String(value);
  }

  function attr(value) {
    return value === null || value === undefined ? 'NaN' : String(value);
  }

  // ---------------------------------------------------------------- colours

  const WHITE = [255, 255, 255];
  const BLUE = [33, 102, 172];
  const RED = [178, 24, 43];
  const ORANGE = [230, 97, 1];
  const NAVY = [8, 48, 107];

  function clamp01(t) {
    return Number.isFinite(t) ? Math.min(1, Math.max(0, t)) : 0;
  }

  function mix(from, to, t) {
    const s = clamp01(t);
    return from.map(function (a, i) { return Math.round(a + (to[i] - a) * s); });
  }

  /** The colour of value on a scale: "sequential" white to blue, "diverging" blue-white-red. */
  function colourOf(value, scale, zmin, zmax) {
    if (value === null || value === undefined) {
      return null;
    }
    if (scale !== 'diverging') {
      return mix(WHITE, BLUE, (value - zmin) / (zmax - zmin));
    }
    const centre = zmin < 0 && zmax > 0 ? 0 : (zmin + zmax) / 2;
    return value >= centre
      ? mix(WHITE, RED, (value - centre) / (zmax - centre))
      : mix(WHITE, BLUE, (centre - value) / (centre - zmin));
  }

  function css(rgb) {
    return 'rgb(' + rgb[0] + ', ' + rgb[1] + ', ' + rgb[2] + ')';
  }

  /** Dark text on light backgrounds, white on dark ones. */
  function ink(rgb) {
    const luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255;
    return luminance < 0.55 ? '#ffffff' : '#1a1a1a';
  }

  function paint(node, rgb) {
    node.style.background = rgb ? css(rgb) : '';
    node.style.color = rgb ? ink(rgb) : '';
  }

  /** A colour bar with the value label and both ends of the range written out. */
  function legend(label, scale, zmin, zmax) {
    const box = el('div', 'ms-legend');
    const bar = el('span', 'ms-legend-bar');
    const stops = [0, 0.25, 0.5, 0.75, 1].map(function (t) {
      return css(colourOf(zmin + t * (zmax - zmin), scale, zmin, zmax));
    });
    bar.style.background = 'linear-gradient(to right, ' + stops.join(', ') + ')';
    box.append(el('span', 'ms-legend-label', label), el('span', 'ms-legend-min', num(zmin)), bar,
      el('span', 'ms-legend-max', num(zmax)));
    return box;
  }

  // ---------------------------------------------------------------- tooltip

  /** One tooltip per widget; it follows the mouse and stays inside the window. */
  function tooltip(root) {
    const tip = el('div', 'ms-tooltip');
    tip.hidden = true;
    root.appendChild(tip);
    return {
      show: function (text, event) {
        tip.textContent = text;
        tip.hidden = false;
        this.move(event);
      },
      move: function (event) {
        if (tip.hidden || !event) {
          return;
        }
        const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
        const y = event.clientY + 16 + tip.offsetHeight > window.innerHeight
          ? event.clientY - tip.offsetHeight - 8 : event.clientY + 16;
        tip.style.left = Math.max(0, x) + 'px';
        tip.style.top = Math.max(0, y) + 'px';
      },
      hide: function () {
        tip.hidden = true;
      },
    };
  }

  // ---------------------------------------------------------------- attention

  const VIEW = 260;

  /** Thumbnails shrink as heads multiply, so that a layer's row stays on a page. */
  function thumbSize(heads) {
    return heads <= 4 ? 72 : heads <= 8 ? 60 : 44;
  }

  /** One head's pattern as an n x n bitmap, one pixel per (query, key). */
  function patternBitmap(matrix) {
    const n = matrix.length;
    const canvas = document.createElement('canvas');
    canvas.width = n;
    canvas.height = n;
    const context = canvas.getContext('2d');
    const image = context.createImageData(n, n);
    for (let q = 0; q < n; q += 1) {
      for (let k = 0; k < n; k += 1) {
        const rgb = colourOf(matrix[q][k] === null ? 0 : matrix[q][k], 'sequential', 0, 1);
        const at = 4 * (q * n + k);
        image.data[at] = rgb[0];
        image.data[at + 1] = rgb[1];
        image.data[at + 2] = rgb[2];
        image.data[at + 3] = 255;
      }
    }
    context.putImageData(image, 0, 0);
    return canvas;
  }

  /** A canvas of whole pixels per cell, shown at about size CSS pixels. */
  function patternCanvas(n, size) {
    const canvas = el('canvas');
    canvas.width = n * Math.max(1, Math.ceil(size / n));
    canvas.height = canvas.width;
    canvas.style.width = size + 'px';
    canvas.style.height = size + 'px';
    return canvas;
  }

  /** Draw a head; with focus, outline query row focus and key column focus. */
  function drawHead(canvas, bitmap, focus) {
    const context = canvas.getContext('2d');
    context.imageSmoothingEnabled = false;
    context.clearRect(0, 0, canvas.width, canvas.height);
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    if (focus === null) {
      return;
    }
    const cell = canvas.width / bitmap.width;
    context.lineWidth = Math.max(1, Math.min(cell / 3, 3));
    context.strokeStyle = css(NAVY);  // the row: what the focus token attends to
    context.strokeRect(0, focus * cell, canvas.width, cell);
    context.strokeStyle = css(ORANGE);  // the column: what attends to the focus token
    context.strokeRect(focus * cell, 0, cell, canvas.height);
  }

  function renderAttention(root, data) {
    const tokens = data.tokens;
    const patterns = data.patterns;
    const state = { layer: 0, head: 0, focus: null };
    const tip = tooltip(root);

    const layout = el('div', 'ms-attention');
    const left = el('div', 'ms-attention-main');
    const right = el('div', 'ms-attention-side');
    left.appendChild(el('div', 'ms-hint',
      'Hover a token: blue marks the tokens it attends to, orange the tokens that attend to it. ' +
      'Click a head to select it.'));

    const text = el('div', 'ms-tokens');
    const spans = tokens.map(function (token, i) {
      const span = el('span', 'ms-token', shown(token));
      span.dataset.index = String(i);
      text.appendChild(span);
      return span;
    });
    left.appendChild(text);

    const caption = el('div', 'ms-view-caption');
    const view = patternCanvas(tokens.length, VIEW);
    view.className = 'ms-head-view';
    left.append(caption, view);

    const bitmaps = patterns.map(function (layer) { return layer.map(patternBitmap); });
    const thumbs = [];
    patterns.forEach(function (layer, l) {
      const row = el('div', 'ms-head-row');
      layer.forEach(function (_, h) {
        const name = 'L' + data.layers[l] + 'H' + h;
        const button = el('button', 'ms-head');
        button.type = 'button';
        button.dataset.layer = String(data.layers[l]);
        button.dataset.head = String(h);
        button.title = 'Select head ' + name;
        const canvas = patternCanvas(tokens.length, thumbSize(data.heads));
        button.append(canvas, el('span', 'ms-head-label', name));
        button.addEventListener('click', function () { select(l, h); });
        row.appendChild(button);
        thumbs.push({ button: button, canvas: canvas, bitmap: bitmaps[l][h], l: l, h: h });
      });
      right.appendChild(row);
    });
    layout.append(left, right);
    root.appendChild(layout);

    function matrix() {
      return patterns[state.layer][state.head];
    }

    function headName() {
      return 'L' + data.layers[state.layer] + 'H' + state.head;
    }

    function redraw() {
      thumbs.forEach(function (t) { drawHead(t.canvas, t.bitmap, state.focus); });
      drawHead(view, bitmaps[state.layer][state.head], state.focus);
    }

    function select(l, h) {
      state.layer = l;
      state.head = h;
      thumbs.forEach(function (t) { t.button.classList.toggle('ms-selected', t.l === l && t.h === h); });
      caption.textContent = headName() + ' \u00b7 rows: queries, columns: keys';
      if (state.focus === null) {
        redraw();
      } else {
        focus(state.focus);
      }
    }

    function unmark() {
      spans.forEach(function (span) {
        span.classList.remove('ms-focus', 'ms-attends-to', 'ms-attended-by');
        delete span.dataset.weight;
        paint(span, null);
      });
    }

    function clear() {
      state.focus = null;
      unmark();
      redraw();
    }

    /** Colour every other token by how much token i attends to it (j < i) or it attends to i (j > i). */
    function focus(i) {
      unmark();
      state.focus = i;
      const m = matrix();
      spans.forEach(function (span, j) {
        if (j === i) {
          span.classList.add('ms-focus');
          return;
        }
        const weight = j < i ? m[i][j] : m[j][i];
        span.classList.add(j < i ? 'ms-attends-to' : 'ms-attended-by');
        span.dataset.weight = attr(weight);
        paint(span, mix(WHITE, j < i ? BLUE : ORANGE, weight === null ? 0 : weight));
      });
      redraw();
    }

    /** The keys query i attends to most, for the tooltip. */
    function strongest(i) {
      return matrix()[i]
        .map(function (w, k) { return { w: w === null ? 0 : w, k: k }; })
        .sort(function (a, b) { return b.w - a.w; })
        .slice(0, 3)
        .map(function (e) { return '  #' + e.k + ' ' + quoted(tokens[e.k]) + ': ' + e.w; })
        .join('\n');
    }

    function tokenText(i) {
      return headName() + ' \u00b7 #' + i + ' ' + quoted(tokens[i]) + ' attends most to\n' + strongest(i);
    }

    text.addEventListener('mouseover', function (event) {
      const span = event.target.closest('.ms-token');
      if (span && Number(span.dataset.index) !== state.focus) {
        focus(Number(span.dataset.index));
        tip.show(tokenText(state.focus), event);
      }
    });
    text.addEventListener('mousemove', function (event) { tip.move(event); });
    text.addEventListener('mouseleave', function () {
      clear();
      tip.hide();
    });

    view.addEventListener('mousemove', function (event) {
      const n = tokens.length;
      const rect = view.getBoundingClientRect();
      const q = Math.min(n - 1, Math.floor((event.clientY - rect.top) / rect.height * n));
      const k = Math.min(n - 1, Math.floor((event.clientX - rect.left) / rect.width * n));
      if (q !== state.focus) {
        focus(q);
      }
      tip.show(headName() + '\nquery #' + q + ' ' + quoted(tokens[q]) + ' \u2192 key #' + k + ' ' +
        quoted(tokens[k]) + ': ' + num(matrix()[q][k]), event);
    });
    view.addEventListener('mouseleave', function () {
      clear();
      tip.hide();
    });

    select(0, 0);
  }

  // ---------------------------------------------------------------- coloured tokens

  function renderTokens(root, data) {
    const tip = tooltip(root);
    root.appendChild(legend(data.label, data.scale, data.zmin, data.zmax));
    const text = el('div', 'ms-tokens');
    data.tokens.forEach(function (token, i) {
      const span = el('span', 'ms-token', shown(token));
      span.dataset.index = String(i);
      span.dataset.value = attr(data.values[i]);
      paint(span, colourOf(data.values[i], data.scale, data.zmin, data.zmax));
      text.appendChild(span);
    });
    text.addEventListener('mouseover', function (event) {
      const span = event.target.closest('.ms-token');
      if (span) {
        const i = Number(span.dataset.index);
        tip.show('#' + i + ' ' + quoted(data.tokens[i]) + ' \u00b7 ' + data.label + ': ' + num(data.values[i]), event);
      }
    });
    text.addEventListener('mousemove', function (event) { tip.move(event); });
    text.addEventListener('mouseleave', function () { tip.hide(); });
    root.appendChild(text);
  }

  // ---------------------------------------------------------------- heatmap

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

  // ---------------------------------------------------------------- bars

  function renderBars(root, data) {
    const tip = tooltip(root);
    const extent = data.values.reduce(function (m, v) { return Math.max(m, Math.abs(v || 0)); }, 0) || 1;
    const list = el('div', 'ms-bars');
    data.labels.forEach(function (label, i) {
      const value = data.values[i];
      const row = el('div', 'ms-bar-row');
      const track = el('div', 'ms-bar-track');
      const bar = el('div', 'ms-bar ' + ((value || 0) >= 0 ? 'ms-positive' : 'ms-negative'));
      bar.dataset.label = label;
      bar.dataset.value = attr(value);
      bar.style.width = (50 * Math.abs(value || 0) / extent) + '%';
      track.appendChild(bar);
      const name = el('span', 'ms-bar-label', shown(label));
      name.title = label;
      row.append(name, track, el('span', 'ms-bar-value', num(value)));
      row.addEventListener('mouseenter', function (event) {
        tip.show(shown(label) + ': ' + num(value) + ' ' + data.value_label, event);
      });
      row.addEventListener('mousemove', function (event) { tip.move(event); });
      row.addEventListener('mouseleave', function () { tip.hide(); });
      list.appendChild(row);
    });
    root.appendChild(list);
    const footer = el('div', 'ms-bar-footer', data.value_label);
    if (data.total !== null && data.total !== undefined) {
      footer.appendChild(el('span', 'ms-total', 'total: ' + num(data.total)));
    }
    root.appendChild(footer);
  }

  // ---------------------------------------------------------------- table

  function tableCell(value) {
    const td = el('td');
    if (value !== null && typeof value === 'object') {
      td.className = 'ms-prediction';
      td.dataset.value = attr(value.value);
      td.title = value.text + ': ' + num(value.value);
      td.append(el('span', 'ms-prediction-text', shown(value.text)),
        el('span', 'ms-prediction-value', value.value === null ? 'n/a' : (100 * value.value).toFixed(1) + '%'));
      paint(td, colourOf(value.value, 'sequential', 0, 1));
    } else {
      td.textContent = shown(num(value));
    }
    return td;
  }

  function renderTable(root, data) {
    const table = el('table', 'ms-table');
    const head = el('thead');
    const header = el('tr');
    data.columns.forEach(function (name) { header.appendChild(el('th', null, name)); });
    head.appendChild(header);
    const body = el('tbody');
    data.rows.forEach(function (row) {
      const tr = el('tr');
      row.forEach(function (value) { tr.appendChild(tableCell(value)); });
      body.appendChild(tr);
    });
    table.append(head, body);
    const scroll = el('div', 'ms-scroll');
    scroll.appendChild(table);
    root.appendChild(scroll);
  }

  // ---------------------------------------------------------------- entry points

  const RENDERERS = {
    attention: renderAttention,
    tokens: renderTokens,
    heatmap: renderHeatmap,
    bars: renderBars,
    table: renderTable,
  };

  function render(element, kind, data) {
    if (!Object.prototype.hasOwnProperty.call(RENDERERS, kind)) {
      throw new Error('mechscope: unknown widget kind ' + JSON.stringify(kind));
    }
    const root = el('div', 'ms-widget');
    root.dataset.kind = kind;
    if (data.title) {
      root.appendChild(el('div', 'ms-title', data.title));
    }
    element.textContent = '';
    element.appendChild(root);
    try {
      RENDERERS[kind](root, data);
    } catch (error) {
      root.appendChild(el('div', 'ms-error', 'mechscope could not draw this widget: ' + error.message));
      throw error;
    }
    return root;
  }

  function mount(id) {
    const element = document.getElementById(id);
    const source = document.getElementById(id + '-data');
    if (!element || !source) {
      throw new Error('mechscope: no widget ' + JSON.stringify(id) + ' in this page');
    }
    const spec = JSON.parse(source.textContent);
    return render(element, spec.kind, spec.data);
  }

  window.mechscope = Object.freeze({ render: render, mount: mount, version: 1 });
}());
