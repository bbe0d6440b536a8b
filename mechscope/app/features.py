"""SAE features in the workbench: ``mechscope serve MODEL --sae DIR`` shows one feature at a time
as the dashboard does (:func:`mechscope.viz.dashboard.feature_sections`): its histogram, top
examples, examples across activation ranges, and the tokens it promotes.

A feature is measured over a fixed, seeded set of sequences from the synthetic language, so the
same feature always shows the same examples and two experiments can be compared. That text is
only meaningful to a model that reads the language: the language organism, or a training run of
it. Any other model is refused when the server starts, with the command that writes dashboards
from text of one's own choosing.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.sae.activations import check_hook
from mechscope.sae.base import SAE, SAEError
from mechscope.sae.features import feature_statistics
from mechscope.sae.token_sources import token_source
from mechscope.toys.language.organism import SyntheticLanguage
from mechscope.viz.dashboard import feature_sections
from mechscope.viz.prompts import decoder
from mechscope.viz.sections import Section

DEFAULT_SEQUENCES = 64  # 8,192 tokens: every feature firing on 0.1% of tokens shows several examples
MAX_SEQUENCES = 512  # a few seconds on one CPU thread for the language organism
SEQ_LEN = 128
SEED = 0
TEXT = "language"  # the token source: the synthetic-language generator
NO_SAE = "start the workbench with --sae DIR to browse features"


class FeatureError(ValueError):
    """A feature request or an SAE the browser cannot use; the message says which and why."""


class FeatureBrowser:
    """One SAE's features on ``model``, measured on demand over the first ``n`` seeded sequences.

    Built once per server; :meth:`sections` runs forward passes, so the server calls it under
    its model lock."""

    def __init__(self, model: Any, sae: SAE, model_name: str) -> None:
        check_reads_language(model, model_name)
        check_fits(model, sae, model_name)
        self.model, self.sae = model, sae
        self.seq_len = min(SEQ_LEN, model.cfg.n_ctx)
        self._tokens: Int[Tensor, "n seq"] = torch.zeros(0, self.seq_len, dtype=torch.long)

    def describe(self) -> dict[str, Any]:
        cfg = self.sae.cfg
        return {"hook_name": cfg.hook_name, "d_sae": cfg.d_sae, "architecture": cfg.architecture}

    def check(self, feature: int) -> None:
        """Refuse an id outside the SAE before the request waits for the model."""
        d_sae = self.sae.cfg.d_sae
        if not 0 <= feature < d_sae:
            raise FeatureError(f"feature must be between 0 and {d_sae - 1} (this SAE has {d_sae:,}); got {feature}")

    def title(self, feature: int, sequences: int) -> str:
        return f"feature {feature} · {self.sae.cfg.hook_name} · {sequences} sequences"

    def tokens(self, sequences: int) -> Int[Tensor, "sequences seq"]:
        """The first ``sequences`` rows of the seeded source; rows already drawn are kept, since
        the source is deterministic and a longer request only extends a shorter one."""
        if sequences > len(self._tokens):
            source = token_source(TEXT, tokenizer=self.model.tokenizer, seq_len=self.seq_len, seed=SEED)
            self._tokens = torch.stack(list(itertools.islice(source, sequences)))
        return self._tokens[:sequences]

    def sections(self, feature: int, sequences: int) -> list[Section]:
        """The dashboard of ``feature`` over the first ``sequences`` sequences."""
        self.check(feature)
        if not 1 <= sequences <= MAX_SEQUENCES:
            raise FeatureError(f"sequences must be between 1 and {MAX_SEQUENCES}; got {sequences}")
        stats = feature_statistics(self.model, self.sae, self.tokens(sequences), features=[feature], seed=SEED)
        sections = feature_sections(stats.features[0], decoder(self.model), stats.logit_note)
        sections[0].facts.append(
            f"Measured on {stats.n_tokens:,} tokens: {sequences} sequences of {self.seq_len} from the synthetic "
            f"language (seed {SEED}), at {stats.hook_name}."
        )
        return sections


def check_reads_language(model: Any, model_name: str) -> None:
    """The sequences come from the language generator: refuse a model with another tokenizer."""
    if not isinstance(getattr(model, "organism", None), SyntheticLanguage):
        raise FeatureError(
            f"the workbench measures SAE features on text from the synthetic language, which only the language "
            f"organism (or a training run of it) reads, and {model_name!r} is neither; write dashboards from your "
            f"own text instead: mechscope sae dashboard SAE_DIR --model {model_name} --data FILE.txt --out DIR"
        )


def check_fits(model: Any, sae: SAE, model_name: str) -> None:
    """The SAE reads a hook point of this model, of the width it was trained on."""
    if not isinstance(sae, SAE):
        raise FeatureError(f"sae must be a mechscope SAE (load one with SAE.load(directory)), got {type(sae).__name__}")
    try:
        hook = check_hook(model, sae.cfg.hook_name)
    except SAEError as problem:
        raise FeatureError(f"the SAE does not fit {model_name!r}: {problem}") from None
    width = hook_width(model, hook)
    if width != sae.cfg.d_in:
        raise FeatureError(
            f"the SAE reads {sae.cfg.d_in} numbers at {hook}, but {model_name!r} has {width} there: "
            f"it was trained on another model"
        )


@torch.no_grad()
def hook_width(model: Any, hook: str) -> int:
    """The size of one position's activation at ``hook`` (d_model, d_mlp, ...), from a two-token run."""
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(torch.zeros(1, 2, dtype=torch.long, device=device), names_filter=[hook])
    return cache[hook][0, 0].numel()
