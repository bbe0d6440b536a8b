"""The synthetic-language organism: a small transformer trained on template stories.

The model reads documents from :mod:`~mechscope.toys.language.grammar`, tokenized by a BPE
trained on the same language (:mod:`~mechscope.toys.language.tokenizer`), packed into rows that
each start at a document boundary: ``<|endoftext|> doc <|endoftext|> doc ...``. It learns the
indirect-object task well enough to solve it for names it never saw in that task (held-out
names), and grows induction heads from the copied word lists.

The tokenizer is part of the model: it is trained from ``tokenizer_seed`` when the model is
built, saved beside the weights, and loaded from there with ``AutoTokenizer``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.loading.pretrained import Model
from mechscope.model.config import ModelConfig
from mechscope.model.transformer import next_token_loss
from mechscope.toys.heads import add_head_findings, attention_scores
from mechscope.toys.language import evaluation, grammar
from mechscope.toys.language.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from mechscope.toys.organism import Findings, Organism
from mechscope.toys.training import TrainConfig

EVAL_SEED = 2024  # fixed, so evaluate() is deterministic and every run is scored on the same prompts
N_EVAL = 256
INDUCTION_LENGTH = 10  # words per copy: within the 3-12 of the training lists


@dataclass
class SyntheticLanguage(Organism):
    name = "language"
    summary = "3-layer transformer on template stories: indirect objects on held-out names, induction heads"

    tokenizer_seed: int = 0  # the corpus the BPE tokenizer is trained on
    vocab_size: int = 768  # the BPE's upper bound; the trained vocabulary may be smaller
    n_layers: int = 3
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.n_layers <= 4:
            raise ValueError(f"n_layers must be between 1 and 4 for a CPU-sized organism, got {self.n_layers}")
        if self.n_ctx < 64:
            raise ValueError(f"n_ctx must be at least 64 (the longest documents are ~45 tokens), got {self.n_ctx}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        self._tokenizer: Any = None

    # ------------------------------------------------------------ the tokenizer is part of the model
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.tokenizer_seed, self.vocab_size)
        return self._tokenizer

    def save_assets(self, directory: Path) -> None:
        save_tokenizer(self.tokenizer, directory)

    def load_model(self, state: dict[str, torch.Tensor], directory: Path) -> Model:
        self._tokenizer = load_tokenizer(directory)
        model = Model(self.model_config(), self._tokenizer)
        model.load_state_dict(state)
        return model.eval()

    # ------------------------------------------------------------ model and recipe
    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=2000,
            lr=3e-3,
            weight_decay=0.05,
            warmup_steps=100,
            schedule="cosine",
            final_lr_fraction=0.05,
            log_every=10,
            eval_every=50,
            checkpoint_every=250,
        )

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_mlp=self.d_mlp,
            d_vocab=len(self.tokenizer),
            n_ctx=self.n_ctx,
            act_fn="gelu_new",
            tokenizer_name="mechscope/language",
        )

    def build_model(self) -> Model:
        return Model(self.model_config(), self.tokenizer)

    # ------------------------------------------------------------ data
    def batch(self, step: int, generator: torch.Generator) -> Int[Tensor, "batch pos"]:
        """Rows of whole documents, each row starting at a document boundary, cut at ``n_ctx``."""
        rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
        return torch.tensor([self.packed_row(rng) for _ in range(self.batch_size)])

    def packed_row(self, rng: random.Random) -> list[int]:
        """``<|endoftext|> doc <|endoftext|> doc ...`` until ``n_ctx`` tokens (documents drawn and
        tokenized ``n_ctx // 8`` at a time; those left over are dropped)."""
        eos, row = self.tokenizer.eos_token_id, []
        while len(row) < self.n_ctx:
            texts = [grammar.sample(rng).text for _ in range(self.n_ctx // 8)]
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                row += [eos, *ids]
                if len(row) >= self.n_ctx:
                    break
        return row[: self.n_ctx]

    def loss(self, model: Model, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        return next_token_loss(model(batch), batch), {}

    # ------------------------------------------------------------ measurements
    def evaluate(self, model: Model) -> dict[str, float]:
        """Indirect objects on held-out and training names, agreement, induction on repeated words."""
        held_out = evaluation.ioi_metrics(model, evaluation.ioi_samples("held_out", N_EVAL, EVAL_SEED))
        trained = evaluation.ioi_metrics(model, evaluation.ioi_samples("train", N_EVAL, EVAL_SEED))
        agreement = evaluation.agreement_accuracy(model, evaluation.agreement_samples(N_EVAL, EVAL_SEED))
        words = evaluation.repeated_words(self.tokenizer, INDUCTION_LENGTH, 64, EVAL_SEED)
        random_loss, repeat_loss = evaluation.induction_loss(model, words)
        return {
            "ioi_logit_diff": held_out["logit_diff"],
            "ioi_accuracy": held_out["accuracy"],
            "ioi_top1": held_out["top1"],
            "ioi_logit_diff_train_names": trained["logit_diff"],
            "agreement_accuracy": agreement,
            "random_loss": random_loss,
            "repeat_loss": repeat_loss,
        }

    def figures(self, model: Model, metrics: Sequence[dict[str, Any]], findings: Findings) -> dict[str, Any]:
        return {"language_ioi": figure(metrics, findings)}

    def explain(self, model: Model, metrics: Sequence[dict[str, Any]] = ()) -> Findings:
        findings = Findings(self.name)
        with torch.no_grad():
            scores = self.evaluate(model)
            heads = attention_scores(model, evaluation.repeated_words(self.tokenizer, INDUCTION_LENGTH, 64, EVAL_SEED))
            attribution = evaluation.ioi_attribution(model, evaluation.ioi_samples("held_out", 64, EVAL_SEED))
        findings.add(
            "ioi_logit_diff",
            scores["ioi_logit_diff"],
            f"indirect object, held-out names: mean logit(IO) - logit(S) = {scores['ioi_logit_diff']:.2f}; "
            f"IO above S in {scores['ioi_accuracy']:.0%}, IO the top prediction in {scores['ioi_top1']:.0%}",
        )
        findings.add("ioi_accuracy", scores["ioi_accuracy"])
        findings.add("ioi_top1", scores["ioi_top1"])
        findings.add(
            "ioi_logit_diff_train_names",
            scores["ioi_logit_diff_train_names"],
            f"indirect object, training names: logit difference {scores['ioi_logit_diff_train_names']:.2f}",
        )
        findings.add(
            "agreement_accuracy",
            scores["agreement_accuracy"],
            f"subject-verb agreement: right form above wrong form in {scores['agreement_accuracy']:.0%}",
        )
        findings.add(
            "repeat_loss",
            scores["repeat_loss"],
            f"repeated random words: loss {scores['repeat_loss']:.2f} nats on the second copy vs "
            f"{scores['random_loss']:.2f} on the first",
        )
        findings.add("random_loss", scores["random_loss"])
        self.add_heads(findings, heads, attribution)
        self.add_curve(findings, metrics)
        return findings

    @staticmethod
    def add_heads(findings: Findings, heads: dict[str, Tensor], attribution: dict[str, Tensor]) -> None:
        add_head_findings(findings, heads)
        findings.add("ioi_attribution", {k: v.tolist() for k, v in attribution.items()})
        effect = attribution["heads"]
        top = [divmod(int(i), effect.shape[1]) for i in effect.flatten().topk(2).indices]
        findings.add("ioi_heads", [list(pair) for pair in top])
        described = "; ".join(
            f"{layer}.{head} {effect[layer, head]:+.2f} (attends {attribution['io'][layer, head]:.0%} to IO, "
            f"{attribution['subject'][layer, head]:.0%} to S)"
            for layer, head in top
        )
        mlps = ", ".join(f"{value:+.2f}" for value in attribution["mlps"].tolist())
        findings.add(
            "ioi_direct_effects",
            {"heads": float(effect.sum()), "mlps": attribution["mlps"].tolist()},
            f"direct IO − S logit effects at the last token: top heads {described}; all heads {effect.sum():+.2f}; "
            f"MLPs by layer {mlps}",
        )

    @staticmethod
    def add_curve(findings: Findings, metrics: Sequence[dict[str, Any]]) -> None:
        curve = [(m["step"], m["ioi_logit_diff"]) for m in metrics if "ioi_logit_diff" in m]
        above = [step for step, value in curve if value > 2]
        if above:
            findings.add(
                "ioi_solved_step",
                above[0],
                f"held-out logit difference first above 2 at step {above[0]} of {curve[-1][0]}",
            )


def figure(metrics: Sequence[dict[str, Any]], findings: Findings | None = None):
    """The indirect-object logit difference on held-out and training names over training
    (and, with ``findings``, every head's induction score beside it)."""
    from plotly.subplots import make_subplots

    curve = [m for m in metrics if "ioi_logit_diff" in m]
    columns = 2 if findings is not None else 1
    titles = ["IO − S logit difference", "induction score per head"][:columns]
    fig = make_subplots(rows=1, cols=columns, subplot_titles=titles)
    steps = [m["step"] for m in curve]
    for key, label in (("ioi_logit_diff", "held-out names"), ("ioi_logit_diff_train_names", "training names")):
        fig.add_scatter(x=steps, y=[m[key] for m in curve], mode="lines", name=label, row=1, col=1)
    fig.add_hline(y=2, line_dash="dot", annotation_text="target 2", row=1, col=1)
    fig.update_xaxes(title_text="training step", row=1, col=1)
    fig.update_yaxes(title_text="logit(IO) − logit(S)", row=1, col=1)
    if findings is not None:
        scores = findings["head_scores"]["induction"]
        fig.add_heatmap(z=scores, colorscale="Blues", zmin=0, zmax=1, showscale=True, row=1, col=2)
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=2)
        fig.update_yaxes(title_text="layer", dtick=1, row=1, col=2)
    fig.update_layout(
        title="Synthetic language: indirect objects on held-out names, and induction heads",
        legend={"orientation": "h", "y": -0.2},  # below the plot, clear of the heatmap's colour bar
    )
    return fig
