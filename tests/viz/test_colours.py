"""Colour ranges: diverging for signed data with 0 in the middle, sequential otherwise, the
caller's bounds kept, and a range that always contains the data it was computed from."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.viz.colours import PLOTLY_SCALES, SCALES, value_range
from mechscope.viz.html import VizError

VALUES = st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=30).map(torch.tensor)


@settings(max_examples=20, deadline=None)
@given(VALUES)
def test_the_scale_follows_the_signs_and_the_range_holds_the_data(values):
    scale, zmin, zmax = value_range(values)
    both_signs = values.min().item() < 0 < values.max().item()
    assert scale == ("diverging" if both_signs else "sequential")
    assert zmin < zmax
    tolerance = 1e-4 * max(abs(zmin), abs(zmax))  # the ends are rounded to 5 significant digits
    assert zmin <= values.min().item() + tolerance and values.max().item() - tolerance <= zmax
    if scale == "diverging":
        assert zmin == -zmax
    else:
        assert zmin <= 0 <= zmax  # sequential ranges start from zero


def test_given_bounds_are_kept_and_a_missing_diverging_end_mirrors_the_other():
    values = torch.tensor([0.1, 0.4])
    assert value_range(values, scale="sequential", zmin=0.0, zmax=1.0) == ("sequential", 0.0, 1.0)
    assert value_range(values, scale="diverging", zmax=2.0) == ("diverging", -2.0, 2.0)
    assert value_range(values, scale="diverging", zmin=-3.0) == ("diverging", -3.0, 3.0)


def test_nan_is_ignored_and_constant_data_still_gets_a_range():
    scale, zmin, zmax = value_range(torch.tensor([math.nan, -2.0, 3.0]))
    assert (scale, zmin, zmax) == ("diverging", -3.0, 3.0)
    for values in (torch.zeros(4), torch.full((3,), math.nan), torch.full((2,), 5.0)):
        _, zmin, zmax = value_range(values)
        assert zmin < zmax


def test_plotly_scales_exist_for_every_scale():
    assert set(PLOTLY_SCALES) == set(SCALES)
    assert PLOTLY_SCALES["diverging"][1] == [0.5, "#ffffff"]  # white at 0


@pytest.mark.bad_input
def test_bad_scales_and_bounds_are_refused_by_name():
    values = torch.tensor([0.1, 0.4])
    with pytest.raises(VizError, match="scale must be one of"):
        value_range(values, scale="rainbow")
    with pytest.raises(VizError, match="zmax must be a finite number"):
        value_range(values, zmax=math.inf)
    with pytest.raises(VizError, match="zmin must be below zmax"):
        value_range(values, zmin=2.0, zmax=1.0)
