"""``mechscope.Model``: the hooked transformer plus a tokenizer, loadable from HuggingFace.

``Model.from_pretrained("gpt2")`` (or a local directory) reads the config with transformers,
streams the weights from safetensors into a model allocated on the meta device, and loads the
tokenizer with ``AutoTokenizer``. ``Model.from_hf(module)`` converts an already-loaded
HuggingFace model through the same family table.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.loading import tokens as tok
from mechscope.loading.families import config_for, family_for
from mechscope.loading.hf import load_weights, local_checkpoint, open_weights
from mechscope.model.config import ModelConfig
from mechscope.model.devices import DeviceLike, devices_for, place
from mechscope.model.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class Model(Transformer):
    """A :class:`Transformer` that also understands text.

    Every entry point (``forward``, ``run_with_cache``, ``run_with_hooks``) accepts a string or
    a list of strings as well as token ids; a list of texts of different lengths is padded
    (see :mod:`mechscope.loading.tokens`) and the padding masked.
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg)
        self.tokenizer = tokenizer

    # ------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: DeviceLike | Sequence[DeviceLike] = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer: Any = None,
        *,
        n_devices: int | None = None,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
        **config_overrides: Any,
    ) -> Model:
        """Load a HuggingFace checkpoint (hub id or local directory) into a mechscope model.

        ``dtype`` is the weights' precision (float32, bfloat16 or float16). ``device`` is one
        device, or a list of devices across which the layers are split in order; ``n_devices``
        splits them across the first ``n`` GPUs. Weights are raw by default, so logits equal
        HuggingFace's; the processing flags apply the steps of :meth:`process_weights`.
        ``config_overrides`` set :class:`ModelConfig` fields, e.g.
        ``ungroup_grouped_query_attention=True``.
        """
        from transformers import AutoConfig

        directory = local_checkpoint(name_or_path)
        hf_config = AutoConfig.from_pretrained(directory)
        family = family_for(hf_config.model_type)
        cfg = config_for(family, hf_config, dtype=dtype, tokenizer_name=str(name_or_path), **config_overrides)
        if tokenizer is None and any((directory / f).exists() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
        model = cls._empty(cfg, devices_for(device, n_devices), tokenizer)
        with ExitStack() as stack:
            load_weights(model, open_weights(directory, stack), family)
        steps = dict(
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )
        if any(steps.values()):
            model.process_weights(**steps)
        return model.eval()

    @classmethod
    def from_hf(cls, hf_model: torch.nn.Module, tokenizer: Any = None, dtype: torch.dtype | None = None) -> Model:
        """Convert an already-loaded HuggingFace causal LM (weights are copied, not shared)."""
        family = family_for(hf_model.config.model_type)
        first = next(hf_model.parameters())
        cfg = config_for(family, hf_model.config, dtype=dtype or first.dtype)
        model = cls._empty(cfg, [first.device], tokenizer)
        load_weights(model, hf_model.state_dict(), family)
        return model.eval()

    @classmethod
    def _empty(cls, cfg: ModelConfig, devices: list[torch.device], tokenizer: Any) -> Model:
        """A model whose parameters are allocated but not initialised (they are about to be
        overwritten), built on the meta device so no random weights are ever computed."""
        with torch.device("meta"):
            model = cls(cfg, tokenizer)
        return place(model, devices, empty=True)

    def process_weights(
        self,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
    ) -> Model:
        """Rewrite the weights into an equivalent form that is easier to read (in place; see
        :mod:`mechscope.loading.processing` for each step's maths and when it applies)."""
        from mechscope.loading.processing import process_weights

        return process_weights(
            self,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )

    def to_devices(self, devices: Sequence[DeviceLike]) -> Model:
        """Split the layers across ``devices`` in order (see :mod:`mechscope.model.devices`)."""
        return place(self, devices)

    # ------------------------------------------------------------ text in
    def forward(self, input, return_type="logits", *, prepend_bos=None, padding_side="right", **kwargs):
        """As :meth:`Transformer.forward`, but ``input`` may also be text (see ``to_tokens``)."""
        if isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str)):
            tokens, mask = tok.to_tokens(self.tokenizer, input, prepend_bos, padding_side)
            input = tokens.to(self.W_E.device)
            if kwargs.get("attention_mask") is None:
                kwargs["attention_mask"] = mask.to(self.W_E.device)
        return super().forward(input, return_type, **kwargs)

    # ------------------------------------------------------------ text out
    def generate(self, input, max_new_tokens: int = 20, *, stop_at_eos: bool = True, **options):
        """As :meth:`Transformer.generate`; text in gives text out (prompt included, as
        TransformerLens does), and a batch of texts is left-padded. Generation stops at the
        tokenizer's end-of-sequence token unless ``stop_at_eos=False`` or ``stop_tokens`` is given."""
        text = self._is_text(input)
        input, options = self._generation_inputs(input, stop_at_eos, options)
        tokens = super().generate(input, max_new_tokens, **options)
        if not text:
            return tokens
        decoded = [self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens.tolist()]
        return decoded[0] if isinstance(text, str) else decoded

    def generate_stream(self, input, max_new_tokens: int = 20, *, stop_at_eos: bool = True, **options):
        """Yield each step's new tokens; for text input, each step's new text (a string, or a
        list of strings for a batch)."""
        text = self._is_text(input)
        input, options = self._generation_inputs(input, stop_at_eos, options)
        for new in super().generate_stream(input, max_new_tokens, **options):
            if not text:
                yield new
                continue
            pieces = [self.tokenizer.decode([t], skip_special_tokens=True) for t in new.tolist()]
            yield pieces[0] if isinstance(text, str) else pieces

    @staticmethod
    def _is_text(input) -> str | list[str] | None:
        if isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str)):
            return input
        return None

    def _generation_inputs(self, input, stop_at_eos: bool, options: dict) -> tuple[Tensor, dict]:
        """Tokenise text (left-padded, so every row's next token comes last) and fill in the
        tokenizer's stop and padding tokens."""
        options = dict(options)
        if self._is_text(input) is not None:
            tokens, mask = tok.to_tokens(
                self.tokenizer, input, options.pop("prepend_bos", None), "left", self.cfg.n_ctx
            )
            input = tokens.to(self.W_E.device)
            if not bool(mask.all()):
                options.setdefault("attention_mask", mask.to(self.W_E.device))
        if self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
            if stop_at_eos and eos is not None:
                options.setdefault("stop_tokens", eos)
            options.setdefault("pad_token", tok.pad_id(self.tokenizer))
        return input, options

    def to_tokens(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: tok.PaddingSide = "right",
        truncate: bool = False,
        return_attention_mask: bool = False,
    ) -> Int[Tensor, "batch pos"] | tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Text to ``[batch, pos]`` ids on the model's device (and the mask, if asked)."""
        tokens, mask = tok.to_tokens(self.tokenizer, text, prepend_bos, padding_side, self.cfg.n_ctx, truncate)
        tokens, mask = tokens.to(self.W_E.device), mask.to(self.W_E.device)
        return (tokens, mask) if return_attention_mask else tokens

    def to_str_tokens(self, input, prepend_bos: bool | None = None) -> list[str] | list[list[str]]:
        return tok.to_str_tokens(self.tokenizer, input, prepend_bos)

    def to_string(self, tokens) -> str | list[str]:
        return tok.to_string(self.tokenizer, tokens)

    def to_single_token(self, string: str) -> int:
        return tok.to_single_token(self.tokenizer, string)


HookedTransformer = Model
