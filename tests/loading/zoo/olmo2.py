from transformers import Olmo2Config

from tests.loading.zoo import LLAMA_SIZES

SIZES = LLAMA_SIZES | dict(
    pad_token_id=0,
    eos_token_id=1,
)

VARIANTS = {
    "olmo2": lambda: Olmo2Config(**SIZES, num_hidden_layers=2),
    # grouped-query (so k_norm is narrower than q_norm), biases, tied embeddings
    "olmo2-gqa-bias-tied": lambda: Olmo2Config(
        **SIZES, num_hidden_layers=3, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True
    ),
}
