from transformers import GPTNeoXConfig

from tests.loading.zoo import VOCAB


def gpt_neox(rope=None, **options):
    options = {"max_position_embeddings": 64, **options}
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, **(rope or {})},
        **options,
    )


VARIANTS = {
    "gpt_neox": lambda: gpt_neox(),  # Pythia's shape: rotary on a quarter of each head, parallel blocks
    "gpt_neox-full-rotary-sequential-tied": lambda: gpt_neox(
        rope={"partial_rotary_factor": 1.0, "rope_theta": 500.0}, use_parallel_residual=False, tie_word_embeddings=True
    ),
    "gpt_neox-linear-rope-nobias": lambda: gpt_neox(
        rope={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
        attention_bias=False,
        hidden_act="gelu_fast",
    ),
    # dynamic NTK only rescales past max_position_embeddings, so the 12-token tests must exceed it
    "gpt_neox-dynamic-rope": lambda: gpt_neox(
        rope={"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 1.0}, max_position_embeddings=8
    ),
}
