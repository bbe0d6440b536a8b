from transformers import Qwen2Config

from tests.loading.zoo import LLAMA_SIZES


def qwen2(**options):
    sizes = LLAMA_SIZES | dict(num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2Config(**(sizes | options))


VARIANTS = {
    "qwen2": lambda: qwen2(),
    # layers 1 and 2 (from max_window_layers on) see only the last 4 tokens
    "qwen2-window": lambda: qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=1),
}
