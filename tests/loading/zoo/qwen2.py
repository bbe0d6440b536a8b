from transformers import Qwen2Config

from tests.loading.zoo import VOCAB


def qwen2(**options):
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2Config(**(sizes | options))


VARIANTS = {
    "qwen2": lambda: qwen2(),
    # layers 1 and 2 (from max_window_layers on) see only the last 4 tokens
    "qwen2-window": lambda: qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=1),
}
