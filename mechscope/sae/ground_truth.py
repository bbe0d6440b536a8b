"""Ground truth for sparse autoencoders: data whose true features are known, and scores against them.

Two checks. :class:`SyntheticDictionary` draws activations as sparse non-negative combinations of a
known unit-norm dictionary (as in the toy models of superposition: sparse, with importance and
correlated groups); :func:`match_features` pairs an SAE's decoder rows one-to-one with the true
features (Hungarian matching on |cosine|) and reports how many came back, and how well the important
ones did (:meth:`SyntheticDictionary.match` weighs each by its importance). On the synthetic-language
organism the generator knows its latent variables (which token is a name, which name is the repeated
subject...), so :func:`latent_alignment` asks, per variable, how well the best single SAE latent
separates the tokens where it holds from those where it does not (AUROC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata
from torch import Tensor

from mechscope.sae.base import SAEError
from mechscope.toys.language import grammar
from mechscope.toys.language.evaluation import encode
from mechscope.toys.language.grammar import Sample

RECOVERED_COSINE = 0.9  # a true feature counts as recovered when its matched latent is this close
MAX_ANGLE_TRIES = 1000  # candidate directions drawn per feature before a minimum angle is declared impossible


# ---------------------------------------------------------------- a known dictionary
@dataclass
class SyntheticDictionary:
    """Activations ``x = Σ_i c_i f_i`` over known unit features ``f_i`` with sparse non-negative codes ``c``.

    Feature ``i`` fires with probability ``firing_probability`` (a float, or one per feature), at a
    magnitude uniform on [0, 1] or exponential with mean 1. Features in one of ``correlated_groups``
    share a single draw with probability ``rho`` (so they fire together) and draw alone otherwise; each
    feature's own firing probability is the same either way. ``importance_decay`` gives feature ``i``
    the weight ``decay**i``, as in the superposition organism: the SAE never sees it, but :meth:`match`
    scores a decoder by its importance-weighted mean matched cosine.
    """

    n_features: int
    d_in: int
    firing_probability: float | Sequence[float] = 0.05
    importance_decay: float = 1.0
    correlated_groups: Sequence[Sequence[int]] = ()
    rho: float = 0.0
    magnitudes: Literal["uniform", "exponential"] = "uniform"
    min_angle: float | None = None  # degrees between any two features' lines (|cosine| <= cos(min_angle))
    seed: int = 0
    features: Float[Tensor, "feature d_in"] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("n_features", "d_in"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SAEError(f"SyntheticDictionary.{name} must be a positive integer, got {value!r}")
        self.firing_probability = self.probabilities().tolist()
        if not 0 < self.importance_decay <= 1:
            raise SAEError(f"SyntheticDictionary.importance_decay must lie in (0, 1], got {self.importance_decay!r}")
        if not 0 <= self.rho <= 1:
            raise SAEError(f"SyntheticDictionary.rho must lie in [0, 1], got {self.rho!r}")
        if self.magnitudes not in ("uniform", "exponential"):
            raise SAEError(
                f"SyntheticDictionary.magnitudes must be 'uniform' or 'exponential', got {self.magnitudes!r}"
            )
        self.correlated_groups = check_groups(self.correlated_groups, self.n_features)
        self.features = random_features(self.n_features, self.d_in, self.min_angle, self.seed)

    def probabilities(self) -> Float[Tensor, " feature"]:
        """Each feature's firing probability, checked to lie in (0, 1]."""
        p = torch.as_tensor(self.firing_probability, dtype=torch.float32).flatten()
        if p.numel() == 1:
            p = p.expand(self.n_features).clone()
        if p.numel() != self.n_features or not bool(((p > 0) & (p <= 1)).all()):
            raise SAEError(
                f"SyntheticDictionary.firing_probability must be one value or {self.n_features} values "
                f"(n_features), each in (0, 1]; got {self.firing_probability!r}"
            )
        return p

    def importance(self) -> Float[Tensor, " feature"]:
        """Feature i matters ``decay**i`` as much as feature 0 (parity with the superposition organism)."""
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)

    def match(self, decoder: Float[Tensor, "d_sae d_in"], threshold: float = RECOVERED_COSINE) -> Matching:
        """``decoder`` matched to these features, with ``weighted_mmcs`` weighing each by its importance."""
        return match_features(decoder, self.features, threshold, importance=self.importance())

    @property
    def expected_l0(self) -> float:
        """The mean number of features firing per example: the natural k for a TopK SAE."""
        return float(self.probabilities().sum())

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Float[Tensor, "n d_in"], Float[Tensor, "n feature"]]:
        """``n`` activations and the codes that made them (``activations = codes @ features``)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SAEError(f"n must be a positive integer, got {n!r}")
        generator = torch.Generator().manual_seed(self.seed + 1) if generator is None else generator
        fired = self.firing(n, generator)
        if self.magnitudes == "uniform":
            size = torch.rand(n, self.n_features, generator=generator)
        else:
            size = -torch.log1p(-torch.rand(n, self.n_features, generator=generator))  # Exp(1) by inversion
        codes = size * fired
        return codes @ self.features, codes

    def firing(self, n: int, generator: torch.Generator) -> Bool[Tensor, "n feature"]:
        """Which features fire: uniform draws below each probability, shared within a group when coupled."""
        draws = torch.rand(n, self.n_features, generator=generator)
        for group in self.correlated_groups:
            shared = torch.rand(n, 1, generator=generator)
            coupled = torch.rand(n, 1, generator=generator) < self.rho
            index = list(group)
            draws[:, index] = torch.where(coupled, shared, draws[:, index])
        return draws < self.probabilities()


def check_groups(groups: Sequence[Sequence[int]], n_features: int) -> tuple[tuple[int, ...], ...]:
    """Disjoint groups of valid feature indices, as tuples."""
    seen: set[int] = set()
    out = []
    for group in groups:
        members = tuple(int(i) for i in group)
        bad = [i for i in members if not 0 <= i < n_features or i in seen or members.count(i) > 1]
        if bad:
            raise SAEError(
                f"SyntheticDictionary.correlated_groups must be disjoint groups of indices in [0, {n_features}) "
                f"(n_features); {bad} in group {members} is out of range or repeated"
            )
        seen.update(members)
        out.append(members)
    return tuple(out)


def random_features(n: int, d: int, min_angle: float | None, seed: int) -> Float[Tensor, "n d"]:
    """``n`` random unit vectors in ``d`` dimensions; with ``min_angle`` every pair's lines are at least
    that many degrees apart (drawn greedily: each candidate is kept only if far enough from those kept)."""
    generator = torch.Generator().manual_seed(seed)
    if min_angle is None:
        return unit(torch.randn(n, d, generator=generator))
    if not 0 < min_angle <= 90:
        raise SAEError(f"SyntheticDictionary.min_angle must lie in (0, 90] degrees, got {min_angle!r}")
    limit = math.cos(math.radians(min_angle)) + 1e-6
    kept: list[Tensor] = []
    for _ in range(n * MAX_ANGLE_TRIES):
        candidate = unit(torch.randn(d, generator=generator))
        if all(abs(float(candidate @ other)) <= limit for other in kept):
            kept.append(candidate)
            if len(kept) == n:
                return torch.stack(kept)
    raise SAEError(
        f"SyntheticDictionary.min_angle={min_angle} degrees: found only {len(kept)} of {n} features (n_features) "
        f"that far apart in d_in={d} dimensions; lower min_angle or raise d_in"
    )


def unit(x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# ---------------------------------------------------------------- matching a decoder to the truth
@dataclass
class Matching:
    """A one-to-one pairing of true features with SAE latents, and how close each pair is."""

    latent: Tensor  # [feature] long: the latent matched to each true feature (-1: none left, d_sae < n_features)
    cosine: Float[Tensor, " feature"]  # |cosine| of each matched pair (0 where unmatched)
    best_cosine: Float[Tensor, " feature"]  # each true feature's best |cosine| over all latents, matched or not
    mmcs: float  # mean matched |cosine| over the true features
    weighted_mmcs: float  # the same mean weighted by each feature's importance (= mmcs without importance)
    recovered: float  # fraction of true features whose matched |cosine| exceeds the threshold
    threshold: float = RECOVERED_COSINE


def cosines(decoder: Float[Tensor, "d_sae d_in"], truth: Float[Tensor, "feature d_in"]) -> Tensor:
    """|cosine| between every true feature and every decoder row: [feature, d_sae]."""
    return (unit(truth.detach().float()) @ unit(decoder.detach().float()).T).abs()


def match_features(
    decoder: Float[Tensor, "d_sae d_in"],
    truth: Float[Tensor, "feature d_in"],
    threshold: float = RECOVERED_COSINE,
    importance: Float[Tensor, " feature"] | None = None,
) -> Matching:
    """Hungarian matching of decoder rows to true features on |cosine| (a sign flip is the same feature);
    ``importance`` (one non-negative weight per true feature) weighs them in ``weighted_mmcs``."""
    check_matrix("decoder", decoder)
    check_matrix("truth", truth)
    weights = checked_importance(importance, truth.shape[0])
    if decoder.shape[1] != truth.shape[1]:
        raise SAEError(
            f"decoder rows have {decoder.shape[1]} dimensions but truth rows have {truth.shape[1]}: "
            "both must be [*, d_in] with the same d_in"
        )
    sim = cosines(decoder, truth).cpu()
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    latent = torch.full((truth.shape[0],), -1, dtype=torch.long)
    cosine = torch.zeros(truth.shape[0])
    latent[rows] = torch.as_tensor(cols, dtype=torch.long)
    cosine[rows] = sim[rows, cols]
    return Matching(
        latent=latent,
        cosine=cosine,
        best_cosine=sim.max(dim=1).values,
        mmcs=float(cosine.mean()),
        weighted_mmcs=float((weights * cosine).sum() / weights.sum()),
        recovered=float((cosine > threshold).float().mean()),
        threshold=threshold,
    )


def checked_importance(importance: Any, n_features: int) -> Float[Tensor, " feature"]:
    """One finite weight >= 0 per true feature, not all zero (none given: all equal)."""
    if importance is None:
        return torch.ones(n_features)
    weights = importance.detach().float().cpu() if isinstance(importance, Tensor) else torch.zeros(0)
    if weights.shape != (n_features,) or not bool((weights >= 0).all()) or not 0 < float(weights.sum()) < math.inf:
        raise SAEError(
            f"importance must be a tensor of one finite weight >= 0 per true feature ({n_features}, the rows of "
            f"truth), not all zero; got {importance!r}"
        )
    return weights


def check_matrix(name: str, x: Any) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or 0 in x.shape:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SAEError(f"{name} must be a non-empty 2-d tensor [rows, d_in], got {shape}")
    if not bool(torch.isfinite(x).all()):
        raise SAEError(f"{name} holds NaN or infinite values")


# ---------------------------------------------------------------- the language organism's latent variables
# A variable labels token positions of one document (position 0 is the BOS): the positions where it
# holds, and the positions where it is defined at all (None: every real token after the BOS).
Labels = tuple[list[int], list[int] | None]


def name_positions(sample: Sample, at: Callable[[int], int]) -> list[tuple[str, int]]:
    """Every name token in the document, in order: (name, position)."""
    found = [
        (offset, name) for name in grammar.names_in(sample.text) for offset in grammar.word_offsets(sample.text, name)
    ]
    return [(name, at(offset)) for offset, name in sorted(found)]


def is_name(sample: Sample, at: Callable[[int], int]) -> Labels:
    """This token is a person's name."""
    return [position for _, position in name_positions(sample, at)], None


def is_repeated_name(sample: Sample, at: Callable[[int], int]) -> Labels:
    """This token is a name already named earlier in the document."""
    seen: set[str] = set()
    positives = []
    for name, position in name_positions(sample, at):
        if name in seen:
            positives.append(position)
        seen.add(name)
    return positives, None


def is_ioi_subject(sample: Sample, at: Callable[[int], int]) -> Labels:
    """This token is the second mention of the subject in an indirect-object prompt (S2: the giver)."""
    if sample.kind != "ioi":
        return [], None
    return [at(grammar.word_offsets(sample.prompt, sample.subject)[1])], None


def is_ioi_end(sample: Sample, at: Callable[[int], int]) -> Labels:
    """This token ends an indirect-object prompt: the next token is the indirect object."""
    return ([at(len(sample.prompt) - 1)] if sample.kind == "ioi" else []), None


def subject_number(plural: bool) -> Callable[[Sample, Callable[[int], int]], Labels]:
    """The agreement subject is plural (or singular), on the prompt tokens after its first word and up
    to the verb: where the model must carry the number forward."""

    def labels(sample: Sample, at: Callable[[int], int]) -> Labels:
        if sample.kind != "agreement":
            return [], []
        domain = list(range(at(0) + 1, at(len(sample.prompt) - 1) + 1))
        return (domain if (sample.number == "plural") == plural else []), domain

    return labels


def is_second_copy(sample: Sample, at: Callable[[int], int]) -> Labels:
    """Among the words of a copied list, this one is in the second copy (predictable by induction)."""
    if sample.kind != "copy":
        return [], []
    length = len(" ".join(sample.words))
    first, second = (range(at(start), at(start + length - 1) + 1) for start in sample.copy_offsets)
    return list(second), list(first) + list(second)


VARIABLES: dict[str, Callable[[Sample, Callable[[int], int]], Labels]] = {
    "name": is_name,
    "repeated_name": is_repeated_name,
    "ioi_subject": is_ioi_subject,
    "ioi_end": is_ioi_end,
    "plural_subject": subject_number(True),
    "singular_subject": subject_number(False),
    "second_copy": is_second_copy,
}


def token_labels(tokenizer: Any, sample: Sample) -> dict[str, tuple[Tensor, Tensor]]:
    """Per variable, (holds, defined) boolean masks over the document's BOS + tokens."""
    encoding = tokenizer(sample.text, add_special_tokens=False)
    length = len(encoding["input_ids"]) + 1

    def at(offset: int) -> int:
        return encoding.char_to_token(offset) + 1  # +1: the BOS in front

    out = {}
    for variable, labels in VARIABLES.items():
        positives, domain = labels(sample, at)
        defined = torch.zeros(length, dtype=torch.bool)
        defined[1:] = domain is None
        if domain is not None:
            defined[domain] = True
        holds = torch.zeros(length, dtype=torch.bool)
        holds[positives] = True
        out[variable] = (holds, defined)
    return out


@dataclass
class Alignment:
    """How well the best single SAE latent picks out the tokens where one latent variable holds."""

    variable: str
    latent: int  # the SAE latent with the highest AUROC
    auroc: float  # P(latent higher on a positive token than on a negative one), ties counting half
    f1: float  # that latent's F1 at its best threshold
    n_positive: int
    n_negative: int


def latent_alignment(
    model: Any, sae: Any, hook_name: str, samples: Sequence[Sample], *, batch_size: int = 64
) -> dict[str, Alignment]:
    """For each latent variable of the language generator, the SAE latent that best separates the tokens
    where it holds from those where it does not (variables with no positive or no negative token are left out)."""
    if not samples:
        raise SAEError("samples must hold at least one grammar.Sample")
    latents = sae_latents(model, sae, hook_name, samples, batch_size)
    labels = [token_labels(model.tokenizer, sample) for sample in samples]
    n_labelled = sum(len(label["name"][0]) for label in labels)
    if n_labelled != len(latents):  # the tokenizer's encoding and the model's tokens disagree
        raise SAEError(f"labelled {n_labelled} token positions but the model saw {len(latents)}")
    out = {}
    for variable in VARIABLES:
        holds = torch.cat([label[variable][0] for label in labels])
        defined = torch.cat([label[variable][1] for label in labels])
        y = holds[defined]
        if y.all() or not y.any():
            continue
        scores = latents[defined]
        aurocs = auroc(scores, y)
        best = int(aurocs.argmax())
        out[variable] = Alignment(
            variable, best, float(aurocs[best]), best_f1(scores[:, best], y), int(y.sum()), int((~y).sum())
        )
    return out


@torch.no_grad()
def sae_latents(
    model: Any, sae: Any, hook_name: str, samples: Sequence[Sample], batch_size: int
) -> Float[Tensor, "token d_sae"]:
    """The SAE's latents on every real token (BOS included) of every sample, documents one after another."""
    if hook_name not in model.hook_dict:
        raise SAEError(f"hook_name {hook_name!r} is not a hook point of the model (e.g. 'blocks.1.hook_resid_post')")
    stop = model.hook_dict[hook_name].layer() + 1 if hook_name.startswith("blocks.") else None
    device = next(sae.parameters()).device
    rows = []
    for start in range(0, len(samples), batch_size):
        tokens, mask = encode(model.tokenizer, [s.text for s in samples[start : start + batch_size]])
        device_model = model.W_E.device
        _, cache = model.run_with_cache(
            tokens.to(device_model), attention_mask=mask.to(device_model), names_filter=[hook_name], stop_at_layer=stop
        )
        acts = cache[hook_name][mask.bool().to(device_model)].flatten(1)  # per-head hooks: heads side by side
        if acts.shape[-1] != sae.cfg.d_in:
            raise SAEError(f"{hook_name} has width {acts.shape[-1]} but the SAE reads d_in={sae.cfg.d_in}")
        rows.append(sae.encode(acts.to(device)).float().cpu())
    return torch.cat(rows)


def auroc(scores: Float[Tensor, "token latent"], y: Bool[Tensor, " token"]) -> Float[Tensor, " latent"]:
    """Each column's area under the ROC curve for ``y`` (Mann-Whitney: mean rank of the positives)."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    out = []
    for chunk in scores.split(256, dim=1):  # ranks in float64: bound the memory by columns
        ranks = torch.from_numpy(rankdata(chunk.numpy(), axis=0))
        out.append((ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return torch.cat(out).float()


def best_f1(score: Float[Tensor, " token"], y: Bool[Tensor, " token"]) -> float:
    """The F1 of ``score >= t`` at the best threshold ``t`` (every distinct score tried)."""
    order = score.argsort(descending=True)
    sorted_score, sorted_y = score[order], y[order].float()
    true_positives = sorted_y.cumsum(0)
    predicted = torch.arange(1, len(score) + 1, dtype=torch.float32)
    cut = torch.ones(len(score), dtype=torch.bool)  # a threshold can only fall between distinct scores
    cut[:-1] = sorted_score[:-1] != sorted_score[1:]
    f1 = 2 * true_positives / (predicted + y.sum())
    return float(f1[cut].max())
