/* mount.js: the entry points, render(element, kind, data) and mount(key), and window.mechscope. */

const RENDERERS = {
  attention: renderAttention,
  tokens: renderTokens,
  heatmap: renderHeatmap,
  bars: renderBars,
  table: renderTable,
};

/** Draw a widget into element (replacing what it holds, such as the no-JavaScript sentence). */
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

/**
 * Draw every widget div (class mechscope-widget, data-ms=key) not drawn yet, each from the JSON
 * script element right after it. Ids are not used: JupyterLab may show one output twice, and
 * then the same fragment (and id) is on the page twice.
 */
function mount(key) {
  const selector = '.mechscope-widget[data-ms="' + CSS.escape(String(key)) + '"]';
  const elements = Array.from(document.querySelectorAll(selector));
  if (elements.length === 0) {
    throw new Error('mechscope: no widget ' + JSON.stringify(key) + ' in this page');
  }
  return elements.filter(function (element) { return !element.hasAttribute('data-mounted'); }).map(draw);
}

function draw(element) {
  element.setAttribute('data-mounted', '');
  const source = element.nextElementSibling;
  if (!source || source.tagName !== 'SCRIPT' || source.type !== 'application/json') {
    throw new Error('mechscope: a widget needs its data (a JSON script element) right after it');
  }
  const spec = JSON.parse(source.textContent);
  return render(element, spec.kind, spec.data);
}

window.mechscope = Object.freeze({ render: render, mount: mount, version: 2 });
