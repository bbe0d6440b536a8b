from __future__ import annotations

import pytest
import torch

from mechscope.model.hooks import HookNameError, HookShapeError
from tests.conftest import random_model

TL_NAMES = [
    "hook_embed",
    "hook_pos_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_resid_post",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_mlp_out",
    "blocks.0.ln1.hook_scale",
    "blocks.0.ln1.hook_normalized",
    "blocks.0.ln2.hook_scale",
    "blocks.0.ln2.hook_normalized",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_z",
    "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_result",
    "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.hook_post",
    "blocks.0.hook_attn_in",
    "blocks.0.hook_q_input",
    "blocks.0.hook_k_input",
    "blocks.0.hook_v_input",
    "blocks.0.hook_mlp_in",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
]


def test_hook_names_follow_transformerlens():
    model = random_model()
    assert set(TL_NAMES) <= set(model.hook_dict)
    per_block = [n for n in model.hook_dict if n.startswith("blocks.1.")]
    assert len(per_block) == len([n for n in TL_NAMES if n.startswith("blocks.0.")])


def test_shapes_of_every_hook_point():
    model = random_model()
    b, p, d, h, e, m = 2, 5, 32, 4, 8, 128
    expected = {
        "hook_embed": (b, p, d),
        "blocks.0.hook_resid_pre": (b, p, d),
        "blocks.0.hook_resid_mid": (b, p, d),
        "blocks.0.attn.hook_q": (b, p, h, e),
        "blocks.0.attn.hook_z": (b, p, h, e),
        "blocks.0.attn.hook_pattern": (b, h, p, p),
        "blocks.0.attn.hook_attn_scores": (b, h, p, p),
        "blocks.0.attn.hook_result": (b, p, h, d),
        "blocks.0.mlp.hook_pre": (b, p, m),
        "blocks.0.hook_q_input": (b, p, h, d),
        "blocks.0.hook_mlp_in": (b, p, d),
        "blocks.0.ln1.hook_scale": (b, p, h, 1),  # per head, since hook_q_input is in use
        "blocks.0.ln2.hook_scale": (b, p, 1),
        "ln_final.hook_normalized": (b, p, d),
    }
    _, cache = model.run_with_cache(torch.zeros(b, p, dtype=torch.long), names_filter=list(expected))
    assert {name: tuple(cache[name].shape) for name in expected} == expected


def test_hook_can_replace_an_activation():
    model = random_model()
    tokens = torch.arange(6)[None]
    clean = model(tokens)

    def zero_head_1(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    patched = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_1)])
    assert not torch.allclose(clean, patched)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    expected = cache["z", 0].clone()
    expected[:, :, 1] = 0
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_head_1)]):
        _, patched_cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    torch.testing.assert_close(patched_cache["z", 0], expected)


def test_hook_returning_none_only_reads():
    model = random_model()
    seen = []
    out = model.run_with_hooks(torch.arange(4), fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, h: seen.append(h))])
    assert [h.name for h in seen] == ["blocks.1.hook_resid_pre"]
    assert seen[0].layer() == 1
    torch.testing.assert_close(out, model(torch.arange(4)))


def test_wrong_shape_replacement_names_both_shapes():
    model = random_model()
    with pytest.raises(HookShapeError, match=r"returned shape \(1, 4\).*has shape \(1, 4, 32\)"):
        model.run_with_hooks(torch.arange(4), fwd_hooks=[("hook_embed", lambda x, h: x[..., 0])])


def test_hooks_are_removed_even_when_the_forward_raises():
    model = random_model()

    def explode(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(torch.arange(4), fwd_hooks=[("blocks.0.hook_resid_pre", explode)])
    assert not any(point.is_active for point in model.hook_dict.values())
    with pytest.raises(RuntimeError), model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_q"), explode)]):
        model(torch.arange(4))
    assert not any(point.is_active for point in model.hook_dict.values())


def test_unknown_hook_name_suggests_the_closest():
    model = random_model()
    with pytest.raises(HookNameError, match=r"blocks\.0\.hook_resid_pre"):
        model.run_with_hooks(torch.arange(3), fwd_hooks=[("blocks.0.hook_resid_pr", lambda x, h: None)])
    with pytest.raises(HookNameError, match="unknown hook name"):
        model.run_with_cache(torch.arange(3), names_filter=["blocks.0.attn.hook_patern"])


def test_backward_hooks_see_and_can_change_gradients():
    model = random_model()
    grads = {}

    def save(grad, hook):
        grads[hook.name] = grad.clone()

    loss = model.run_with_hooks(torch.arange(8), return_type="loss", bwd_hooks=[("blocks.1.hook_resid_pre", save)])
    loss.backward()
    assert grads["blocks.1.hook_resid_pre"].shape == (1, 8, 32)
    assert grads["blocks.1.hook_resid_pre"].abs().sum() > 0

    model.zero_grad()
    loss = model.run_with_hooks(
        torch.arange(8), return_type="loss", bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, h: torch.zeros_like(g))]
    )
    loss.backward()
    # No gradient passes back through block 1's input, so block 0's attention only gets none.
    assert model.blocks[0].attn.W_Q.grad is None or model.blocks[0].attn.W_Q.grad.abs().sum() == 0
    assert model.blocks[1].attn.W_Q.grad.abs().sum() > 0


def test_persistent_hooks_until_reset():
    model = random_model()
    calls = []
    model.add_hook("hook_embed", lambda x, h: calls.append(1))
    model(torch.arange(3))
    model(torch.arange(3))
    model.reset_hooks()
    model(torch.arange(3))
    assert len(calls) == 2


@pytest.mark.parametrize(
    "names_filter",
    [
        "blocks.0.hook_resid_post",
        ["blocks.0.hook_resid_post", "blocks.2.attn.hook_pattern"],
        lambda name: name.endswith("hook_v"),
    ],
)
def test_names_filter_caches_only_what_was_asked(names_filter):
    model = random_model()
    _, cache = model.run_with_cache(torch.arange(5), names_filter=names_filter)
    if isinstance(names_filter, str):
        expected = {names_filter}
    elif isinstance(names_filter, list):
        expected = set(names_filter)
    else:
        expected = {n for n in model.hook_dict if names_filter(n)}
    assert set(cache) == expected


def test_default_cache_has_every_standard_hook_and_no_opt_in_one():
    model = random_model()
    _, cache = model.run_with_cache(torch.arange(5))
    standard = {n for n, p in model.hook_dict.items() if not p.opt_in}
    assert set(cache) == standard
    assert "blocks.0.attn.hook_result" not in cache


def test_per_head_result_sums_to_attention_output():
    model = random_model()
    _, cache = model.run_with_cache(
        torch.arange(6), names_filter=["blocks.1.attn.hook_result", "blocks.1.hook_attn_out"]
    )
    total = cache["result", 1].sum(dim=-2) + model.blocks[1].attn.b_O
    torch.testing.assert_close(total, cache["attn_out", 1], atol=1e-5, rtol=0)


def test_opt_in_hooks_do_not_change_the_output():
    model = random_model()
    tokens = torch.arange(7)
    opt_in = [n for n, p in model.hook_dict.items() if p.opt_in]
    logits, cache = model.run_with_cache(tokens, names_filter=opt_in)
    assert set(cache) == set(opt_in)
    torch.testing.assert_close(logits, model(tokens), atol=1e-5, rtol=0)


def test_patching_one_heads_query_input_changes_only_that_head():
    model = random_model()
    tokens = torch.arange(7)
    _, clean = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_q")

    direction = torch.randn(32)  # not a constant: the norm would centre that away

    def perturb_head_2(x, hook):
        x = x.clone()
        x[:, :, 2] += direction
        return x

    with model.hooks(fwd_hooks=[("blocks.1.hook_q_input", perturb_head_2)]):
        _, patched = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_q")
    changed = (patched["q", 1] - clean["q", 1]).abs().amax(dim=(0, 1, 3))
    assert changed[2] > 1e-3
    assert torch.all(changed[[0, 1, 3]] < 1e-5)
