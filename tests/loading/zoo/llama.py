from transformers import LlamaConfig

from tests.loading.zoo import LLAMA_SIZES


def llama(**options):
    sizes = LLAMA_SIZES | dict(num_hidden_layers=2)
    return LlamaConfig(**(sizes | options))


VARIANTS = {
    "llama": lambda: llama(),  # untied, GQA ratio 1
    "llama-tied": lambda: llama(tie_word_embeddings=True),
    "llama-gqa2": lambda: llama(num_key_value_heads=2),
    "llama-gqa4": lambda: llama(num_attention_heads=8, num_key_value_heads=2),
    "llama-mqa": lambda: llama(num_key_value_heads=1),
    "llama-bias": lambda: llama(attention_bias=True, mlp_bias=True, num_key_value_heads=2),
    "llama-head-dim24": lambda: llama(head_dim=24, num_key_value_heads=2),
    "llama-rope-linear": lambda: llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    # dynamic NTK only acts past max_position_embeddings, so it is shorter than the 12 test tokens
    "llama-rope-dynamic": lambda: llama(
        max_position_embeddings=8, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    ),
    # original length 32 puts the 8 frequencies of d_head 16 in all three llama3 bands
    "llama-rope-llama3": lambda: llama(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    ),
}
