from transformers import GemmaConfig

from tests.loading.zoo import LLAMA_SIZES

SIZES = LLAMA_SIZES

VARIANTS = {
    "gemma": lambda: GemmaConfig(**SIZES, num_hidden_layers=2, num_key_value_heads=4, head_dim=16),
    # multi-query, and heads wider than d_model / n_heads (as in gemma-7b), untied
    "gemma-mqa-wide-untied": lambda: GemmaConfig(
        **SIZES, num_hidden_layers=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False
    ),
    # grouped-query with biases on Q, K, V and O, rope_theta off its default; the legacy "gelu" name
    "gemma-gqa-bias": lambda: GemmaConfig(
        **SIZES,
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=True,
        hidden_act="gelu",
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
}
