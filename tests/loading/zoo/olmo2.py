from transformers import Olmo2Config

from tests.loading.zoo import VOCAB

SIZES = dict(
    vocab_size=VOCAB,
    max_position_embeddings=64,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
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
