from transformers import Phi3Config

from tests.loading.zoo import LLAMA_SIZES

SIZES = LLAMA_SIZES | dict(
    original_max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

VARIANTS = {
    "phi3": lambda: Phi3Config(**SIZES, num_hidden_layers=2),
    # half the head rotated, two query heads per KV head, tied embeddings
    "phi3-partial-gqa-tied": lambda: Phi3Config(
        **SIZES, num_hidden_layers=2, num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=True
    ),
    # multi-query and a sliding window (on every layer) shorter than the prompts
    "phi3-mqa-window": lambda: Phi3Config(**SIZES, num_hidden_layers=3, num_key_value_heads=1, sliding_window=5),
}
