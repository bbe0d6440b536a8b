"""Tests of mechscope.sae; ``random_sae`` builds small SAEs whose every weight matters."""

from __future__ import annotations

import torch

from mechscope.sae import SAE, SAEConfig, build_sae, transcoder_config


def random_sae(
    architecture: str,
    *,
    d_in: int = 8,
    d_sae: int = 32,
    k: int = 4,
    seed: int = 0,
    d_out: int | None = None,
    **fields,
) -> SAE:
    """An SAE with random decoder norms, biases and thresholds (a transcoder when ``d_out`` is given)."""
    k_field = k if architecture in ("topk", "batchtopk") else None
    if d_out is None:
        cfg = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            architecture=architecture,
            hook_name="blocks.1.hook_resid_post",
            hook_layer=1,
            k=k_field,
            **fields,
        )
    else:
        cfg = transcoder_config(
            d_in=d_in,
            d_out=d_out,
            d_sae=d_sae,
            architecture=architecture,
            k=k_field,
            hook_name="blocks.1.ln2.hook_normalized",
            output_hook_name="blocks.1.hook_mlp_out",
            hook_layer=1,
            **fields,
        )
    sae = build_sae(cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=generator, dtype=sae.W_dec.dtype) + 0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=generator) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.cfg.d_out, generator=generator) * 0.3)
        if architecture == "jumprelu":
            sae.log_threshold.copy_((torch.rand(d_sae, generator=generator) * 0.4 + 0.05).log())
    return sae
