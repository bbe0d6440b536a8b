"""SAELens' on-disk format: ``cfg.json`` + ``sae_weights.safetensors``, both ways.

SAELens 6.x writes its inference config as

    {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
     "reshape_activations", "metadata": {"sae_lens_version", "model_name", "hook_name",
     "hook_name_out", ...}, "architecture", plus "k" / "rescale_acts_by_decoder_norm" (topk)
     and "d_out" (transcoders)}

and the tensors ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``, ``b_dec`` and, for
JumpReLU, ``threshold`` (θ itself; we train log θ). Architecture names map as

    relu      <-> "standard"          relu transcoder     <-> "transcoder"
    topk      <-> "topk"              topk transcoder      -> "topk_transcoder" (no SAELens class)
    jumprelu  <-> "jumprelu"          jumprelu transcoder <-> "jumprelu_transcoder"
    batchtopk  -> "jumprelu" with one threshold for all latents, as SAELens saves it;
                  ``metadata.mechscope_architecture`` lets us read it back as batchtopk

Fields SAELens' inference configs lack (``hook_layer``, our training coefficients) travel in
``metadata`` or as extra top-level keys, which SAELens ignores. ``metadata.sae_lens_version`` is
the format version, "6.0.0": SAELens reads configs without it (or older) as its 5.x layout.
On loading, a TopK SAE trained with ``rescale_acts_by_decoder_norm`` has the decoder norms folded
into the encoder, which computes the same function with unit-norm decoder rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechscope.sae.base import SAE, SAEConfig, SAEError, sae_class
from mechscope.toys.checkpoint import atomic_save_tensors, atomic_write_text, read_tensors

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"

# (our architecture, transcoder?) -> SAELens architecture name
TO_SAELENS = {
    ("relu", False): "standard",
    ("topk", False): "topk",
    ("batchtopk", False): "jumprelu",
    ("jumprelu", False): "jumprelu",
    ("relu", True): "transcoder",
    ("topk", True): "topk_transcoder",
    ("batchtopk", True): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_transcoder",
}
FROM_SAELENS = {
    "standard": ("relu", False),
    "topk": ("topk", False),
    "batchtopk": ("batchtopk", False),  # a SAELens *training* checkpoint
    "jumprelu": ("jumprelu", False),
    "transcoder": ("relu", True),
    "topk_transcoder": ("topk", True),
    "jumprelu_transcoder": ("jumprelu", True),
}
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def save_saelens(sae: SAE, directory: str | Path) -> Path:
    """Write ``sae`` to ``directory`` in SAELens' format; each file is replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(directory / WEIGHTS_FILE, saelens_tensors(sae))
    atomic_write_text(directory / CFG_FILE, json.dumps(saelens_config(sae), indent=2) + "\n")
    return directory


def saelens_config(sae: SAE) -> dict[str, Any]:
    """The ``cfg.json`` dict of ``sae``."""
    cfg = sae.cfg
    metadata = {
        "sae_lens_version": FORMAT_VERSION,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": cfg.hook_layer,
        "mechscope_architecture": cfg.architecture,
    }
    if cfg.is_transcoder:
        metadata["hook_name_out"] = cfg.output_hook_name
    out: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": str(sae.W_enc.device),
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
        "metadata": metadata,
        "architecture": TO_SAELENS[cfg.architecture, cfg.is_transcoder],
    }
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
    out.update(_training_fields(cfg))
    return out


def _training_fields(cfg: SAEConfig) -> dict[str, Any]:
    """Architecture-specific fields, under SAELens' training-config names where it has them."""
    if cfg.architecture == "relu":
        return {"l1_coefficient": cfg.l1_coefficient}
    if cfg.architecture == "jumprelu":
        return {
            "l0_coefficient": cfg.l1_coefficient,
            "jumprelu_bandwidth": cfg.jumprelu_bandwidth,
            "jumprelu_init_threshold": cfg.jumprelu_init_threshold,
        }
    fields = {"k": cfg.k, "aux_k": cfg.aux_k, "aux_loss_coefficient": cfg.aux_loss_coefficient}
    if cfg.architecture == "topk":
        return {**fields, "rescale_acts_by_decoder_norm": False}
    return {**fields, "topk_threshold_lr": cfg.topk_threshold_lr}


def saelens_tensors(sae: SAE) -> dict[str, Tensor]:
    """The weights under SAELens' names (JumpReLU's θ itself, BatchTopK's threshold per latent)."""
    tensors = {name: getattr(sae, name).detach() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.cfg.architecture == "jumprelu":
        tensors["threshold"] = sae.threshold.detach()
    elif sae.cfg.architecture == "batchtopk":
        tensors["threshold"] = sae.threshold.detach().expand(sae.cfg.d_sae)
    return tensors


def load_saelens(
    directory: str | Path,
    *,
    device: str | torch.device | None = None,
    hook_name: str | None = None,
    output_hook_name: str | None = None,
) -> SAE:
    """An SAE from a SAELens-format directory (ours, or SAELens' own); ``hook_name`` etc. fill gaps."""
    directory = Path(directory)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise SAEError(f"{directory} has no {name}: not an SAE in SAELens' format")
    try:
        raw = json.loads((directory / CFG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SAEError(f"{directory / CFG_FILE} is not valid JSON: {error}") from None
    cfg, rescaled = config_from_saelens(raw, hook_name=hook_name, output_hook_name=output_hook_name)
    tensors, _ = read_tensors(directory / WEIGHTS_FILE)
    sae = sae_class(cfg)(cfg)
    _fill(sae, tensors, rescaled)
    return sae.to(device if device is not None else "cpu").eval()  # BatchTopK infers with its threshold


def config_from_saelens(
    raw: dict[str, Any], *, hook_name: str | None = None, output_hook_name: str | None = None
) -> tuple[SAEConfig, bool]:
    """Our config from a ``cfg.json`` dict, and whether its TopK acts were rescaled by decoder norms."""
    if not isinstance(raw, dict):
        raise SAEError(f"cfg.json must hold a JSON object, got {type(raw).__name__}")
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SAEError(f"cfg.json's metadata must be a JSON object, got {type(meta).__name__}")
    for name in ("d_in", "d_sae"):
        if name not in raw:
            raise SAEError(f"cfg.json has no {name}: not an SAE config")
    architecture, transcoder = _architecture(raw, meta)
    hook = hook_name or meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if not isinstance(hook, str):
        raise SAEError("cfg.json names no hook (metadata.hook_name): pass hook_name=...")
    out_hook = (output_hook_name or meta.get("hook_name_out")) if transcoder else None
    if transcoder and not isinstance(out_hook, str):
        raise SAEError(
            "a transcoder's cfg.json names no output hook (metadata.hook_name_out): pass output_hook_name=..."
        )
    if raw.get("reshape_activations", "none") != "none":
        raise SAEError(f"reshape_activations={raw['reshape_activations']!r} is not supported (only 'none')")
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    fields = {
        "d_in": raw.get("d_in"),
        "d_sae": raw.get("d_sae"),
        "architecture": architecture,
        "hook_name": hook,
        "hook_layer": _hook_layer(raw, meta, hook),
        "output_hook_name": out_hook,
        "d_out": raw.get("d_out") if transcoder else None,
        "k": int(k) if architecture in ("topk", "batchtopk") and isinstance(k, float) and k.is_integer() else k,
        "l1_coefficient": raw.get("l0_coefficient" if architecture == "jumprelu" else "l1_coefficient", 1.0),
        "dtype": str(raw.get("dtype", "float32")).removeprefix("torch."),
        "model_name": meta.get("model_name", raw.get("model_name")),
        "apply_b_dec_to_input": raw.get("apply_b_dec_to_input", not transcoder),
        "normalize_activations": _normalization(raw.get("normalize_activations")),
    }
    for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "aux_k", "aux_loss_coefficient", "topk_threshold_lr"):
        if name in raw:
            fields[name] = raw[name]
    if architecture not in ("topk", "batchtopk"):
        fields["k"] = None
    return SAEConfig.from_dict(fields), bool(raw.get("rescale_acts_by_decoder_norm", False))


def _architecture(raw: dict[str, Any], meta: dict[str, Any]) -> tuple[str, bool]:
    """(our architecture, transcoder?) from SAELens' name (and our marker for BatchTopK)."""
    name = raw.get("architecture", "standard")
    if name == "standard" and raw.get("activation_fn") == "topk":  # SAELens 5.x TopK
        name = "topk"
    if name not in FROM_SAELENS:
        raise SAEError(f"SAELens architecture {name!r} is not supported; supported: {sorted(FROM_SAELENS)}")
    architecture, transcoder = FROM_SAELENS[name]
    if architecture == "jumprelu" and meta.get("mechscope_architecture") == "batchtopk":
        architecture = "batchtopk"
    return architecture, transcoder


def _hook_layer(raw: dict[str, Any], meta: dict[str, Any], hook: str) -> int:
    """``hook_layer`` from the file, else from ``blocks.{i}.`` in the hook name, else 0 (embeddings)."""
    for value in (meta.get("hook_layer"), raw.get("hook_layer"), raw.get("hook_point_layer")):
        if value is not None:
            return value
    match = _LAYER.match(hook)
    return int(match.group(1)) if match else 0


def _normalization(value: Any) -> Any:
    """SAELens 5.x wrote a bool here."""
    if value is None or value is False:
        return "none"
    return "expected_average_only_in" if value is True else value


def _fill(sae: SAE, tensors: dict[str, Tensor], rescaled: bool) -> None:
    """Copy the file's tensors into ``sae``, checking names and shapes."""
    cfg = sae.cfg
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_out)}
    expected["b_dec"] = (cfg.d_out,)
    if cfg.architecture in ("jumprelu", "batchtopk"):
        expected["threshold"] = (cfg.d_sae,)
    if cfg.architecture == "batchtopk" and "topk_threshold" in tensors:  # SAELens training checkpoint
        tensors = dict(tensors)
        tensors["threshold"] = tensors.pop("topk_threshold").expand(cfg.d_sae)
    if set(tensors) != set(expected):
        raise SAEError(f"weights file holds {sorted(tensors)}, expected {sorted(expected)} for {cfg.architecture}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAEError(f"weight {name} has shape {tuple(tensors[name].shape)}, expected {shape} from cfg.json")
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        if rescaled:
            _fold_decoder_norms(sae)
        if "threshold" in expected:
            _set_threshold(sae, tensors["threshold"].to(torch.float64))


def _fold_decoder_norms(sae: SAE) -> None:
    """SAELens' ``rescale_acts_by_decoder_norm``: fold the norms into the encoder (same function)."""
    norms = sae.W_dec.norm(dim=-1).clamp_min(1e-12)
    sae.W_dec.div_(norms[:, None])
    sae.W_enc.mul_(norms)
    sae.b_enc.mul_(norms)


def _set_threshold(sae: SAE, threshold: Tensor) -> None:
    """JumpReLU stores log θ; BatchTopK one θ shared by every latent."""
    if bool((threshold < 0).any()) or not bool(threshold.isfinite().all()):
        raise SAEError("threshold must be finite and non-negative for every latent")
    if sae.cfg.architecture == "jumprelu":
        sae.log_threshold.copy_(threshold.log())
        return
    if bool((threshold != threshold[0]).any()):
        raise SAEError("a batchtopk SAE needs one threshold shared by all latents; this file has several")
    sae.threshold.fill_(float(threshold[0]))
    sae.threshold_updates.fill_(1)
