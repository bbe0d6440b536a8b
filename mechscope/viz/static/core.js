/* core.js: helpers every renderer shares (DOM and text, colours, the legend, the tooltip).
 *
 * mechscope.js is the files of mechscope.viz.html.JS_FILES (core, attention, heatmap, others,
 * mount) concatenated in that order inside one function (mechscope.viz.html.bundle_js), so
 * their names stay private. No dependencies and no network. Every widget is drawn from JSON
 * with createElement and textContent only: token strings are untrusted and never parsed as HTML.
 */

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
