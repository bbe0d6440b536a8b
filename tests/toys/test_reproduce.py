"""Each shipped organism's recorded command reproduces its run: same recipe, data and start."""

from __future__ import annotations

import shlex

import pytest

from mechscope.toys import checkpoint as ckpt
from mechscope.toys import train
from mechscope.toys.registry import configured, parse_setting
from mechscope.toys.zoo import SHIPPED, load_run, shipped


def settings_of(command: str) -> tuple[str, dict]:
    """(organism, settings) from a recorded ``mechscope train NAME --seed S --steps N --set K=V ...``."""
    words = shlex.split(command)
    assert words[:2] == ["mechscope", "train"]
    settings, rest = {}, iter(words[3:])
    for flag in rest:
        value = next(rest)
        if flag in ("--seed", "--steps"):
            settings[flag[2:]] = int(value)
        elif flag == "--set":
            settings.update([parse_setting(value)])
        else:
            assert flag == "--out", flag
    return words[2], settings


@pytest.mark.replay
@pytest.mark.parametrize("name", shipped())
def test_the_recorded_command_rebuilds_the_recipe_and_replays_the_first_steps(name):
    _, _, record, metrics = load_run(name)
    organism_name, settings = settings_of(record["command"])
    organism, config = configured(organism_name, settings)
    assert organism.params() == record["params"] and config.to_dict() == record["train"]
    first_evaluation = config.eval_every
    replay = train(organism, config, until=first_evaluation, progress=False).metrics
    shipped_start = [r for r in metrics if r["step"] <= first_evaluation]
    assert [r["step"] for r in replay] == [r["step"] for r in shipped_start]
    for mine, theirs in zip(replay, shipped_start):
        assert mine.keys() == theirs.keys()
        # Thread counts differ between the shipped run and the test; sums reorder, nothing more.
        assert mine == pytest.approx(theirs, rel=1e-3, abs=1e-5)
    assert (SHIPPED / name / ckpt.WEIGHTS_FILE).exists()
