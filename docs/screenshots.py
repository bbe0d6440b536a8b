"""Take the screenshots in docs/screenshots/ (shown in the README) from the real pages.

    python docs/screenshots.py        # needs Debian's chromium (MECHSCOPE_CHROMIUM to point elsewhere)

It writes the demo report, opens it in headless Chromium, hovers a token of the language
organism's attention view, then starts ``mechscope serve language`` on a free port with a
throw-away database and runs a patching sweep from the page. Nothing is fetched.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from mechscope.toys.language import grammar
from mechscope.toys.language.evaluation import abc_prompts
from mechscope.viz.demo import demo_report

OUT = Path(__file__).parent / "screenshots"
CHROMIUM = os.environ.get("MECHSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip


def shoot_report(page: Page, scratch: Path) -> None:
    page.goto(demo_report(scratch / "demo").as_uri())
    page.screenshot(path=OUT / "report.png")
    language = page.locator(".ms-chapter").nth(1)
    attention = language.locator('.ms-widget[data-kind="attention"]')
    attention.locator(".ms-head").nth(4).click()  # layer 1, head 0: the organism's induction head
    attention.scroll_into_view_if_needed()
    attention.locator(".ms-token").nth(-3).hover()
    attention.screenshot(path=OUT / "report-attention.png")
    lens = language.locator('section[data-id="logit-lens"]')
    lens.scroll_into_view_if_needed()
    lens.screenshot(path=OUT / "report-logit-lens.png")


def shoot_workbench(page: Page, scratch: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mechscope.cli", "serve", "language", "--port", str(port), "--db",
               str(scratch / "workbench.sqlite3")]  # fmt: skip
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(url)
        sample = grammar.ioi(random.Random(2), "held_out")
        page.goto(url)
        page.locator("body[data-ready=true]").wait_for()
        form = page.locator("#patching-form")
        for name, value in dict(clean=sample.prompt, corrupted=abc_prompts([sample], 2)[0], answer=sample.answer,
                                wrong=" " + sample.subject).items():  # fmt: skip
            form.locator(f"[name={name}]").fill(value)
        form.locator("button[type=submit]").click()
        page.locator("#progress[data-state=done]").wait_for(timeout=60_000)
        page.screenshot(path=OUT / "workbench.png", full_page=False)
        page.locator('#results section[data-id="patching"]').screenshot(path=OUT / "workbench-patching.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/model", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the workbench at {url} did not start")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        shoot_report(page, Path(scratch))
        shoot_workbench(page, Path(scratch))
        browser.close()
    for path in sorted(OUT.glob("*.png")):
        print(path)


if __name__ == "__main__":
    main()
