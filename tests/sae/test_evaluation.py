"""SAE evaluation: exact reconstructions score perfectly, zero SAEs score as ablations, and every
metric equals a direct computation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.sae import SAEConfig, SAEError, build_sae, transcoder_config
from mechscope.sae.evaluation import evaluate_sae
from tests.conftest import random_model

BOS = 0


def config(hook: str, d_in: int, architecture: str = "topk", **fields) -> SAEConfig:
    layer = int(hook.split(".")[1])
    return SAEConfig(d_in=d_in, architecture=architecture, hook_name=hook, hook_layer=layer, **fields)


def exact_sae(hook: str, d: int, architecture: str):
    """Latents ReLU(x) and ReLU(-x), decoded as their difference: x̂ = x exactly (k = d keeps every nonzero one)."""
    k = d if architecture in ("topk", "batchtopk") else None
    sae = build_sae(config(hook, d, architecture, d_sae=2 * d, k=k)).eval()
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def with_bos(n: int, pos: int, seed: int = 1, vocab: int = 320) -> torch.Tensor:
    tokens = torch.randint(1, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = BOS
    return tokens


@pytest.mark.parametrize(
    ("architecture", "hook", "d"),
    [
        ("relu", "blocks.0.hook_resid_post", 32),
        ("topk", "blocks.1.hook_mlp_out", 32),
        ("batchtopk", "blocks.0.hook_resid_mid", 32),
        ("topk", "blocks.0.attn.hook_z", 32),  # [batch, pos, head, d_head], flattened like the store does
    ],
)
def test_an_exact_reconstruction_scores_perfectly(model, architecture, hook, d):
    metrics = evaluate_sae(model, exact_sae(hook, d, architecture), with_bos(3, 10))
    assert metrics.fvu == pytest.approx(0, abs=1e-10) and metrics.explained_variance == pytest.approx(1)
    assert metrics.mse == pytest.approx(0, abs=1e-10) and metrics.shrinkage == pytest.approx(1)
    assert metrics.ce_loss_spliced == pytest.approx(metrics.ce_loss_clean, abs=1e-6)
    assert metrics.ce_loss_recovered == pytest.approx(1, abs=1e-6)
    assert metrics.ce_loss_recovered_mean == pytest.approx(1, abs=1e-6)
    assert metrics.kl_spliced == pytest.approx(0, abs=1e-9)
    assert metrics.n_tokens == 3 * 9  # BOS positions are left out
    assert metrics.l0 == pytest.approx(d)  # one of each ±x_i pair
    pairs = metrics.firing_frequency[:d] + metrics.firing_frequency[d:]
    torch.testing.assert_close(pairs, torch.ones(d))
    record = json.loads(json.dumps(metrics.to_dict()))
    assert record["fvu"] == metrics.fvu and len(record["firing_frequency"]) == 2 * d
    assert [line.split()[0] for line in metrics.table().splitlines()] == [k for k in record if k != "firing_frequency"]


def test_a_zero_sae_is_a_zero_ablation(model):
    sae = build_sae(config("blocks.0.hook_resid_post", 32, d_sae=16, k=4))
    with torch.no_grad():
        for param in sae.parameters():
            param.zero_()
    tokens = with_bos(2, 12)
    metrics = evaluate_sae(model, sae, tokens)
    assert metrics.ce_loss_spliced == metrics.ce_loss_zero_ablated != metrics.ce_loss_clean
    assert metrics.ce_loss_recovered == 0
    assert metrics.l0 == 0 and metrics.dead_frac == 1 and metrics.dense_frac == 0 and metrics.shrinkage == 0
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    x = cache["blocks.0.hook_resid_post"][:, 1:].reshape(-1, 32).double()
    assert metrics.fvu == pytest.approx((x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-6)


def hand_metrics(model, sae, tokens, keep, mask=None, read=None, write=None):
    """Every metric by direct computation: dense latents, explicit hooks, explicit log-softmaxes."""
    read = read or sae.cfg.hook_name
    write = write or read
    _, cache = model.run_with_cache(tokens, names_filter=[read, write], attention_mask=mask)
    x, y = cache[read].flatten(2)[keep], cache[write].flatten(2)[keep]
    latents = sae.encode(x)
    y_hat = sae.decode(latents)

    def splice(values):
        def hook(act, hook):
            act = act.clone()
            act[keep] = values
            return act

        return model.run_with_hooks(tokens, fwd_hooks=[(write, hook)], attention_mask=mask)

    def ce(logits):
        log_probs = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        pairs = torch.ones_like(log_probs) if mask is None else (mask[:, :-1] * mask[:, 1:]).float()
        return (-(log_probs * pairs).sum() / pairs.sum()).item()

    clean = model(tokens, attention_mask=mask)
    spliced, zero = splice(y_hat), splice(torch.zeros_like(y))
    mean = splice(y.mean(0).expand_as(y))
    kl = F.kl_div(spliced.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    frequency = (latents != 0).float().mean(0)
    return dict(
        l0=(latents != 0).sum(-1).float().mean().item(),
        mse=(y - y_hat).pow(2).sum(-1).mean().item(),
        fvu=((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item(),
        shrinkage=(y_hat.norm(dim=-1) / y.norm(dim=-1)).mean().item(),
        ce_loss_clean=ce(clean),
        ce_loss_spliced=ce(spliced),
        ce_loss_zero_ablated=ce(zero),
        ce_loss_mean_ablated=ce(mean),
        ce_loss_recovered=(ce(zero) - ce(spliced)) / (ce(zero) - ce(clean)),
        ce_loss_recovered_mean=(ce(mean) - ce(spliced)) / (ce(mean) - ce(clean)),
        kl_spliced=kl[keep].mean().item(),
        dead_frac=(frequency == 0).float().mean().item(),
        dense_frac=(frequency > 0.1).float().mean().item(),
        n_tokens=len(x),
        firing_frequency=frequency,
    )


def assert_matches(metrics, expected):
    """Every metric as computed by hand; the recovered fractions, ratios of small differences that
    amplify float rounding, as their definition applied to the (checked) losses."""
    for name, value in expected.items():
        got = getattr(metrics, name)
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
        elif name.startswith("ce_loss_recovered"):
            ablated = metrics.ce_loss_zero_ablated if name == "ce_loss_recovered" else metrics.ce_loss_mean_ablated
            assert got == (ablated - metrics.ce_loss_spliced) / (ablated - metrics.ce_loss_clean), name
            assert got == pytest.approx(value, rel=1e-2, abs=1e-3), name
        elif name.startswith("ce_loss"):
            assert got == pytest.approx(value, rel=1e-6), name
        else:
            assert got == pytest.approx(value, rel=1e-4, abs=1e-6), name


def randomise(sae, seed: int):
    """Nonzero biases too, so every term of the encoder and decoder is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return sae.eval()


@settings(max_examples=10, deadline=None)
@given(
    architecture=st.sampled_from(["relu", "topk", "jumprelu"]),
    seed=st.integers(0, 1000),
    layer=st.integers(0, 2),
)
def test_metrics_equal_a_direct_computation(architecture, seed, layer):
    model = random_model(d_vocab=40)
    hook = f"blocks.{layer}.hook_resid_post"
    k = 5 if architecture == "topk" else None
    sae = randomise(build_sae(config(hook, 32, architecture, d_sae=48, k=k), seed=seed), seed)
    tokens = with_bos(3, 10, seed, vocab=40)
    tokens[1, 6] = BOS  # a BOS inside a row (concatenated documents) is left out too
    keep = tokens != BOS
    assert_matches(evaluate_sae(model, sae, tokens, drop_tokens=[BOS]), hand_metrics(model, sae, tokens, keep))


def test_padding_is_left_out_of_every_metric(model):
    sae = randomise(build_sae(config("blocks.1.hook_resid_pre", 32, d_sae=64, k=6)), 3)
    tokens = with_bos(3, 9)
    mask = torch.ones_like(tokens)
    mask[0, 6:] = 0
    mask[2, 4:] = 0
    metrics = evaluate_sae(model, sae, tokens, attention_mask=mask)
    keep = (tokens != BOS) & mask.bool()
    assert metrics.n_tokens == int(keep.sum())
    assert_matches(metrics, hand_metrics(model, sae, tokens, keep, mask))


def test_a_transcoder_is_spliced_at_its_output_hook(model):
    read, write = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    cfg = transcoder_config(
        d_in=32, d_out=32, d_sae=64, architecture="topk", k=8, hook_name=read, output_hook_name=write, hook_layer=0
    )
    sae = randomise(build_sae(cfg), 4)
    tokens = with_bos(2, 11)
    metrics = evaluate_sae(model, sae, tokens)
    assert_matches(metrics, hand_metrics(model, sae, tokens, tokens != BOS, read=read, write=write))


@pytest.mark.bad_input
def test_bad_evaluations_are_named(model):
    sae = build_sae(config("blocks.0.hook_resid_post", 32, d_sae=16, k=4))
    with pytest.raises(SAEError, match="no position is left to evaluate"):
        evaluate_sae(model, sae, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(SAEError, match=r"dense_threshold must lie in \(0, 1\]"):
        evaluate_sae(model, sae, with_bos(2, 5), dense_threshold=0)
    elsewhere = build_sae(config("blocks.7.hook_resid_post", 32, d_sae=16, k=4))
    with pytest.raises(SAEError, match=r"hook_name: .*blocks\.7\.hook_resid_post"):
        evaluate_sae(model, elsewhere, with_bos(2, 5))


@settings(max_examples=10, deadline=None)
@given(batch_size=st.integers(1, 4), seed=st.integers(0, 1000), masked=st.booleans())
def test_chunks_give_the_metrics_of_one_batch(batch_size, seed, masked):
    model = random_model(d_vocab=40)
    sae = randomise(build_sae(config("blocks.1.hook_resid_post", 32, d_sae=48, k=5), seed=seed), seed)
    tokens = with_bos(5, 9, seed, vocab=40)
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    mask[3, 7:] = 0
    options = dict(attention_mask=mask if masked else None, drop_tokens=[BOS])
    whole = evaluate_sae(model, sae, tokens, batch_size=len(tokens), **options)
    rows = []
    handle = model.embed.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        chunked = evaluate_sae(model, sae, tokens, batch_size=batch_size, **options)
    finally:
        handle.remove()
    chunks = -(-len(tokens) // batch_size)
    assert len(rows) == 5 * chunks and max(rows) <= batch_size  # one capture pass + four full passes per chunk
    for name, value in whole.to_dict().items():
        if name == "firing_frequency":
            torch.testing.assert_close(chunked.firing_frequency, whole.firing_frequency)
        else:
            assert getattr(chunked, name) == pytest.approx(value, rel=1e-5, abs=1e-5), name


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("read", "write"),
    [("blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"), ("blocks.0.hook_mlp_out", "blocks.0.hook_resid_mid")],
)
def test_a_transcoder_writing_upstream_of_its_input_is_refused(read, write):
    model = random_model(d_vocab=40)
    cfg = transcoder_config(
        d_in=32, d_out=32, d_sae=16, architecture="topk", k=4, hook_name=read, output_hook_name=write,
        hook_layer=int(read.split(".")[1]),
    )  # fmt: skip
    with pytest.raises(SAEError, match=rf"output_hook_name '{write}' runs before hook_name '{read}'"):
        evaluate_sae(model, build_sae(cfg), with_bos(2, 8, vocab=40), drop_tokens=[BOS])


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("tokens", "options", "match"),
    [
        (with_bos(1, 8, vocab=40)[0], {}, r"tokens must be a non-empty integer tensor \[n, seq\], got torch.int64 \[8"),
        (with_bos(2, 8, vocab=40).float(), {}, r"integer tensor \[n, seq\], got torch.float32 \[2, 8\]"),
        (torch.zeros(0, 8, dtype=torch.long), {}, r"non-empty integer tensor \[n, seq\], got torch.int64 \[0, 8\]"),
        ([[1, 2, 3]], {}, r"non-empty integer tensor \[n, seq\], got list"),
        (with_bos(2, 1, vocab=40), {}, r"at least 2 positions per sequence, got \[2, 1\]"),
        (with_bos(2, 8, vocab=40), {"attention_mask": torch.ones(2, 5)}, r"shape of tokens \[2, 8\], got \[2, 5\]"),
        (with_bos(2, 8, vocab=40), {"batch_size": 0}, r"batch_size must be a positive int"),
        (with_bos(2, 8, vocab=40), {"dense_threshold": "x"}, r"dense_threshold must lie in \(0, 1\]"),
    ],
)
def test_bad_tokens_masks_and_settings_are_named(tokens, options, match):
    sae = build_sae(config("blocks.0.hook_resid_post", 32, d_sae=16, k=4))
    with pytest.raises(SAEError, match=match):
        evaluate_sae(random_model(d_vocab=40), sae, tokens, **options)
