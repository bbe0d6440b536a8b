"""Transcoders: read one hook point, predict another (Dunefsky et al. 2024; Anthropic's CLTs).

A transcoder is an SAE whose decoder writes to a different place: typically it reads an MLP's
input (``blocks.i.ln2.hook_normalized``) and predicts its output (``blocks.i.hook_mlp_out``),
so its latents are a sparse, interpretable replacement for the MLP. The encoders are the SAEs'
own; what changes is

- the target: ``losses(x, target)`` needs the output hook's activations (``cfg.output_hook_name``);
- the width: ``W_dec`` is ``[d_sae, d_out]`` with ``d_out`` possibly different from ``d_in``;
- no ``x - b_dec`` on the input, since ``b_dec`` lives in the output space
  (``apply_b_dec_to_input=False``, as SAELens requires for its transcoders).
"""

from __future__ import annotations

from typing import Any

from mechscope.sae.base import SAE, SAEConfig, register
from mechscope.sae.jumprelu import JumpReLUSAE
from mechscope.sae.relu import ReLUSAE
from mechscope.sae.topk import BatchTopKSAE, TopKSAE


class Transcoder(SAE):
    """Marker base: an SAE predicting ``cfg.output_hook_name`` from ``cfg.hook_name``."""


@register("relu", transcoder=True)
class ReLUTranscoder(Transcoder, ReLUSAE):
    """ReLU transcoder with norm-weighted L1 (SAELens "transcoder")."""


@register("topk", transcoder=True)
class TopKTranscoder(Transcoder, TopKSAE):
    """TopK transcoder (no SAELens counterpart: saved as "topk_transcoder")."""


@register("batchtopk", transcoder=True)
class BatchTopKTranscoder(Transcoder, BatchTopKSAE):
    """BatchTopK transcoder (saved as SAELens' "jumprelu_transcoder")."""


@register("jumprelu", transcoder=True)
class JumpReLUTranscoder(Transcoder, JumpReLUSAE):
    """JumpReLU transcoder (SAELens "jumprelu_transcoder")."""


def transcoder_config(
    *,
    d_in: int,
    d_out: int,
    d_sae: int,
    architecture: str,
    hook_name: str,
    output_hook_name: str,
    hook_layer: int,
    **fields: Any,
) -> SAEConfig:
    """An ``SAEConfig`` for a transcoder, with ``apply_b_dec_to_input=False`` filled in."""
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=architecture,
        hook_name=hook_name,
        hook_layer=hook_layer,
        output_hook_name=output_hook_name,
        d_out=d_out,
        apply_b_dec_to_input=False,
        **fields,
    )
