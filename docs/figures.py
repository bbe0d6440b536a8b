"""Render the figures of docs/organisms.md from the shipped model organisms.

    pip install -e ".[docs]"                      # kaleido, which drives a local Chromium
    BROWSER_PATH=/usr/bin/chromium python docs/figures.py

Each organism's ``figures(model, metrics, findings)`` gives plotly figures; each is written as
``docs/figures/<stem>.png``. Nothing here is fetched: the checkpoints ship with mechscope.
"""

from __future__ import annotations

import os
from pathlib import Path

from mechscope.toys.zoo import load_run, shipped

OUT = Path(__file__).parent / "figures"


def main() -> None:
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    OUT.mkdir(exist_ok=True)
    for name in shipped():
        model, organism, _, metrics = load_run(name)
        findings = organism.explain(model, metrics)
        for stem, figure in organism.figures(model, metrics, findings).items():
            path = OUT / f"{stem}.png"
            figure.write_image(path, width=900, height=480)
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
