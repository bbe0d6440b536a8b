"""Ground truth: the synthetic dictionary draws what it says, matching finds known pairings, a TopK SAE
recovers a known dictionary (and a random one does not), and the language organism's latent variables are
labelled on the right tokens and scored with a correct AUROC."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechscope.sae.base import SAEConfig, SAEError, build_sae
from mechscope.sae.ground_truth import (
    SyntheticDictionary,
    auroc,
    best_f1,
    latent_alignment,
    match_features,
    token_labels,
)
from mechscope.sae.training import TrainSAEConfig, train_sae
from mechscope.toys.language import grammar
from mechscope.toys.language.evaluation import encode
from mechscope.toys.zoo import load

FAST = settings(max_examples=15, deadline=None)


# ---------------------------------------------------------------- the dictionary
@FAST
@given(n=st.integers(1, 40), d=st.integers(1, 24), seed=st.integers(0, 1000))
def test_features_are_unit_rows_fixed_by_the_seed(n, d, seed):
    features = SyntheticDictionary(n, d, seed=seed).features
    assert features.shape == (n, d)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(n))
    torch.testing.assert_close(SyntheticDictionary(n, d, seed=seed).features, features)


@FAST
@given(angle=st.floats(10, 50), seed=st.integers(0, 1000))
def test_min_angle_keeps_every_pair_of_lines_apart(angle, seed):
    features = SyntheticDictionary(12, 8, min_angle=angle, seed=seed).features
    overlap = (features @ features.T).abs() - torch.eye(12)
    assert float(overlap.max()) <= math.cos(math.radians(angle)) + 1e-5


def test_codes_make_the_activations_at_the_asked_rates():
    p = torch.linspace(0.02, 0.4, 10)
    dictionary = SyntheticDictionary(10, 6, firing_probability=p.tolist(), seed=3)
    n = 20_000
    x, codes = dictionary.sample(n, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, codes @ dictionary.features)
    assert bool((codes >= 0).all()) and bool((codes <= 1).all())
    rate = (codes > 0).float().mean(0)
    assert bool(((rate - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all())  # five binomial standard errors
    assert dictionary.expected_l0 == pytest.approx(float(p.sum()), rel=1e-6)


def test_exponential_magnitudes_have_mean_one():
    _, codes = SyntheticDictionary(4, 4, firing_probability=1.0, magnitudes="exponential").sample(40_000)
    assert float(codes.mean()) == pytest.approx(1.0, abs=5 / math.sqrt(codes.numel()))


def test_correlated_groups_fire_together_with_probability_rho():
    p, rho, n = 0.3, 0.8, 40_000
    dictionary = SyntheticDictionary(6, 4, firing_probability=p, correlated_groups=[(0, 1, 2)], rho=rho)
    fired = (dictionary.sample(n, torch.Generator().manual_seed(1))[1] > 0).float()
    tolerance = 5 / math.sqrt(n)
    assert bool(((fired.mean(0) - p).abs() < tolerance).all())  # marginals unchanged by the coupling
    assert float((fired[:, 0] * fired[:, 2]).mean()) == pytest.approx(rho * p + (1 - rho) * p * p, abs=tolerance)
    assert float((fired[:, 3] * fired[:, 4]).mean()) == pytest.approx(p * p, abs=tolerance)  # independent pair


def test_importance_decays_as_in_the_superposition_organism():
    torch.testing.assert_close(SyntheticDictionary(5, 3, importance_decay=0.5).importance(), 0.5 ** torch.arange(5.0))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n_features": 0}, "n_features"),
        ({"d_in": 2.5}, "d_in"),
        ({"firing_probability": 0.0}, "firing_probability"),
        ({"firing_probability": [0.1, 0.2]}, "firing_probability"),
        ({"importance_decay": 0.0}, "importance_decay"),
        ({"rho": 1.5}, "rho"),
        ({"correlated_groups": [(0, 1), (1, 2)]}, "correlated_groups"),
        ({"correlated_groups": [(0, 8)]}, "correlated_groups"),
        ({"magnitudes": "gaussian"}, "magnitudes"),
        ({"min_angle": 95}, "min_angle"),
        ({"n_features": 40, "d_in": 2, "min_angle": 80}, "min_angle"),
    ],
)
def test_bad_dictionaries_are_refused_by_name(kwargs, named):
    fields = {"n_features": 8, "d_in": 4, **kwargs}
    with pytest.raises(SAEError, match=named):
        SyntheticDictionary(**fields)


@pytest.mark.bad_input
def test_sample_refuses_a_non_positive_count():
    with pytest.raises(SAEError, match="n must be"):
        SyntheticDictionary(4, 4).sample(0)


# ---------------------------------------------------------------- matching
@FAST
@given(seed=st.integers(0, 10_000), extra=st.integers(0, 8))
def test_a_permuted_sign_flipped_noisy_copy_matches_its_features(seed, extra):
    truth = SyntheticDictionary(16, 12, seed=seed).features
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(16 + extra, generator=generator)
    signs = torch.where(torch.rand(16, 1, generator=generator) < 0.5, -1.0, 1.0)
    rows = torch.cat(
        [signs * truth + 0.05 * torch.randn(16, 12, generator=generator), torch.randn(extra, 12, generator=generator)]
    )
    decoder = torch.empty_like(rows)
    decoder[permutation] = rows  # true feature i sits at row permutation[i]
    matching = match_features(decoder, truth)
    assert torch.equal(matching.latent, permutation[:16])
    direct = torch.nn.functional.cosine_similarity(truth, decoder[permutation[:16]]).abs()
    torch.testing.assert_close(matching.cosine, direct)
    assert matching.mmcs == pytest.approx(float(direct.mean()))
    assert bool((matching.best_cosine >= matching.cosine - 1e-6).all())


@FAST
@given(seed=st.integers(0, 10_000))
def test_hungarian_matching_is_the_best_one_to_one_pairing(seed):
    generator = torch.Generator().manual_seed(seed)
    truth, decoder = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    sim = torch.nn.functional.cosine_similarity(truth[:, None], decoder[None], dim=-1).abs()
    best = max(sum(float(sim[i, j]) for i, j in enumerate(perm)) for perm in itertools.permutations(range(5)))
    assert match_features(decoder, truth).mmcs * 5 == pytest.approx(best, rel=1e-5)


def test_fewer_latents_than_features_leave_features_unmatched():
    truth = SyntheticDictionary(6, 6, seed=1).features
    matching = match_features(truth[[4, 1]], truth)
    assert matching.latent.tolist() == [-1, 1, -1, -1, 0, -1]
    assert matching.cosine.tolist() == pytest.approx([0, 1, 0, 0, 1, 0], abs=1e-6)
    assert matching.mmcs == pytest.approx(2 / 6, abs=1e-6)
    assert matching.recovered == pytest.approx(2 / 6)


@FAST
@given(decay=st.floats(0.3, 0.95), seed=st.integers(0, 1000))
def test_recovering_important_features_scores_higher_when_weighted(decay, seed):
    """Two decoders that each recover half of the features tie on the plain mean matched cosine, but the one
    holding the important half wins the importance-weighted one, by exactly the importance it holds."""
    dictionary = SyntheticDictionary(8, 8, importance_decay=decay, seed=seed)
    importance = decay ** torch.arange(8.0)
    important, unimportant = (dictionary.match(dictionary.features[half]) for half in (slice(0, 4), slice(4, 8)))
    assert important.mmcs == pytest.approx(unimportant.mmcs, abs=1e-6)
    assert important.weighted_mmcs > unimportant.weighted_mmcs
    assert important.weighted_mmcs == pytest.approx(float(importance[:4].sum() / importance.sum()), abs=1e-6)
    assert unimportant.weighted_mmcs == pytest.approx(float(importance[4:].sum() / importance.sum()), abs=1e-6)
    plain = match_features(dictionary.features[:4], dictionary.features)
    assert plain.weighted_mmcs == plain.mmcs  # no importance: every feature weighs the same


@pytest.mark.bad_input
@pytest.mark.parametrize("importance", [torch.ones(3), torch.zeros(4), torch.tensor([1.0, -1, 1, 1]), [1, 1, 1, 1]])
def test_matching_refuses_bad_importance_by_name(importance):
    truth = SyntheticDictionary(4, 4).features
    with pytest.raises(SAEError, match=r"importance must be a tensor of one finite weight >= 0 per true feature \(4"):
        match_features(truth, truth, importance=importance)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("decoder", "truth", "named"),
    [
        (torch.randn(4), torch.randn(3, 4), "decoder"),
        (torch.randn(4, 5), torch.randn(3, 4), "d_in"),
        (torch.randn(4, 4), torch.full((3, 4), math.nan), "truth"),
    ],
)
def test_matching_refuses_bad_shapes_by_name(decoder, truth, named):
    with pytest.raises(SAEError, match=named):
        match_features(decoder, truth)


# ---------------------------------------------------------------- recovery by a TopK SAE
def easy_dictionary() -> SyntheticDictionary:
    """32 features in 24 dimensions, 4 active on average: a random decoder of 48 rows matches it poorly
    (in 16 dimensions chance alone gives a mean matched cosine near 0.5)."""
    return SyntheticDictionary(32, 24, firing_probability=4 / 32, seed=7)


def topk_sae(dictionary: SyntheticDictionary, d_sae: int):
    k = round(dictionary.expected_l0)
    cfg = SAEConfig(dictionary.d_in, d_sae, "topk", "blocks.0.hook_resid_post", 0, k=k)
    return build_sae(cfg, seed=11)


def train(sae, batches, steps: int, batch: int, lr: float, out) -> None:
    config = TrainSAEConfig(
        total_tokens=steps * batch, batch_tokens=batch, lr=lr, log_every=steps, checkpoint_every=steps
    )
    train_sae(sae, batches, config, out, progress=False)


def test_a_trained_topk_sae_recovers_the_dictionary_and_a_random_one_does_not(tmp_path):
    dictionary = easy_dictionary()
    sae = topk_sae(dictionary, 48)
    assert match_features(sae.W_dec, dictionary.features).mmcs < 0.5
    train(sae, lambda step: dictionary.sample(1024, torch.Generator().manual_seed(step))[0], 1000, 1024, 3e-3, tmp_path)
    matching = match_features(sae.W_dec, dictionary.features)
    assert matching.mmcs >= 0.9
    assert matching.recovered >= 0.8


# ---------------------------------------------------------------- the language organism's latent variables
@pytest.fixture(scope="module")
def language():
    return load("language")


@pytest.fixture(scope="module")
def samples():
    rng = random.Random(5)
    return [grammar.sample(rng) for _ in range(200)]


def test_labels_sit_on_the_tokens_they_describe(language, samples):
    tokenizer = language.tokenizer
    names = {" " + name for name in grammar.NAMES}
    for sample in samples[:60]:
        ids = encode(tokenizer, [sample.text])[0][0]
        labels = token_labels(tokenizer, sample)
        words = [tokenizer.decode(int(i)) for i in ids]
        positions = {variable: holds.nonzero().flatten().tolist() for variable, (holds, _) in labels.items()}
        assert {words[p] for p in positions["name"]} <= names
        assert len(positions["name"]) == sum(word in names for word in words)
        for variable in ("ioi_subject", "ioi_end"):
            assert len(positions[variable]) == (sample.kind == "ioi")
        if sample.kind == "ioi":
            assert words[positions["ioi_subject"][0]] == " " + sample.subject
            assert "".join(words[1 : positions["ioi_end"][0] + 1]).strip() == sample.prompt
        if sample.kind == "copy":
            defined = labels["second_copy"][1].nonzero().flatten().tolist()
            half = len(defined) // 2
            assert words[defined[0] : defined[half - 1] + 1] == words[defined[half] : defined[-1] + 1]
        assert not any(labels[v][1][0] for v in labels)  # the BOS is never labelled


class NameDetector(torch.nn.Module):
    """A one-latent "SAE" on ``hook_embed`` firing exactly on name tokens' embeddings: alignment must be perfect."""

    def __init__(self, model) -> None:
        super().__init__()
        ids = [model.tokenizer.encode(" " + name)[0] for name in grammar.NAMES]
        self.names = torch.nn.Parameter(model.W_E[ids].detach().clone(), requires_grad=False)
        self.cfg = SimpleNamespace(d_in=model.cfg.d_model)

    def encode(self, x):
        return (x[:, None, :] == self.names).all(-1).any(-1, keepdim=True).float()


def test_a_perfect_name_latent_scores_one(language, samples):
    alignment = latent_alignment(language, NameDetector(language), "hook_embed", samples)
    assert alignment["name"].auroc == pytest.approx(1.0)
    assert alignment["name"].f1 == pytest.approx(1.0)
    assert alignment["ioi_end"].auroc < 0.9  # "to" is no name


@torch.no_grad()
def test_an_sae_on_a_per_head_hook_reads_the_heads_side_by_side(language, samples):
    """An SAE on attn.hook_z ([pos, head, d_head]) sees each token's heads flattened, as in evaluate_sae; its
    latents, recomputed one unpadded document at a time, give the same AUROCs."""
    hook = "blocks.0.attn.hook_z"
    d_in = language.cfg.n_heads * language.cfg.d_head
    sae = build_sae(SAEConfig(d_in, 32, "relu", hook, 0), seed=0).eval()
    few = samples[:30]
    alignment = latent_alignment(language, sae, hook, few)
    latents = []
    for sample in few:
        tokens, _ = encode(language.tokenizer, [sample.text])
        _, cache = language.run_with_cache(tokens, names_filter=[hook])
        latents.append(sae.encode(cache[hook][0].flatten(1)))
    latents = torch.cat(latents)
    labels = [token_labels(language.tokenizer, sample) for sample in few]
    assert alignment
    for variable, found in alignment.items():
        holds = torch.cat([label[variable][0] for label in labels])
        defined = torch.cat([label[variable][1] for label in labels])
        expected = auroc(latents[defined], holds[defined])
        assert found.auroc == pytest.approx(float(expected.max()), abs=1e-6)
        assert float(expected[found.latent]) == pytest.approx(found.auroc, abs=1e-6)


@pytest.mark.bad_input
def test_alignment_refuses_an_unknown_hook_and_no_samples(language, samples):
    sae = NameDetector(language)
    with pytest.raises(SAEError, match="hook_name"):
        latent_alignment(language, sae, "blocks.9.hook_resid_post", samples)
    with pytest.raises(SAEError, match="samples"):
        latent_alignment(language, sae, "hook_embed", [])


@FAST
@given(data=st.data())
def test_auroc_is_the_probability_a_positive_outranks_a_negative(data):
    n = data.draw(st.integers(2, 30))
    y = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if y.all() or not y.any():
        y[0] = ~y[0]
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=2 * n, max_size=2 * n)), dtype=torch.float32)
    scores = scores.view(n, 2)
    pos, neg = scores[y], scores[~y]
    pairwise = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    torch.testing.assert_close(auroc(scores, y), pairwise.mean((0, 1)))


@FAST
@given(data=st.data())
def test_best_f1_is_the_best_over_every_threshold(data):
    n = data.draw(st.integers(2, 30))
    y = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    y[0] = True
    score = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), dtype=torch.float32)
    f1s = []
    for t in score.unique():
        predicted = score >= t
        tp = float((predicted & y).sum())
        f1s.append(2 * tp / (float(predicted.sum()) + float(y.sum())))
    assert best_f1(score, y) == pytest.approx(max(f1s))


@torch.no_grad()
def resid_activations(model, rows: int) -> torch.Tensor:
    """blocks.1.hook_resid_post on packed training rows of the organism, shuffled once."""
    tokens = model.organism.batch(0, torch.Generator().manual_seed(0))[:rows]
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"], stop_at_layer=2)
    acts = cache["blocks.1.hook_resid_post"][:, 1:].flatten(0, 1)
    return acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))]


def test_a_trained_topk_sae_has_a_latent_for_the_repeated_subject(language, samples, tmp_path):
    """The repeated subject of an indirect-object prompt (S2) gets a latent of its own after brief training;
    the untrained SAE has none that sharp. ("Is a name" does not reach 0.9 here: see docs/sae.md.)"""
    hook = "blocks.1.hook_resid_post"
    cfg = SAEConfig(language.cfg.d_model, 256, "topk", hook, 1, k=16)
    sae, untrained = build_sae(cfg, seed=0), build_sae(cfg, seed=0)
    train(sae, resid_activations(language, 32), 300, 512, 2e-3, tmp_path)
    with torch.no_grad():
        trained, floor = (latent_alignment(language, s, hook, samples) for s in (sae, untrained))
    assert trained["ioi_subject"].auroc >= 0.95
    assert trained["ioi_subject"].f1 >= 0.8 > floor["ioi_subject"].f1
    assert (
        set(trained)
        == set(floor)
        == {"name", "repeated_name", "ioi_subject", "ioi_end"}
        | {
            "plural_subject",
            "singular_subject",
            "second_copy",
        }
    )
