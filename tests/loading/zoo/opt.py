from transformers import OPTConfig

from tests.loading.zoo import VOCAB


def opt(**options):
    return OPTConfig(
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        **options,
    )


VARIANTS = {
    "opt": lambda: opt(),
    "opt-nobias-untied-gelu": lambda: opt(enable_bias=False, tie_word_embeddings=False, activation_function="gelu"),
}
