/* attention.js: a grid of heads beside the tokens; hovering a token shows what it attends to
 * and what attends to it in the selected head. */

const VIEW = 260;

/** Full n x n rows: a causal pattern (data.triangular) arrives with row q holding keys 0..q only. */
function fullPatterns(data) {
  const n = data.tokens.length;
  if (!data.triangular) {
    return data.patterns;
  }
  return data.patterns.map(function (layer) {
    return layer.map(function (head) {
      return head.map(function (row) { return row.concat(new Array(n - row.length).fill(0)); });
    });
  });
}

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
  const offset = data.first_position || 0; // the prompt position of tokens[0], when they are its last tokens
  const patterns = fullPatterns(data);
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

  /** The keys (at or before query i, with a weight) that i attends to most, for the tooltip. */
  function strongest(i) {
    const seen = matrix()[i]
      .map(function (w, k) { return { w: w, k: k }; })
      .filter(function (e) { return e.k <= i && Number.isFinite(e.w); });
    if (seen.length === 0) {
      return '  n/a';
    }
    return seen
      .sort(function (a, b) { return b.w - a.w; })
      .slice(0, 3)
      .map(function (e) { return '  #' + (e.k + offset) + ' ' + quoted(tokens[e.k]) + ': ' + e.w; })
      .join('\n');
  }

  function tokenText(i) {
    return headName() + ' \u00b7 #' + (i + offset) + ' ' + quoted(tokens[i]) + ' attends most to\n' + strongest(i);
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
    tip.show(headName() + '\nquery #' + (q + offset) + ' ' + quoted(tokens[q]) + ' \u2192 key #' + (k + offset) + ' ' +
      quoted(tokens[k]) + ': ' + num(matrix()[q][k]), event);
  });
  view.addEventListener('mouseleave', function () {
    clear();
    tip.hide();
  });

  select(0, 0);
}
