/* others.js: coloured tokens, attribution bars and the top-k table. */

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
