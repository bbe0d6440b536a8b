"""Short names for hook points, as in TransformerLens: ``("resid_pre", 3)`` means
``"blocks.3.hook_resid_pre"``, ``("pattern", 0)`` means ``"blocks.0.attn.hook_pattern"``,
``("scale", 2, "ln1")`` means ``"blocks.2.ln1.hook_scale"`` and ``"scale"`` alone means the
final norm's ``"ln_final.hook_scale"``."""

from __future__ import annotations

ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
}
ATTENTION_NAMES = {"q", "k", "v", "z", "rot_q", "rot_k", "result", "pattern", "attn_scores"}
MLP_NAMES = {"pre", "post", "pre_linear"}
NORM_NAMES = {"scale", "normalized"}
SUBLAYER_ALIASES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": ""}


def act_name(name: str, layer: int | None = None, sublayer: str | None = None, n_layers: int | None = None) -> str:
    """The full hook name for a short one; a full name (containing ``hook_``) passes through.

    A negative ``layer`` counts from the end and needs ``n_layers``.
    """
    if "hook_" in name and layer is None and sublayer is None:
        return name
    name = ALIASES.get(name, name)
    if layer is not None and layer < 0:
        if n_layers is None:
            raise ValueError(f"a negative layer ({layer}) needs the number of layers")
        if layer < -n_layers:
            raise IndexError(f"layer {layer} is out of range for {n_layers} layers")
        layer += n_layers
    if name in ATTENTION_NAMES:
        sublayer = "attn"
    elif name in MLP_NAMES:
        sublayer = "mlp"
    elif sublayer is not None:
        sublayer = SUBLAYER_ALIASES.get(sublayer, sublayer)
    if name in NORM_NAMES and layer is None:
        return f"ln_final.hook_{name}"
    parts = [f"blocks.{layer}" if layer is not None else "", sublayer or "", f"hook_{name}"]
    return ".".join(part for part in parts if part)
