"""The README's Python example runs as written, on a tiny local model standing in for "gpt2"."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_exactly_the_two_quickstart_commands():
    quickstart = re.search(r"## Quickstart(.*?)##", README.read_text(), flags=re.DOTALL).group(1)
    commands = re.findall(r"^make \w+", quickstart, flags=re.MULTILINE)
    assert commands == ["make demo", "make test"]


def test_readme_example_runs(gpt2_dir):
    """The blocks run in order in one namespace, as a reader would paste them."""
    blocks = python_blocks()
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    for code in blocks:
        code = code.replace('"gpt2"', repr(str(gpt2_dir)))
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["attribution"].shape == (namespace["heads"].shape[0], 1)
    assert namespace["logits_from_1"].shape[-1] == namespace["model"].cfg.d_vocab
