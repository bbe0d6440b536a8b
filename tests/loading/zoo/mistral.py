from transformers import MistralConfig

from tests.loading.zoo import VOCAB


def mistral(**options):
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=None,
    )
    return MistralConfig(**(sizes | options))


VARIANTS = {
    "mistral": lambda: mistral(),
    "mistral-window4": lambda: mistral(sliding_window=4),  # every layer; shorter than the 12 test tokens
}
