from transformers import Qwen3Config

from tests.loading.zoo import LLAMA_SIZES


def qwen3(**options):
    sizes = LLAMA_SIZES | dict(
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=32,  # not hidden_size / heads, as in the released Qwen3 models
        tie_word_embeddings=True,
    )
    return Qwen3Config(**(sizes | options))


VARIANTS = {
    "qwen3": lambda: qwen3(),
    "qwen3-bias-untied": lambda: qwen3(attention_bias=True, tie_word_embeddings=False),
    "qwen3-window": lambda: qwen3(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=2),
}
