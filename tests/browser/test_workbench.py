"""The workbench in a real headless Chromium: ``mechscope serve`` started as a user starts it
(a separate process on a free local port), driven through its page."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mechscope.app.store import ExperimentStore
from mechscope.loading.tiny import tiny_gpt2, train_tokenizer
from mechscope.sae import SAEConfig, build_sae
from mechscope.toys.language import grammar
from mechscope.toys.language.evaluation import abc_prompts
from mechscope.toys.zoo import load

XSS = "<img src=x onerror=alert(1)>"
TIMEOUT_MS = 60_000
PAGE_SIZE = 50  # workbench.js lists this many experiments at a time
SEEDED = 60  # experiments saved before the seeded server starts: more than one page
SAE_HOOK = "blocks.0.hook_resid_post"
D_SAE = 16
FEATURE = 3  # its encoder bias is raised far above the rest, so it fires on every token


# `mechscope serve MODEL --sae DIR`, through the function the command calls
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model: str, db: Path, sae: Path | None = None) -> Iterator[str]:
    """``mechscope serve MODEL [--sae DIR]`` on a free port, until the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "mechscope.cli", "serve", model, "--port", str(port), "--db", str(db)]
    if sae is not None:
        command += ["--sae", str(sae)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/api/model", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def language_server(tmp_path_factory) -> Iterator[str]:
    with server("language", tmp_path_factory.mktemp("db") / "workbench.sqlite3") as url:
        yield url


@pytest.fixture(scope="module")
def ioi():
    sample = grammar.ioi(random.Random(5), "held_out")
    return sample, abc_prompts([sample], 5)[0]


@pytest.fixture(scope="module")
def seeded_server(tmp_path_factory) -> Iterator[str]:
    """A server whose database already holds experiments from two models, newest "gpt2"."""
    db = tmp_path_factory.mktemp("seeded") / "workbench.sqlite3"
    store = ExperimentStore(db)
    for i in range(SEEDED):
        model = "gpt2" if i % 2 else "language"
        store.save("prompt", model, f"seed {i}", {"prompt": f"seed {i}"}, {"sections": [seed_section(i)]})
    with server("language", db) as url:
        yield url


def seed_section(i: int) -> dict:
    return {"id": f"seed-{i}", "title": f"Seed {i}", "description": "", "facts": [], "widgets": []}


def listed_ids(url: str) -> list[int]:
    with urllib.request.urlopen(f"{url}/api/experiments?limit=500") as response:
        return [e["id"] for e in json.loads(response.read())]


def submit(page, form: str, **fields: str) -> None:
    page.locator("body[data-ready=true]").wait_for()
    for name, value in fields.items():
        page.locator(f"{form} [name={name}]").fill(value)
    page.locator(f"{form} button[type=submit]").click()


def test_a_prompt_is_explored_with_no_errors(watched, language_server, ioi):
    page = watched.page
    page.goto(language_server)
    submit(page, "#prompt-form", prompt=ioi[0].prompt, answer=ioi[0].answer, wrong=" " + ioi[0].subject)
    view = page.locator('#results .ms-widget[data-kind="attention"]')
    view.wait_for(timeout=TIMEOUT_MS)
    for section in ["tokens", "attention", "logit-lens", "attribution", "heads"]:
        assert page.locator(f'#results section[data-id="{section}"]').count() == 1
    tokens = view.locator(".ms-token")
    before = tokens.evaluate_all("els => els.map(e => e.className + e.style.backgroundColor)")
    tokens.nth(6).hover()
    assert tokens.evaluate_all("els => els.map(e => e.className + e.style.backgroundColor)") != before
    assert "ms-focus" in tokens.nth(6).get_attribute("class")
    watched.assert_clean()


def test_a_patching_run_started_from_the_page_completes(watched, language_server, ioi):
    sample, corrupted = ioi
    page = watched.page
    page.goto(language_server)
    page.locator("#patching-form select[name=hook] option").first.wait_for(state="attached")
    submit(
        page,
        "#patching-form",
        clean=sample.prompt,
        corrupted=corrupted,
        answer=sample.answer,
        wrong=" " + sample.subject,
    )
    page.locator("#progress[data-state=done]").wait_for(timeout=TIMEOUT_MS)
    assert page.locator("#progress").get_attribute("aria-valuenow") == "100"
    heatmap = page.locator('#results section[data-id="patching"] .ms-widget[data-kind="heatmap"]').first
    heatmap.wait_for()
    language = load("language")
    n_tokens = len(language.to_str_tokens(sample.prompt))
    assert heatmap.locator(".ms-col-label").count() == n_tokens
    assert heatmap.locator(".ms-cell").count() == language.cfg.n_layers * n_tokens
    title = page.locator("#experiments li .wb-title").first.inner_text()
    assert title.startswith(f"{sample.subject} → ") and " · resid_pre · " in title
    # another kind of run hides the finished sweep's bar
    submit(page, "#activation-form", prompt=sample.prompt, hook="hook_embed")
    page.locator("#progress").wait_for(state="hidden")
    page.locator('#results section[data-id="activation"]').wait_for(timeout=TIMEOUT_MS)
    watched.assert_clean()


def test_a_patching_run_that_is_refused_leaves_no_progress_bar(watched, language_server, ioi):
    sample, corrupted = ioi
    page = watched.page
    page.goto(language_server)
    page.locator("#patching-form select[name=hook] option").first.wait_for(state="attached")
    fields = dict(clean=sample.prompt, corrupted=corrupted, answer=sample.answer, wrong=" " + sample.subject)
    submit(page, "#patching-form", **fields)
    page.locator("#progress[data-state=done]").wait_for(timeout=TIMEOUT_MS)
    submit(page, "#patching-form", **fields | {"wrong": sample.answer})
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('same token')")
    assert page.locator("#progress").is_hidden()
    assert [e for e in watched.errors if "400" not in e] == []


def test_a_patching_run_that_ends_after_another_experiment_was_opened_leaves_it_open(watched, language_server, ioi):
    sample, corrupted = ioi
    page = watched.page
    page.goto(language_server)
    submit(page, "#activation-form", prompt=sample.prompt, hook="hook_embed")
    page.locator('#results section[data-id="activation"]').wait_for(timeout=TIMEOUT_MS)
    opened = page.locator("#experiments li").first.get_attribute("data-id")
    held = []  # the sweep's first poll waits here until the user has opened another experiment
    page.route("**/api/jobs/**", lambda route: held.append(route))
    fields = dict(clean=sample.prompt, corrupted=corrupted, answer=sample.answer, wrong=" " + sample.subject)
    with page.expect_request("**/api/jobs/**"):
        submit(page, "#patching-form", **fields)
    page.locator(f'#experiments li[data-id="{opened}"] .wb-open').click()
    page.locator(f'#results[data-experiment="{opened}"]').wait_for()
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Experiment #')")
    held[0].continue_()
    page.unroute("**/api/jobs/**")  # later polls go straight through
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('patching finished')")
    status = page.locator("#status").inner_text()
    newest = max(listed_ids(language_server))
    assert status == f"patching finished: experiment #{newest}"
    assert page.locator("#results").get_attribute("data-experiment") == opened
    page.locator(f'#experiments li[data-id="{newest}"]').wait_for()
    watched.assert_clean()


@pytest.mark.bad_input
def test_text_in_the_index_box_is_an_error_not_the_norm(watched, language_server):
    page = watched.page
    page.goto(language_server)
    page.locator("body[data-ready=true]").wait_for()
    before = listed_ids(language_server)
    page.locator("#activation-form [name=prompt]").fill("Mary went home")
    page.locator("#activation-form [name=hook]").fill("hook_embed")
    page.locator("#activation-form [name=index]").press_sequentially(
        "2e"
    )  # Chromium drops letters, but keeps an unfinished exponent
    page.locator("#activation-form button[type=submit]").click()
    page.locator("#error").wait_for(state="visible")
    assert page.locator("#error").inner_text() == "index must be a whole number"
    assert listed_ids(language_server) == before
    watched.assert_clean()


@pytest.mark.bad_input
def test_a_busy_server_message_is_shown_as_sent(watched, language_server):
    message = "a patching sweep is running (40% done); try again when it finishes"
    page = watched.page
    page.route("**/api/prompt", lambda route: route.fulfill(status=409, json={"error": message}))
    page.goto(language_server)
    submit(page, "#prompt-form", prompt="Mary went home")
    page.locator("#error").wait_for(state="visible")
    assert page.locator("#error").inner_text() == message
    assert [e for e in watched.errors if "409" not in e] == []


def test_the_list_names_each_experiment_s_model_and_pages_back(watched, seeded_server):
    page = watched.page
    page.goto(seeded_server)
    page.locator("body[data-ready=true]").wait_for()
    items = page.locator("#experiments li")
    ids = listed_ids(seeded_server)
    assert [int(i) for i in items.evaluate_all("els => els.map(e => e.dataset.id)")] == ids[:PAGE_SIZE]
    metas = page.locator("#experiments .wb-meta").all_inner_texts()
    assert any(" · gpt2 · " in m for m in metas) and any(" · language · " in m for m in metas)
    page.locator("#experiments-more").click()
    page.locator(f'#experiments li[data-id="{ids[-1]}"]').wait_for()
    assert [int(i) for i in items.evaluate_all("els => els.map(e => e.dataset.id)")] == ids
    assert page.locator("#experiments-more").is_hidden()
    gpt2 = page.locator("#experiments li", has_text="· gpt2 ·").first
    gpt2.locator(".wb-open").click()
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Experiment #')")
    assert "prompt on gpt2" in page.locator("#status").inner_text()
    watched.assert_clean()


def test_an_experiment_is_deleted_from_the_keyboard(watched, seeded_server):
    page = watched.page
    page.goto(seeded_server)
    page.locator("body[data-ready=true]").wait_for()
    first = page.locator("#experiments li").first
    gone = first.get_attribute("data-id")
    first.locator(".wb-open").focus()
    page.keyboard.press("Tab")  # from the experiment to its delete button
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')") == f"Delete experiment #{gone}"
    page.keyboard.press("Enter")
    page.locator(f'#experiments li[data-id="{gone}"]').wait_for(state="detached")
    assert int(gone) not in listed_ids(seeded_server)
    assert page.locator("#status").inner_text() == f"Deleted experiment #{gone}."
    assert page.evaluate("() => document.activeElement.classList.contains('wb-open')")  # focus stays in the list
    watched.assert_clean()


def test_a_slow_answer_to_an_older_reopen_does_not_replace_a_newer_one(watched, seeded_server):
    page = watched.page
    page.goto(seeded_server)
    page.locator("body[data-ready=true]").wait_for()
    older, newer = page.locator("#experiments li").evaluate_all("els => els.slice(0, 2).map(e => e.dataset.id)")
    held = []
    page.route(f"**/api/experiments/{older}", lambda route: held.append(route))
    page.locator(f'#experiments li[data-id="{older}"] .wb-open').click()
    page.locator(f'#experiments li[data-id="{newer}"] .wb-open').click()
    page.locator(f'#results[data-experiment="{newer}"]').wait_for()
    with page.expect_response(f"**/api/experiments/{older}") as answer:
        held[0].continue_()
    answer.value.finished()
    page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 100))")  # let the page handle it
    assert page.locator("#results").get_attribute("data-experiment") == newer
    assert page.locator("#status").inner_text().startswith(f"Experiment #{newer} ")
    watched.assert_clean()


@pytest.mark.bad_input
def test_bad_input_gets_a_sentence_not_a_stack_trace(watched, language_server):
    page = watched.page
    page.goto(language_server)
    error = page.locator("#error")
    submit(page, "#prompt-form", prompt="   ")
    error.wait_for(state="visible")
    assert "empty" in error.inner_text()
    submit(page, "#prompt-form", prompt="Mary " * 400)
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('limit')")
    assert f"the limit is {load('language').cfg.n_ctx} tokens" in error.inner_text()  # n_ctx < --max-tokens
    submit(page, "#activation-form", prompt="Mary went home", hook="blocks.9.mlp.hook_post")
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('hook')")
    text = error.inner_text()
    assert "blocks.9.mlp.hook_post" in text and "Traceback" not in text
    # a page that shows errors as intended logs none
    assert [e for e in watched.errors if "400" not in e] == []


@pytest.fixture(scope="module")
def xss_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 whose vocabulary holds a token that is an HTML tag."""
    directory = tmp_path_factory.mktemp("xss-model")
    tokenizer = train_tokenizer(320, 0)
    tokenizer.add_tokens([XSS])
    tiny_gpt2(0, vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_token_that_looks_like_markup_is_shown_as_text(watched, xss_model, tmp_path):
    with server(str(xss_model), tmp_path / "db.sqlite3") as url:
        page = watched.page
        page.goto(url)
        submit(page, "#prompt-form", prompt=f"the {XSS} cat")
        view = page.locator('#results .ms-widget[data-kind="attention"]')
        view.wait_for(timeout=TIMEOUT_MS)
        assert XSS in view.locator(".ms-token").all_inner_texts()
        assert page.locator("img").count() == 0
        page.locator("#experiments li").first.wait_for()
    watched.assert_clean()


def test_an_experiment_outlives_a_restart(watched, tmp_path, ioi):
    db = tmp_path / "workbench.sqlite3"
    page = watched.page
    with server("language", db) as url:
        page.goto(url)
        submit(page, "#prompt-form", prompt=ioi[0].prompt)
        page.locator('#results .ms-widget[data-kind="attention"]').wait_for(timeout=TIMEOUT_MS)
        page.locator("#experiments li").first.wait_for()
        saved = page.locator("#experiments li").all_inner_texts()
    with server("language", db) as url:
        page.goto(url)
        listed = page.locator("#experiments li")
        listed.first.wait_for()
        assert listed.all_inner_texts() == saved
        listed.first.click()
        page.locator('#results .ms-widget[data-kind="attention"]').wait_for(timeout=TIMEOUT_MS)
    watched.assert_clean()


@pytest.fixture(scope="module")
def sae_server(tmp_path_factory) -> Iterator[str]:
    """The language organism with a tiny SAE on one of its hook points."""
    cfg = SAEConfig(
        d_in=load("language").cfg.d_model, d_sae=D_SAE, architecture="topk", hook_name=SAE_HOOK, hook_layer=0, k=4
    )
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():
        sae.b_enc[FEATURE] = 50.0
    directory = sae.save(tmp_path_factory.mktemp("sae") / "sae")
    with server("language", tmp_path_factory.mktemp("sae-db") / "workbench.sqlite3", directory) as url:
        yield url


def test_the_feature_form_appears_only_with_an_sae(watched, language_server, sae_server):
    page = watched.page
    page.goto(language_server)
    page.locator("body[data-ready=true]").wait_for()
    assert page.locator("#feature-form").is_hidden()
    page.goto(sae_server)
    page.locator("body[data-ready=true]").wait_for()
    assert page.locator("#feature-form").is_visible()
    assert page.locator("#sae-info").inner_text() == f"This SAE: topk, {D_SAE} features on {SAE_HOOK}."
    watched.assert_clean()


def test_a_feature_s_examples_render_and_it_is_listed(watched, sae_server):
    page = watched.page
    page.goto(sae_server)
    submit(page, "#feature-form", feature=str(FEATURE), sequences="4")
    top = page.locator(f'#results section[data-id="feature-{FEATURE}-top"] .ms-widget[data-kind="tokens"]')
    top.first.wait_for(timeout=TIMEOUT_MS)
    examples = page.locator('#results .ms-widget[data-kind="tokens"]')
    assert examples.count() > 1
    assert page.locator("#results .wb-example-focus").count() == examples.count()  # each example's own token
    item = page.locator("#experiments li").first
    item.wait_for()
    assert item.get_attribute("data-kind") == "feature"
    assert item.locator(".wb-title").inner_text() == f"feature {FEATURE} · {SAE_HOOK} · 4 sequences"
    page.locator("#feature-form [name=feature]").fill("0")
    item.locator(".wb-open").click()
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Experiment #')")
    assert page.locator("#feature-form [name=feature]").input_value() == str(FEATURE)  # the form shows what ran
    assert page.locator('#results .ms-widget[data-kind="tokens"]').count() == examples.count()
    watched.assert_clean()


@pytest.mark.bad_input
def test_a_feature_outside_the_sae_is_an_error_naming_the_range(watched, sae_server):
    page = watched.page
    page.goto(sae_server)
    before = listed_ids(sae_server)
    submit(page, "#feature-form", feature=str(D_SAE))
    page.locator("#error").wait_for(state="visible")
    assert f"feature must be between 0 and {D_SAE - 1}" in page.locator("#error").inner_text()
    assert listed_ids(sae_server) == before
    assert [e for e in watched.errors if "400" not in e] == []
