"""``mechscope report``, ``mechscope demo`` and ``mechscope serve --help``: thin shells that write
the page, print where it is, and turn bad input into one line on stderr."""

from __future__ import annotations

import random

from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.toys.language import grammar
from mechscope.toys.language.evaluation import abc_prompts

runner = CliRunner()


def test_report_writes_the_page_and_says_where(tmp_path):
    sample = grammar.ioi(random.Random(1), "held_out")
    corrupted = abc_prompts([sample], 1)[0]
    args = ["report", "language", "--prompt", sample.prompt, "--corrupted", corrupted, "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--answer", sample.answer, "--wrong", " " + sample.subject])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert 'data-id="patching"' in page
    assert (tmp_path / "index.html").as_uri() in result.output


def test_report_refuses_bad_input_in_one_line(tmp_path):
    result = runner.invoke(app, ["report", "language", "--prompt", "  ", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "error: the prompt is empty" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["report", "induction", "--prompt", "hi", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "has no tokenizer" in result.output
    args = ["report", "language", "--prompt", "Mary went", "--corrupted", "Mary went to the park", "--out"]
    result = runner.invoke(app, [*args, str(tmp_path), "--answer", " home", "--wrong", " out"])
    assert result.exit_code == 1 and "same number of tokens" in result.output
    assert not (tmp_path / "index.html").exists()


def test_demo_writes_the_organism_report(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "index.html").as_uri() in result.output
    assert "Induction" in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_serve_binds_this_machine_by_default():
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output


def test_serve_refuses_what_it_cannot_start_in_one_line(tmp_path):
    result = runner.invoke(app, ["serve", "no-such-model-here"])
    assert result.exit_code == 1
    assert "'no-such-model-here' is not a shipped organism (induction" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["serve", "--port", "99999"])
    assert result.exit_code == 2 and "65535" in result.output
