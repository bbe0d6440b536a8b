// The workbench page: forms that ask the server for sections of widgets (prompt, activation,
// patching, and an SAE feature when the server has an SAE), a list of saved experiments, and a
// progress bar for patching jobs. Everything shown is built with createElement
// and textContent (token strings are untrusted), and the widgets are drawn by the viz bundle's
// mechscope.render, loaded from this server like this file.
(function () {
  "use strict";

  const POLL_MS = 300;
  const PAGE_SIZE = 50;
  const $ = (selector) => document.querySelector(selector);

  // Bumped each time the user asks to see something (a run, a reopen): an answer that arrives
  // after a newer request began only reports itself, and never replaces what is on screen.
  let view = 0;

  // ------------------------------------------------------------------ talking to the server

  class ApiError extends Error {}

  async function api(path, body, method) {
    const options = { method: method || (body === undefined ? "GET" : "POST") };
    if (body !== undefined) {
      options.headers = { "Content-Type": "application/json" };
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (error) {
      throw new ApiError("The server did not answer: is `mechscope serve` still running?");
    }
    let reply = null;
    try {
      reply = await response.json();
    } catch (error) {
      reply = null;
    }
    if (!response.ok) {
      const message = reply && typeof reply.error === "string" ? reply.error : `request failed (${response.status})`;
      throw new ApiError(message);
    }
    return reply;
  }

  // ------------------------------------------------------------------ messages

  function showError(message) {
    const box = $("#error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function showStatus(message) {
    $("#status").textContent = message || "";
  }

  function fail(error) {
    if (!(error instanceof ApiError)) console.error(error);
    showError(error instanceof ApiError ? error.message : "Something went wrong in the page; see the browser console.");
  }

  function setBusy(busy) {
    document.body.toggleAttribute("data-busy", busy);
    for (const button of document.querySelectorAll(".wb-form button[type=submit]")) button.disabled = busy;
  }

  // ------------------------------------------------------------------ results

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function renderWidget(host, widget) {
    if (!window.mechscope || typeof window.mechscope.render !== "function") {
      host.appendChild(element("p", "wb-widget-error", "The widget bundle (mechscope.js) did not load."));
      return;
    }
    try {
      window.mechscope.render(host, widget.kind, widget.data);
    } catch (error) {
      console.error(error);
      host.appendChild(element("p", "wb-widget-error", `This ${widget.kind} widget could not be drawn.`));
      return;
    }
    markFocus(host, widget);
  }

  // An SAE example names the token it is about (``focus``): outline it among its neighbours.
  function markFocus(host, widget) {
    const focus = widget.data && widget.data.focus;
    if (widget.kind !== "tokens" || !Number.isInteger(focus)) return;
    const token = host.querySelector(`.ms-token[data-index="${focus}"]`);
    if (token) token.classList.add("wb-example-focus");
  }

  function renderSection(section) {
    const node = element("section", "ms-section");
    node.dataset.id = section.id;
    node.appendChild(element("h2", null, section.title));
    if (section.description) node.appendChild(element("p", "ms-description", section.description));
    if (Array.isArray(section.facts) && section.facts.length) {
      const facts = element("ul", "ms-facts");
      for (const fact of section.facts) facts.appendChild(element("li", null, fact));
      node.appendChild(facts);
    }
    for (const widget of section.widgets || []) {
      const host = element("div", "wb-widget");
      node.appendChild(host);
      renderWidget(host, widget);
    }
    return node;
  }

  function showResults(experiment, sections) {
    const results = $("#results");
    results.replaceChildren(...sections.map(renderSection));
    results.dataset.experiment = String(experiment);
    markCurrent(experiment);
  }

  // ------------------------------------------------------------------ the experiment list

  function describeTime(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
  }

  function markCurrent(id) {
    for (const item of document.querySelectorAll("#experiments li[data-id]")) {
      const current = item.dataset.id === String(id);
      item.classList.toggle("wb-current", current);
      if (current) item.setAttribute("aria-current", "true");
      else item.removeAttribute("aria-current");
    }
  }

  function listItem(summary) {
    const item = element("li");
    item.dataset.id = String(summary.id);
    item.dataset.kind = summary.kind;
    const open = element("button", "wb-open");
    open.type = "button";
    open.title = summary.title;
    open.appendChild(element("span", "wb-title", summary.title));
    const meta = `#${summary.id} · ${summary.kind} · ${summary.model} · ${describeTime(summary.created)}`;
    open.appendChild(element("span", "wb-meta", meta));
    open.addEventListener("click", () => reopen(summary.id));
    const remove = element("button", "wb-delete", "×");
    remove.type = "button";
    remove.title = `Delete experiment #${summary.id}`;
    remove.setAttribute("aria-label", remove.title);
    remove.addEventListener("click", () => removeExperiment(summary.id));
    item.append(open, remove);
    return item;
  }

  function listed(summaries) {
    $("#experiments-more").hidden = summaries.length < PAGE_SIZE;
    $("#experiments-empty").hidden = $("#experiments").children.length > 0;
    markCurrent($("#results").dataset.experiment);
  }

  async function refreshList() {
    const summaries = await api(`/api/experiments?limit=${PAGE_SIZE}`);
    $("#experiments").replaceChildren(...summaries.map(listItem));
    listed(summaries);
  }

  async function showOlder() {
    const last = $("#experiments li:last-child");
    if (!last) return refreshList();
    const page = await api(`/api/experiments?limit=${PAGE_SIZE}&before=${encodeURIComponent(last.dataset.id)}`);
    $("#experiments").append(...page.map(listItem));
    listed(page);
  }

  async function removeExperiment(id) {
    showError("");
    const items = [...document.querySelectorAll("#experiments li")];
    const place = items.findIndex((item) => item.dataset.id === String(id));
    try {
      await api(`/api/experiments/${encodeURIComponent(id)}`, undefined, "DELETE");
      const results = $("#results");
      if (results.dataset.experiment === String(id)) {
        results.replaceChildren();
        delete results.dataset.experiment;
      }
      showStatus(`Deleted experiment #${id}.`);
      await refreshList();
      // keep the keyboard where it was: on the item that took the deleted one's place
      const buttons = document.querySelectorAll("#experiments .wb-open");
      if (buttons.length) buttons[Math.min(Math.max(place, 0), buttons.length - 1)].focus();
    } catch (error) {
      fail(error);
    }
  }

  function fillForm(kind, settings) {
    const form = $(`#${kind}-form`);
    if (!form || !settings) return;
    for (const [name, value] of Object.entries(settings)) {
      const field = form.elements.namedItem(name);
      if (field && "value" in field) field.value = value === null || value === undefined ? "" : String(value);
    }
  }

  async function reopen(id) {
    const ticket = ++view;
    showError("");
    try {
      const experiment = await api(`/api/experiments/${encodeURIComponent(id)}`);
      if (ticket !== view) return; // the user has asked for something newer meanwhile
      fillForm(experiment.kind, experiment.settings);
      if (!["queued", "running"].includes($("#progress").dataset.state)) hideProgress(); // an old run's bar
      showResults(experiment.id, experiment.sections);
      const saved = describeTime(experiment.created);
      showStatus(`Experiment #${experiment.id} (${experiment.kind} on ${experiment.model}, saved ${saved}).`);
    } catch (error) {
      if (ticket === view) fail(error);
    }
  }

  // ------------------------------------------------------------------ the forms

  function read(form, names, optional) {
    const body = {};
    for (const name of names) {
      const value = form.elements.namedItem(name).value;
      if (optional.includes(name) && value.trim() === "") continue;
      body[name] = value;
    }
    return body;
  }

  // One run from a form: the page is busy until it ends, its error is shown, and its saved
  // result is shown unless the user opened something else while it ran.
  async function attempt(what, status, work) {
    const ticket = ++view;
    showError("");
    hideProgress();
    setBusy(true);
    showStatus(status);
    try {
      const reply = await work(ticket);
      if (ticket === view) {
        showResults(reply.experiment, reply.sections);
        showStatus(`Saved as experiment #${reply.experiment}.`);
      } else {
        showStatus(`${what} finished: experiment #${reply.experiment}`);
      }
      await refreshList();
    } catch (error) {
      if (ticket === view) showStatus("");
      fail(error);
    } finally {
      setBusy(false);
    }
  }

  function run(what, path, body) {
    return attempt(what, "Running…", () => api(path, body));
  }

  function onPrompt(event) {
    event.preventDefault();
    const form = event.currentTarget;
    run("prompt", "/api/prompt", read(form, ["prompt", "answer", "wrong"], ["answer", "wrong"]));
  }

  class InputError extends Error {}

  // The number fields of ``body`` as integers; an InputError naming the field for anything else.
  function wholeNumbers(form, body, names) {
    for (const name of names) {
      if (form.elements.namedItem(name).validity.badInput) {
        throw new InputError(`${name} must be a whole number`); // the browser hides what was typed: value is ""
      }
      if (body[name] === undefined) continue;
      const number = Number(body[name]);
      if (body[name].trim() === "" || !Number.isInteger(number)) {
        throw new InputError(`${name} must be a whole number; got ${JSON.stringify(body[name])}`);
      }
      body[name] = number;
    }
    return body;
  }

  function runNumbers(what, path, form, body, names) {
    try {
      wholeNumbers(form, body, names);
    } catch (error) {
      if (!(error instanceof InputError)) throw error;
      showStatus("");
      showError(error.message);
      return;
    }
    run(what, path, body);
  }

  function onActivation(event) {
    event.preventDefault();
    const form = event.currentTarget;
    runNumbers("activation", "/api/activation", form, read(form, ["prompt", "hook", "index"], ["index"]), ["index"]);
  }

  function onFeature(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const body = read(form, ["feature", "sequences"], ["sequences"]);
    runNumbers("feature", "/api/feature", form, body, ["feature", "sequences"]);
  }

  // ------------------------------------------------------------------ patching jobs

  function hideProgress() {
    const bar = $("#progress");
    bar.hidden = true;
    delete bar.dataset.state;
    bar.setAttribute("aria-valuenow", "0");
    bar.querySelector(".wb-progress-bar").style.width = "0%";
    bar.querySelector(".wb-progress-text").textContent = "";
  }

  function showProgress(state, fraction) {
    const bar = $("#progress");
    const percent = Math.round(Math.min(Math.max(fraction, 0), 1) * 100);
    bar.hidden = false;
    bar.dataset.state = state;
    bar.setAttribute("aria-valuenow", String(percent));
    bar.querySelector(".wb-progress-bar").style.width = `${percent}%`;
    bar.querySelector(".wb-progress-text").textContent = `${state} · ${percent}%`;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function follow(job) {
    for (;;) {
      const status = await api(`/api/jobs/${encodeURIComponent(job)}`);
      showProgress(status.state, status.progress);
      if (status.state === "done") return status;
      if (status.state === "failed") throw new ApiError(status.error || "the patching job failed");
      await sleep(POLL_MS);
    }
  }

  function onPatching(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const body = read(form, ["clean", "corrupted", "answer", "wrong", "hook"], []);
    attempt("patching", "Checking the prompts…", async (ticket) => {
      const { job } = await api("/api/patching", body);
      showProgress("queued", 0);
      if (ticket === view) showStatus("Patching…");
      return follow(job);
    });
  }

  // ------------------------------------------------------------------ start

  function describeModel(model) {
    $("#model-info").textContent =
      `${model.name}: ${model.n_layers} layers × ${model.n_heads} heads, d_model ${model.d_model}, ` +
      `prompts up to ${model.max_tokens} tokens`;
    const select = $("#patching-form").elements.namedItem("hook");
    select.replaceChildren(...model.hooks.map((hook) => {
      const option = element("option", null, hook);
      option.value = hook;
      return option;
    }));
    $("#hook-points").replaceChildren(...model.hook_points.map((name) => {
      const option = element("option");
      option.value = name;
      return option;
    }));
    const hook = $("#activation-form").elements.namedItem("hook");
    if (!hook.value && model.hook_points.length) {
      hook.placeholder = model.hook_points.find((name) => name.endsWith("mlp.hook_post")) || model.hook_points[0];
    }
    describeSae(model.sae);
  }

  // The feature form is there only when the server has an SAE (``mechscope serve --sae DIR``).
  function describeSae(sae) {
    const form = $("#feature-form");
    form.hidden = !sae;
    if (!sae) return;
    $("#sae-info").textContent = `This SAE: ${sae.architecture}, ${sae.d_sae} features on ${sae.hook_name}.`;
    const feature = form.elements.namedItem("feature");
    feature.max = String(sae.d_sae - 1);
    feature.placeholder = `0 – ${sae.d_sae - 1}`;
  }

  async function start() {
    $("#prompt-form").addEventListener("submit", onPrompt);
    $("#activation-form").addEventListener("submit", onActivation);
    $("#patching-form").addEventListener("submit", onPatching);
    $("#feature-form").addEventListener("submit", onFeature);
    $("#experiments-more").addEventListener("click", () => showOlder().catch(fail));
    try {
      describeModel(await api("/api/model"));
      await refreshList();
      document.body.dataset.ready = "true";
    } catch (error) {
      fail(error);
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
