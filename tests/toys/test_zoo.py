"""Loading model organisms by name or from a run folder, and naming what is missing."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope import zoo
from mechscope.toys import checkpoint as ckpt
from mechscope.toys import train
from mechscope.toys.registry import ORGANISMS, configured, organism_class, parse_setting
from mechscope.toys.zoo import SHIPPED
from tests.conftest import TINY_INDUCTION

SHIPPED_NAMES = ["induction", "modular_addition", "superposition", "language"]
TINY = TINY_INDUCTION


def test_the_four_trained_organisms_ship_with_their_command_and_metrics():
    assert sorted(zoo.shipped()) == sorted(SHIPPED_NAMES)
    for name in SHIPPED_NAMES:
        record = json.loads((SHIPPED / name / ckpt.RUN_FILE).read_text())
        assert record["organism"] == name
        assert record["command"].startswith(f"mechscope train {name} --seed {record['seed']}")
        assert ckpt.read_metrics(SHIPPED / name)[-1] == record["final"]


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_a_shipped_organism_loads_with_its_task_and_record(name):
    model = zoo.load(name)
    assert isinstance(model.organism, organism_class(name))
    assert model.run["organism"] == name and not model.training
    state = ckpt.read_tensors(SHIPPED / name / ckpt.WEIGHTS_FILE)[0]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_run_folder_loads_even_before_it_finishes(tmp_path):
    organism, config = configured("induction", {**TINY, "steps": 10, "checkpoint_every": 5})
    result = train(organism, config, tmp_path, progress=False)
    assert torch.equal(zoo.load(tmp_path).blocks[0].attn.W_Q, result.model.blocks[0].attn.W_Q)
    (tmp_path / ckpt.WEIGHTS_FILE).unlink()  # as if killed: only the checkpoint is left
    assert torch.equal(zoo.load(str(tmp_path)).blocks[0].attn.W_Q, result.model.blocks[0].attn.W_Q)
    assert "induction_head" in zoo.explain(tmp_path).facts


@pytest.mark.bad_input
def test_unknown_names_and_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nope' is neither a shipped organism .*induction"):
        zoo.load("nope")
    (tmp_path / ckpt.RUN_FILE).write_text(json.dumps({"organism": "induction", "params": {}}))
    with pytest.raises(FileNotFoundError, match="holds no weights yet"):
        zoo.load(tmp_path)
    with pytest.raises(KeyError, match="unknown model organism 'nope'; known: induction"):
        organism_class("nope")


def test_settings_reach_the_task_or_the_recipe_and_unknown_ones_are_listed():
    organism, config = configured("induction", {"d_model": 32, "steps": 7, "lr": 0.01})
    assert organism.d_model == 32 and config.steps == 7 and config.lr == 0.01
    assert config.warmup_steps == organism.train_config().warmup_steps  # the rest of the recipe stays
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['colour'\] for induction; task fields"):
        configured("induction", {"colour": 1})
    assert parse_setting("p=23") == ("p", 23) and parse_setting("betas=[0.9, 0.98]") == ("betas", [0.9, 0.98])
    assert parse_setting("schedule=cosine") == ("schedule", "cosine")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_setting("p")


def test_every_registered_organism_imports_and_has_a_recipe():
    for name in ORGANISMS:
        cls = organism_class(name)
        assert cls.name == name and cls.summary
        assert cls().train_config().steps > 0


def test_explain_prints_the_findings_it_returns(capsys):
    findings = zoo.explain("superposition")
    assert capsys.readouterr().out.strip() == str(findings).strip()
    assert str(findings).startswith("superposition:") and findings.lines
    zoo.explain("superposition", verbose=False)
    assert capsys.readouterr().out == ""
