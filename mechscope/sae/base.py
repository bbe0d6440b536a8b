"""The one SAE interface: a config, an encoder/decoder pair, and the loss terms training needs.

Every architecture (ReLU, TopK, BatchTopK, JumpReLU, and their transcoder forms) is an
``SAE`` with the same four weights, in SAELens' names and layouts:

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_out]   b_dec [d_out]

so ``pre = (x - b_dec) @ W_enc + b_enc`` (without ``- b_dec`` for transcoders) and
``reconstruction = latents @ W_dec + b_dec``. Subclasses differ only in the activation that
turns pre-activations into latents and in their loss terms. A subclass registers itself under
its ``architecture`` name; ``build_sae`` and ``SAE.load`` look it up there.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.sae.sparse import gathered_decode

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LAYER = re.compile(r"^blocks\.(\d+)\.")


class SAEError(ValueError):
    """An SAE, its config or its input is not what was asked for; the message names the limit."""


@dataclass
class SAEConfig:
    """What an SAE reads, how wide it is, and how it is trained (field names follow SAELens)."""

    d_in: int
    d_sae: int
    architecture: str
    hook_name: str
    hook_layer: int
    output_hook_name: str | None = None  # transcoders: the hook whose activations are predicted
    d_out: int | None = None  # None: d_in (a transcoder may differ)
    k: int | None = None  # topk / batchtopk: latents kept per example (on average for batchtopk)
    l1_coefficient: float = 1.0  # relu: L1 weight; jumprelu: L0 weight
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    dtype: str = "float32"
    model_name: str | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"  # "expected_average_only_in": see train_sae; a no-op at inference
    aux_k: int | None = None  # AuxK: dead latents used to model the residual; None: d_in // 2
    aux_loss_coefficient: float = 1 / 32  # AuxK weight (Gao et al. 2024)
    topk_threshold_lr: float = 0.01  # batchtopk: EMA rate of the inference threshold

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        _check_types(self)
        _check_values(self)

    @property
    def is_transcoder(self) -> bool:
        """Transcoders predict another hook's activations instead of reconstructing their input."""
        return self.output_hook_name is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Validated config from a dict; unknown or missing keys are named in the error."""
        if not isinstance(d, dict):
            raise SAEError(f"an SAE config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SAEError(f"unknown SAE config keys {unknown}; known keys are {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise SAEError(f"SAE config is missing required keys {missing}")
        return cls(**d)


def _check_types(cfg: SAEConfig) -> None:
    """Each field has the type its annotation says (ints are not bools; floats accept ints)."""
    ints = ("d_in", "d_sae", "hook_layer", "d_out", "k", "aux_k")
    floats = ("l1_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold", "aux_loss_coefficient")
    strs = ("architecture", "hook_name", "dtype", "normalize_activations", "output_hook_name", "model_name")
    for name in ints:
        value = getattr(cfg, name)
        required = name in ("d_in", "d_sae", "hook_layer")
        if (value is not None or required) and (isinstance(value, bool) or not isinstance(value, int)):
            raise SAEError(f"{name} must be an int, got {value!r}")
    for name in (*floats, "topk_threshold_lr"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SAEError(f"{name} must be a finite number, got {value!r}")
    for name in strs:
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, str):
            raise SAEError(f"{name} must be a string, got {value!r}")
    if not isinstance(cfg.apply_b_dec_to_input, bool):
        raise SAEError(f"apply_b_dec_to_input must be a bool, got {cfg.apply_b_dec_to_input!r}")


def _check_values(cfg: SAEConfig) -> None:
    """The limits each field must respect, named in the error."""
    for name in ("d_in", "d_sae", "d_out"):
        if getattr(cfg, name) < 1:
            raise SAEError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.architecture not in ARCHITECTURES:
        raise SAEError(f"architecture must be one of {ARCHITECTURES}, got {cfg.architecture!r}")
    if cfg.architecture in ("topk", "batchtopk") and (cfg.k is None or not 1 <= cfg.k <= cfg.d_sae):
        raise SAEError(f"k must be between 1 and d_sae={cfg.d_sae} for {cfg.architecture}, got {cfg.k}")
    if cfg.hook_layer < 0:
        raise SAEError(f"hook_layer must be at least 0, got {cfg.hook_layer}")
    match = _LAYER.match(cfg.hook_name)
    if match and int(match.group(1)) != cfg.hook_layer:
        raise SAEError(f"hook_layer={cfg.hook_layer} disagrees with hook_name {cfg.hook_name!r}")
    if cfg.aux_k is not None and cfg.aux_k < 1:
        raise SAEError(f"aux_k must be at least 1 (or None for d_in // 2), got {cfg.aux_k}")
    for name in ("l1_coefficient", "aux_loss_coefficient"):
        if getattr(cfg, name) < 0:
            raise SAEError(f"{name} must be at least 0, got {getattr(cfg, name)}")
    for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
        if getattr(cfg, name) <= 0:
            raise SAEError(f"{name} must be positive, got {getattr(cfg, name)}")
    if not 0 < cfg.topk_threshold_lr <= 1:
        raise SAEError(f"topk_threshold_lr must be in (0, 1], got {cfg.topk_threshold_lr}")
    if cfg.dtype not in DTYPES:
        raise SAEError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if cfg.normalize_activations not in NORMALIZATIONS:
        raise SAEError(f"normalize_activations must be one of {NORMALIZATIONS}, got {cfg.normalize_activations!r}")
    if cfg.is_transcoder and cfg.apply_b_dec_to_input:
        raise SAEError("apply_b_dec_to_input must be False for a transcoder (b_dec lives in the output space)")
    if not cfg.is_transcoder and cfg.d_out != cfg.d_in:
        raise SAEError(f"d_out={cfg.d_out} differs from d_in={cfg.d_in}: only a transcoder (output_hook_name) may")


@dataclass(frozen=True)
class SparseLatents:
    """The active latents of each example: ``values[..., j]`` is latent ``indices[..., j]``; padding has value 0."""

    indices: Int[Tensor, "*batch k"]
    values: Float[Tensor, "*batch k"]

    def to_dense(self, d_sae: int) -> Float[Tensor, "*batch d_sae"]:
        """The dense latents (for inspection; the sparse paths never need them)."""
        dense = self.values.new_zeros((*self.values.shape[:-1], d_sae))
        return dense.scatter_add(-1, self.indices, self.values)


@dataclass
class Losses:
    """Named scalar loss terms of one batch, and the latent statistics training tracks."""

    mse: Float[Tensor, ""]
    sparsity: Float[Tensor, ""]  # L1 (relu) or L0 (jumprelu) term, coefficient included; 0 for topk
    aux: Float[Tensor, ""]  # AuxK, coefficient included; 0 without dead latents
    total: Float[Tensor, ""]
    l0: Float[Tensor, " batch"]  # active latents per example
    fired: Bool[Tensor, " d_sae"]  # latents active on at least one example of the batch


@dataclass
class Reconstruction:
    """What an architecture's training step returns to ``SAE.losses``."""

    output: Float[Tensor, "batch d_out"]
    sparsity: Float[Tensor, ""]
    l0: Float[Tensor, " batch"]
    fired: Bool[Tensor, " d_sae"]


SAES: dict[str, type[SAE]] = {}
TRANSCODERS: dict[str, type[SAE]] = {}


def register(architecture: str, *, transcoder: bool = False):
    """Class decorator: ``architecture`` names this class in configs and files."""

    def add(cls: type[SAE]) -> type[SAE]:
        (TRANSCODERS if transcoder else SAES)[architecture] = cls
        cls.architecture = architecture
        return cls

    return add


class SAE(nn.Module):
    """Sparse autoencoder: ``encode`` to latents, ``decode`` back; ``losses`` for training."""

    architecture: ClassVar[str] = ""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype))

    # -- the interface -------------------------------------------------------------------
    def pre_activations(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Encoder affine map ``(x - b_dec) @ W_enc + b_enc``, with SAELens' centring when configured."""
        flat = self.encoder_input(x.to(self.W_enc.dtype).reshape(-1, self.cfg.d_in))
        return torch.addmm(self.encoder_bias(), flat, self.W_enc).reshape(*x.shape[:-1], self.cfg.d_sae)

    def encoder_input(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_in"]:
        """``x - b_dec`` when centring (else ``x``); ``b_dec``'s gradient through it comes via ``encoder_bias``."""
        return x - self.b_dec.detach() if self.cfg.apply_b_dec_to_input else x

    def encoder_bias(self) -> Float[Tensor, " d_sae"]:
        """``b_enc``, plus a zero that gives ``b_dec`` its gradient through the centring cheaply.

        Autograd through ``x - b_dec`` would multiply the whole ``[batch, d_sae]`` gradient back
        through ``W_enc`` only to sum it over the batch; ``-(b_dec - b_dec.detach()) @ W_enc`` is zero
        in value and carries the same gradient as one matrix-vector product. Centring x itself (not
        folding ``b_dec @ W_enc`` into the bias) keeps SAELens' order of operations, which matters in
        float32 when activations carry a large constant offset.
        """
        if self.cfg.apply_b_dec_to_input:
            return self.b_enc - (self.b_dec - self.b_dec.detach()) @ self.W_enc
        return self.b_enc

    def activate(self, pre: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_sae"]:
        """Pre-activations to dense latents; each architecture defines its own."""
        raise NotImplementedError

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Dense latents of ``x``."""
        return self.activate(self.pre_activations(self._checked_input(x)))

    def encode_sparse(self, x: Float[Tensor, "*batch d_in"]) -> SparseLatents:
        """Active latents of ``x``, padded with zeros to the largest count in the batch."""
        latents = self.encode(x)
        width = int((latents != 0).sum(-1).max()) if latents.numel() else 0
        _, indices = latents.abs().topk(width, dim=-1)
        return SparseLatents(indices, latents.gather(-1, indices))

    def decode(self, latents: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_out"]:
        """Reconstruction (or, for a transcoder, prediction) from dense latents."""
        if latents.shape[-1] != self.cfg.d_sae:
            raise SAEError(f"latents have last dimension {latents.shape[-1]}, expected d_sae={self.cfg.d_sae}")
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, sparse: SparseLatents) -> Float[Tensor, "*batch d_out"]:
        """Reconstruction from active latents alone: ``b_dec + Σ_j values_j · W_dec[indices_j]``."""
        indices, values = sparse.indices, sparse.values
        if indices.shape != values.shape or indices.dtype != torch.long:
            raise SAEError(f"sparse indices must be long with the shape of values, got {indices.dtype} {indices.shape}")
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < self.cfg.d_sae:
            raise SAEError(f"sparse indices must lie in [0, d_sae={self.cfg.d_sae})")
        return gathered_decode(self.W_dec, self.b_dec, indices, values)

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """Reconstruction of ``x`` (a transcoder's prediction of its output hook)."""
        return self.decode(self.encode(x))

    def losses(
        self,
        x: Float[Tensor, "*batch d_in"],
        target: Float[Tensor, "*batch d_out"] | None = None,
        *,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> Losses:
        """Training loss terms on a batch: MSE (summed over features, averaged over examples) and more."""
        x, target = self._checked_pair(x, target)
        if dead_mask is not None and (dead_mask.dtype != torch.bool or dead_mask.shape != (self.cfg.d_sae,)):
            raise SAEError(f"dead_mask must be a bool tensor of shape [d_sae={self.cfg.d_sae}], got {dead_mask.shape}")
        step, aux = self.training_forward(x, target, dead_mask)
        mse = (step.output - target).pow(2).sum(-1).mean()
        return Losses(mse, step.sparsity, aux, mse + step.sparsity + aux, step.l0, step.fired)

    def training_forward(
        self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_out"], dead_mask: Tensor | None
    ) -> tuple[Reconstruction, Float[Tensor, ""]]:
        """The reconstruction and the auxiliary loss of a batch, through dense pre-activations."""
        pre = self.pre_activations(x)
        step = self.reconstruct(pre)
        return step, self.aux_loss(pre, (target - step.output).detach(), dead_mask)

    def reconstruct(self, pre: Float[Tensor, "batch d_sae"]) -> Reconstruction:
        """The training forward pass from pre-activations; dense by default."""
        return dense_reconstruction(self, self.activate(pre), pre.new_zeros(()))

    def aux_loss(
        self, pre: Float[Tensor, "batch d_sae"], residual: Float[Tensor, "batch d_out"], dead_mask: Tensor | None
    ) -> Float[Tensor, ""]:
        """Auxiliary loss for dead latents; none unless an architecture defines one."""
        return pre.new_zeros(())

    def init_extra(self) -> None:
        """Initialise parameters beyond the four shared ones (``build_sae`` calls it under no_grad)."""

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows, so latent sizes are comparable and sparsity cannot shrink by growing W_dec."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, factor: float) -> None:
        """Take raw activations from now on, as trained on ``factor ×`` them: SAELens' fold, exactly.

        ``(f·x - b_dec) @ W_enc`` equals ``(x - b_dec/f) @ (f·W_enc)``, so the latents are unchanged
        (thresholds too), and the output ``(latents @ W_dec + b_dec) / f`` comes back in raw units.
        """
        self.W_enc.mul_(factor)
        self.W_dec.div_(factor)
        self.b_dec.div_(factor)
        self.cfg = replace(self.cfg, normalize_activations="none")  # not the caller's config object

    def save(self, directory: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` in SAELens' format (atomically)."""
        from mechscope.sae.saelens import save_saelens

        return save_saelens(self, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> SAE:
        """Read an SAE in SAELens' format, ours or SAELens' own."""
        from mechscope.sae.saelens import load_saelens

        return load_saelens(directory, device=device)

    # -- helpers -------------------------------------------------------------------------
    def _checked_input(self, x: Tensor) -> Tensor:
        """``x`` itself, once it is known to be a float tensor ending in ``d_in``."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SAEError(f"x must be a float tensor [..., d_in={self.cfg.d_in}], got {shape}")
        return x

    def _checked_pair(self, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """``x`` and its target as ``[examples, d]`` matrices (the target defaults to ``x`` for an SAE)."""
        x = self._checked_input(x).reshape(-1, self.cfg.d_in)
        if len(x) == 0:
            raise SAEError("x has 0 examples; the losses need at least 1")
        if target is None:
            if self.cfg.is_transcoder:
                raise SAEError(f"target is required for a transcoder (activations of {self.cfg.output_hook_name})")
            return x, x.to(self.W_dec.dtype)
        if (
            not isinstance(target, Tensor)
            or target.ndim < 1
            or target.shape[-1] != self.cfg.d_out
            or target.numel() // self.cfg.d_out != len(x)
        ):
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise SAEError(f"target must be [{len(x)} examples, d_out={self.cfg.d_out}] like x, got {shape}")
        return x, target.reshape(-1, self.cfg.d_out).to(self.W_dec.dtype)


def dense_reconstruction(
    sae: SAE, latents: Float[Tensor, "batch d_sae"], sparsity: Float[Tensor, ""]
) -> Reconstruction:
    """Training step output of an architecture whose latents are dense anyway (relu, jumprelu)."""
    active = latents != 0
    return Reconstruction(sae.decode(latents), sparsity, active.sum(-1).to(latents.dtype), active.any(0))


def sae_class(cfg: SAEConfig) -> type[SAE]:
    """The registered class for ``cfg`` (architecture, and transcoder or not)."""
    from mechscope.sae import jumprelu, relu, topk, transcoder  # noqa: F401  (each registers its classes)

    return (TRANSCODERS if cfg.is_transcoder else SAES)[cfg.architecture]


def build_sae(cfg: SAEConfig, *, seed: int = 0, device: str | torch.device | None = None) -> SAE:
    """A fresh SAE: random unit-norm decoder rows, encoder their transpose, zero biases."""
    sae = sae_class(cfg)(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W_dec = unit_rows(torch.randn(cfg.d_sae, cfg.d_out, generator=generator, dtype=torch.float64))
        sae.W_dec.copy_(W_dec)
        if cfg.d_out == cfg.d_in:
            sae.W_enc.copy_(W_dec.T)
        else:  # a transcoder between widths: the encoder gets its own unit-norm directions
            sae.W_enc.copy_(unit_rows(torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float64)).T)
        sae.init_extra()
    return sae.to(device) if device is not None else sae


def unit_rows(matrix: Float[Tensor, "rows cols"]) -> Float[Tensor, "rows cols"]:
    """Each row scaled to unit Euclidean norm."""
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(1e-12)
