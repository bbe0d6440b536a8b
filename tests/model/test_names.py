from __future__ import annotations

import pytest

from mechscope.model.names import act_name


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("resid_pre", 3), "blocks.3.hook_resid_pre"),
        (("pattern", 0), "blocks.0.attn.hook_pattern"),
        (("attn_logits", 1), "blocks.1.attn.hook_attn_scores"),
        (("post", 2), "blocks.2.mlp.hook_post"),
        (("scale", 2, "ln2"), "blocks.2.ln2.hook_scale"),
        (("normalized",), "ln_final.hook_normalized"),
        (("embed",), "hook_embed"),
        (("blocks.0.hook_resid_pre",), "blocks.0.hook_resid_pre"),
        (("q_input", 1), "blocks.1.hook_q_input"),
    ],
)
def test_act_name(args, expected):
    assert act_name(*args) == expected


def test_negative_layers_need_the_depth():
    assert act_name("resid_post", -1, n_layers=4) == "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match="needs the number of layers"):
        act_name("resid_post", -1)
    with pytest.raises(IndexError):
        act_name("resid_post", -5, n_layers=4)
