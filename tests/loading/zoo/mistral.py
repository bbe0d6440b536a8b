from transformers import MistralConfig

from tests.loading.zoo import LLAMA_SIZES


def mistral(**options):
    sizes = LLAMA_SIZES | dict(
        num_hidden_layers=2,
        num_key_value_heads=2,
        sliding_window=None,
    )
    return MistralConfig(**(sizes | options))


VARIANTS = {
    "mistral": lambda: mistral(),
    "mistral-window4": lambda: mistral(sliding_window=4),  # every layer; shorter than the 12 test tokens
}
