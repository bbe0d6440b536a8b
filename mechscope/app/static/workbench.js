// The workbench page: three forms that ask the server for sections of widgets, a list of saved
// experiments, and a progress bar for patching jobs. Everything shown is built with createElement
// and textContent (token strings are untrusted), and the widgets are drawn by the viz bundle's
// mechscope.render, loaded from this server like this file.
(function () {
  "use strict";

  const POLL_MS = 300;
  const $ = (selector) => document.querySelector(selector);

  // ------------------------------------------------------------------ talking to the server

  class ApiError extends Error {}

  async function api(path, body) {
    const options = body === undefined ? {} : {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    };
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
    }
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
    item.tabIndex = 0;
    item.title = summary.title;
    item.appendChild(element("span", "wb-title", summary.title));
    item.appendChild(element("span", "wb-meta", `#${summary.id} · ${summary.kind} · ${describeTime(summary.created)}`));
    item.addEventListener("click", () => reopen(summary.id));
    item.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        reopen(summary.id);
      }
    });
    return item;
  }

  async function refreshList() {
    const summaries = await api("/api/experiments");
    $("#experiments").replaceChildren(...summaries.map(listItem));
    $("#experiments-empty").hidden = summaries.length > 0;
    markCurrent($("#results").dataset.experiment);
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
    showError("");
    try {
      const experiment = await api(`/api/experiments/${encodeURIComponent(id)}`);
      fillForm(experiment.kind, experiment.settings);
      showResults(experiment.id, experiment.sections);
      showStatus(`Experiment #${experiment.id} (${experiment.kind}, saved ${describeTime(experiment.created)}).`);
    } catch (error) {
      fail(error);
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

  async function run(form, path, body) {
    showError("");
    setBusy(true);
    showStatus("Running…");
    try {
      const reply = await api(path, body);
      showResults(reply.experiment, reply.sections);
      showStatus(`Saved as experiment #${reply.experiment}.`);
      await refreshList();
    } catch (error) {
      showStatus("");
      fail(error);
    } finally {
      setBusy(false);
    }
  }

  function onPrompt(event) {
    event.preventDefault();
    const form = event.currentTarget;
    run(form, "/api/prompt", read(form, ["prompt", "answer", "wrong"], ["answer", "wrong"]));
  }

  function onActivation(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const body = read(form, ["prompt", "hook", "index"], ["index"]);
    if (body.index !== undefined) {
      const index = Number(body.index);
      if (!Number.isInteger(index)) {
        showError(`index must be a whole number; got ${JSON.stringify(body.index)}`);
        return;
      }
      body.index = index;
    }
    run(form, "/api/activation", body);
  }

  // ------------------------------------------------------------------ patching jobs

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

  async function onPatching(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const body = read(form, ["clean", "corrupted", "answer", "wrong", "hook"], []);
    showError("");
    setBusy(true);
    showStatus("Checking the prompts…");
    try {
      const { job } = await api("/api/patching", body);
      showProgress("queued", 0);
      showStatus("Patching…");
      const done = await follow(job);
      showResults(done.experiment, done.sections);
      showStatus(`Saved as experiment #${done.experiment}.`);
      await refreshList();
    } catch (error) {
      showStatus("");
      fail(error);
    } finally {
      setBusy(false);
    }
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
  }

  async function start() {
    $("#prompt-form").addEventListener("submit", onPrompt);
    $("#activation-form").addEventListener("submit", onActivation);
    $("#patching-form").addEventListener("submit", onPatching);
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
