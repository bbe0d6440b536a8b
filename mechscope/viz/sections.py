"""The standard views of a prompt, as sections of widgets that the report writes into a page
and the workbench sends to the browser: one function per question a person asks.

- :func:`prompt_sections`: what does the model predict, where does it attend, when does the
  answer appear (logit lens), which components write it (direct logit attribution), and which
  heads do a known job (previous-token, duplicate-token, induction)?
- :func:`activation_section`: how strongly does one activation fire on each token?
- :func:`patching_sections`: given a clean and a corrupted prompt, which activations carry the
  difference (activation patching), and how well does the linear estimate see it (attribution
  patching)?
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mechscope.analysis.attribution import AttributionError, direct_logit_attribution
from mechscope.analysis.heads import BUILT_IN, TemplateError, head_score_table, template_for
from mechscope.analysis.lens import logit_lens
from mechscope.interventions.attribution_patching import head_attribution, resid_attribution
from mechscope.interventions.metrics import LogitDiff, MetricError, normalised
from mechscope.interventions.patching import PatchingError
from mechscope.interventions.sweeps import RESID_HOOKS, head_sweep, resid_sweep
from mechscope.model.hooks import HookNameError
from mechscope.model.names import act_name
from mechscope.viz.attention import attention_patterns, attention_token_budget
from mechscope.viz.heatmaps import heatmap, logit_lens_heatmap, patching_heatmap
from mechscope.viz.html import Widget
from mechscope.viz.prompts import InputError, Prompt, read_prompt, same_length, single_token, top_predictions
from mechscope.viz.tables import attribution_bars, top_k_table
from mechscope.viz.tokens import colored_tokens

TOP_K = 5
SAME_ANSWER = "the answer and the wrong answer are the same token; the metric compares two different ones"
MOST_BARS = 40  # a per-head attribution of a large model has hundreds of bars; show the largest


@dataclass
class Section:
    """A titled group of widgets with a sentence on how to read them. ``facts`` are short
    findings in words; ``figures`` are plotly figures (the report shows them, the workbench not)."""

    id: str
    title: str
    description: str
    widgets: list[Widget] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    figures: list[Any] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "facts": list(self.facts),
            "widgets": [w.to_json() for w in self.widgets],
        }


# ------------------------------------------------------------------ one prompt


def prompt_sections(
    model: Any,
    prompt: str | Tensor,
    *,
    answer: str | int | None = None,
    wrong: str | int | None = None,
    labels: Sequence[str] | None = None,
    max_tokens: int | None = None,
) -> list[Section]:
    """Tokens and predictions, attention, logit lens, direct logit attribution and head
    detector scores for one prompt (text, or ids ``[pos]`` with optional display ``labels``)."""
    seen = read_prompt(model, prompt, max_tokens=max_tokens, labels=labels)
    answer_id = None if answer is None else single_token(model, answer, "answer")
    wrong_id = None if wrong is None else single_token(model, wrong, "wrong answer")
    if wrong_id is not None and wrong_id == answer_id:
        raise InputError(SAME_ANSWER)
    keep = min(seen.length, attention_token_budget(model.cfg.n_layers, model.cfg.n_heads))
    logits, patterns = run_keeping_attention(model, seen.ids, keep)
    if answer_id is None:  # attribute the model's own top prediction
        answer_id = int(logits[0, -1].argmax())
    return [
        tokens_section(seen, logits[0]),
        attention_section(seen, patterns),
        lens_section(model, seen, answer_id),
        attribution_section(model, seen, answer_id, wrong_id),
        heads_section(model, seen),
    ]


def run_keeping_attention(model: Any, ids: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """The logits, and every head's attention among the last ``keep`` tokens
    ``[layer, head, keep, keep]``: the rest of each pattern is never kept, so a long prompt on
    a large model costs no more memory than the page can show."""
    names = [act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
    kept: dict[int, Tensor] = {}

    def grab(pattern: Tensor, hook: Any) -> None:
        kept[hook.layer()] = pattern[0, :, -keep:, -keep:].float().cpu()

    with torch.inference_mode():
        logits = model.run_with_hooks(ids, fwd_hooks=[(names, grab)])
    return logits, torch.stack([kept[layer] for layer in range(model.cfg.n_layers)])


def tokens_section(seen: Prompt, logits: Tensor) -> Section:
    top_tokens, top_probs = top_predictions(logits, seen.decode, TOP_K)
    surprise = -logits.float().log_softmax(-1)[:-1].gather(-1, seen.ids[0, 1:, None])[:, 0].cpu()
    loss = torch.cat([torch.tensor([float("nan")]), surprise])  # the first token has no prediction
    return Section(
        "tokens",
        "Tokens and predictions",
        "Each token coloured by the model's loss on it (how surprised it was to see it; the first token has "
        "no prediction), then the likeliest next tokens after each position.",
        [
            colored_tokens(seen.labels, loss, label="loss (nats)", scale="sequential", title="Loss per token"),
            top_k_table(seen.labels, top_tokens, top_probs, title=f"Top {top_probs.shape[-1]} next tokens"),
        ],
        facts=[f"After the last token the model predicts {top_tokens[-1][0]!r} ({float(top_probs[-1, 0]):.1%})."],
    )


def attention_section(seen: Prompt, patterns: Tensor) -> Section:
    keep = patterns.shape[-1]
    cut = (
        f" The prompt has {seen.length} tokens; to keep the page light this view shows the last {keep}, so "
        "attention to earlier tokens is left out and a row may sum to less than 1."
        if keep < seen.length
        else ""
    )
    return Section(
        "attention",
        "Attention patterns",
        "One square per head (rows: layers), queries down and keys across. Hover a token to see where it "
        "attends (blue, earlier tokens) and what attends to it (orange, later tokens); click a head to select it."
        + cut,
        [attention_patterns(seen.labels[-keep:], patterns, first_position=seen.length - keep)],
    )


def lens_section(model: Any, seen: Prompt, answer_id: int) -> Section:
    result = logit_lens(model, seen.ids, answer=torch.tensor([answer_id]))
    where = first_top(result.rank[:, 0, -1].tolist(), result.labels)
    return Section(
        "logit-lens",
        "Logit lens",
        "What each layer's residual stream would predict if it were the last: the top next token and its "
        "probability, read through the model's final norm and unembedding.",
        [logit_lens_heatmap(result, seen.labels, seen.decode)],
        facts=[f"At the last position {seen.decode(answer_id)!r} is the lens' top prediction {where}."],
    )


def first_top(rank: list[int], labels: list[str]) -> str:
    """Where the lens' top prediction becomes the answer and stays, in words."""
    layer = len(rank)
    while layer > 0 and rank[layer - 1] == 0:
        layer -= 1
    if layer == len(rank):
        return "at no layer"
    if labels[layer] == "final_post":
        return "only at the final layer"
    if layer == 0:
        return "the embeddings on"
    return f"layer {layer - 1}'s output on"


def attribution_section(model: Any, seen: Prompt, answer_id: int, wrong_id: int | None) -> Section:
    target = f"logit({seen.decode(answer_id)!r})"
    if wrong_id is not None:
        target += f" − logit({seen.decode(wrong_id)!r})"
    try:
        attribution = direct_logit_attribution(model, seen.ids, answer_id, wrong_id, by="head")
    except AttributionError:  # post-norm models have no per-head split of the final norm
        attribution = direct_logit_attribution(model, seen.ids, answer_id, wrong_id, by="component")
    widgets = [
        attribution_bars(
            attribution,
            batch=0,
            top=MOST_BARS,
            title=f"Direct logit attribution of {target}",
            value_label="logit" if wrong_id is None else "logit difference",
        ),
    ]
    if attribution.by == "head":
        grid = attribution.heads()[..., 0]
        widgets.append(
            patching_heatmap(
                grid,
                cols=head_labels(grid),
                title="Per head",
                metric="logit contribution",
                x_label="head",
            )
        )
    return Section(
        "attribution",
        "Direct logit attribution",
        f"How much each component writes {target} directly into the final residual stream at the last position "
        "(the parts sum to the model's value, plus the norm's constant).",
        widgets,
        facts=[
            f"The model's value is {float(attribution.total[0]):.3f}; the largest direct writer is "
            f"{attribution.top(1)[0][0]}."
        ],
    )


def heads_section(model: Any, seen: Prompt) -> Section:
    """Detector scores read off this prompt; a detector whose template is empty here (no
    repeated token, say) is left out and named, rather than shown as zeros."""
    usable = [d for d in BUILT_IN if has_template(d, seen.ids)]
    scores = head_score_table(model, usable, seen.ids) if usable else {}
    widgets = [
        heatmap(
            score,
            rows=layer_labels(score),
            cols=head_labels(score),
            title=name.replace("_", "-") + " score",
            x_label="head",
            y_label="layer",
            value_label="share of attention on the template",
            scale="sequential",
            zmin=0.0,
            zmax=1.0,
        )
        for name, score in scores.items()
    ]
    missing = [d.replace("_", "-") for d in BUILT_IN if d not in scores]
    note = f" This prompt has no repeated token, so {' and '.join(missing)} scores are not shown." if missing else ""
    return Section(
        "heads",
        "Head detectors",
        "The share of each head's attention that falls where a known kind of head attends (a perfect head scores "
        "1), averaged over the queries where that kind of head has somewhere to attend." + note,
        widgets,
    )


def has_template(detector: str, ids: Tensor) -> bool:
    try:
        template_for(detector, ids, None)
    except TemplateError:  # nowhere to attend on this prompt
        return False
    return True


def layer_labels(grid: Tensor) -> list[str]:
    return [f"L{layer}" for layer in range(grid.shape[0])]


def head_labels(grid: Tensor) -> list[str]:
    return [f"H{head}" for head in range(grid.shape[1])]


# ------------------------------------------------------------------ one activation


def activation_section(
    model: Any,
    prompt: str | Tensor,
    hook: str,
    index: int | None = None,
    *,
    labels: Sequence[str] | None = None,
    max_tokens: int | None = None,
) -> Section:
    """Each token coloured by one activation at ``hook``: entry ``index`` of the per-position
    vector (a neuron, a residual direction), or the vector's norm when ``index`` is None."""
    seen = read_prompt(model, prompt, max_tokens=max_tokens, labels=labels)
    try:
        with torch.inference_mode():
            _, cache = model.run_with_cache(seen.ids, names_filter=[hook])  # logits: ln_final's hooks run too
    except HookNameError as error:
        raise InputError(str(error.args[0] if error.args else error)) from None
    activation = cache[hook][0]
    if activation.shape[0] != seen.length or hook.endswith(("hook_pattern", "hook_attn_scores")):
        raise InputError(
            f"{hook} is not one vector per position (shape {tuple(activation.shape)}); "
            "choose a residual, MLP or per-head hook, or see the attention view"
        )
    flat = activation.reshape(seen.length, -1).float()
    if index is None:
        values, label = flat.norm(dim=-1), " norm"
    elif not 0 <= index < flat.shape[1]:
        raise InputError(
            f"index {index} is out of range: {hook} has {flat.shape[1]} values per position (0..{flat.shape[1] - 1})"
        )
    else:
        values, label = flat[:, index], f"[{index}]"
    return Section(
        "activation",
        f"{hook}{label if index is not None else ' (norm)'}",
        "Each token coloured by this activation's value there; hover a token for the number.",
        [colored_tokens(seen.labels, values, label=f"{hook}{label}", title=f"{hook}{label}")],
    )


# ------------------------------------------------------------------ clean vs corrupted


def patching_sections(
    model: Any,
    clean: str | Tensor,
    corrupted: str | Tensor,
    *,
    answer: str | int,
    wrong: str | int,
    hook: str = "resid_pre",
    labels: Sequence[str] | None = None,
    progress: Callable[[float], None] | None = None,
    max_tokens: int | None = None,
) -> list[Section]:
    """Activation patching (clean into corrupted, one activation at a time) of every layer ×
    position of ``hook`` and of every head's output, and the attribution-patching estimates of
    both, all on ``logit(answer) − logit(wrong)`` normalised so the corrupted run scores 0 and
    the clean run 1."""
    if hook not in RESID_HOOKS:
        raise InputError(f"hook must be one of {', '.join(RESID_HOOKS)}; got {hook!r}")
    seen = read_prompt(model, clean, what="clean prompt", max_tokens=max_tokens, labels=labels)
    other = read_prompt(model, corrupted, what="corrupted prompt", max_tokens=max_tokens, labels=labels)
    same_length(seen, other)
    answer_id, wrong_id = single_token(model, answer, "answer"), single_token(model, wrong, "wrong answer")
    if answer_id == wrong_id:
        raise InputError(SAME_ANSWER)
    base = LogitDiff(answer=answer_id, wrong=wrong_id)
    with torch.inference_mode():
        clean_logits, corrupted_logits = model(seen.ids), model(other.ids)
    try:
        metric = normalised(base, clean_logits, corrupted_logits)
    except MetricError:
        metric = None
    if metric is None or indistinct(metric.clean, metric.corrupted):
        raise InputError(
            "the clean and corrupted prompts give the same logit difference (to within "
            f"{RESOLUTION:g} of its size), so there is nothing to restore and normalising by the gap would "
            "magnify noise; change the corrupted prompt"
        )
    steps = Progress(progress, [model.cfg.n_layers * seen.length, model.cfg.n_layers * model.cfg.n_heads])
    try:
        resid = resid_sweep(model, seen.ids, other.ids, metric, hook, progress=steps.part(0))
        heads = head_sweep(model, seen.ids, other.ids, metric, "z", progress=steps.part(1))
        resid_estimate = resid_attribution(model, seen.ids, other.ids, metric, hook)
        heads_estimate = head_attribution(model, seen.ids, other.ids, metric, "z")
    except PatchingError as error:
        raise InputError(str(error)) from None
    resid_limit, heads_limit = scale_of(resid, resid_estimate), scale_of(heads, heads_estimate)
    scale = f"normalised logit difference ({metric.clean:.2f} clean, {metric.corrupted:.2f} corrupted)"
    columns = list(seen.labels)
    head_columns = head_labels(heads)
    return [
        Section(
            "patching",
            "Activation patching",
            "Each cell runs the corrupted prompt with one activation copied from the clean run: 1 means that "
            "activation alone restores the clean answer, 0 that it does nothing.",
            [
                patching_heatmap(
                    resid, cols=columns, title=f"{hook}, layer × position", metric=scale, limit=resid_limit
                ),
                patching_heatmap(
                    heads,
                    cols=head_columns,
                    title="Head outputs (z), all positions",
                    metric=scale,
                    x_label="head",
                    limit=heads_limit,
                ),
            ],
            facts=[
                f"Clean {seen.decode(base.answer.item())!r} − {seen.decode(base.wrong.item())!r}: "
                f"{metric.clean:.3f}; corrupted: {metric.corrupted:.3f}.",
                strongest(heads, "head"),
            ],
        ),
        Section(
            "attribution-patching",
            "Attribution patching",
            "The same maps estimated from one backward pass (a first-order Taylor expansion). It is fast and "
            "usually close, but misses effects that pass through a saturated softmax.",
            [
                patching_heatmap(
                    resid_estimate,
                    cols=columns,
                    title=f"{hook}, layer × position (estimate)",
                    metric=scale,
                    limit=resid_limit,
                ),
                patching_heatmap(
                    heads_estimate,
                    cols=head_columns,
                    title="Head outputs (estimate)",
                    metric=scale,
                    x_label="head",
                    limit=heads_limit,
                ),
            ],
            facts=[
                f"Correlation with exact patching: {correlation(resid, resid_estimate):.3f} ({hook}), "
                f"{correlation(heads, heads_estimate):.3f} (heads).",
                f"Largest gap between estimate and exact value: {gap(resid, resid_estimate):.3f} ({hook}), "
                f"{gap(heads, heads_estimate):.3f} (heads); each estimate shares its exact map's colour scale.",
            ],
        ),
    ]


RESOLUTION = 1e-3  # the smallest clean-corrupted gap, relative to the values, worth normalising by


def indistinct(clean: float, corrupted: float) -> bool:
    """Whether two metric values are too close for (x − corrupted) / (clean − corrupted) to mean anything."""
    return abs(clean - corrupted) < RESOLUTION * max(1.0, abs(clean), abs(corrupted))


def strongest(values: Tensor, what: str) -> str:
    layer, other = divmod(int(values.abs().argmax()), values.shape[1])
    return f"The strongest single {what} is L{layer}H{other}: {float(values[layer, other]):.3f}."


def scale_of(*maps: Tensor) -> float | None:
    """One symmetric colour limit for maps to be compared: the largest magnitude among them."""
    largest = max(float(m.abs().max()) for m in maps)
    return largest if largest > 0 and torch.isfinite(torch.tensor(largest)) else None


def gap(exact: Tensor, estimate: Tensor) -> float:
    return float((exact.float() - estimate.float()).abs().max())


def correlation(exact: Tensor, estimate: Tensor) -> float:
    pair = torch.stack([exact.flatten().float(), estimate.flatten().float()])
    value = torch.corrcoef(pair)[0, 1]
    return float(value) if torch.isfinite(value) else float("nan")


class Progress:
    """Maps each sweep's (passes done, passes in all) onto one fraction for the whole job,
    weighting each sweep by its number of patches."""

    def __init__(self, report: Callable[[float], None] | None, sizes: list[int]) -> None:
        self.report, self.sizes = report, sizes

    def part(self, index: int) -> Callable[[int, int], None] | bool:
        if self.report is None:
            return False
        before, total = sum(self.sizes[:index]), sum(self.sizes)

        def update(done: int, passes: int) -> None:
            self.report((before + self.sizes[index] * done / max(passes, 1)) / total)

        return update
