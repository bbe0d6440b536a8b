from transformers import Gemma2Config

from tests.loading.zoo import LLAMA_SIZES

SIZES = LLAMA_SIZES

VARIANTS = {
    # windows (4) shorter than the test prompts on layers 0 and 2; caps small enough to bite (random
    # scores are small: an attention cap of 5 moves the logits by only 3e-4, 0.5 by 3e-2)
    "gemma2": lambda: Gemma2Config(
        **SIZES,
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=4,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=3.0,
    ),
    # multi-query, untied, wide heads, no soft-capping, the window on layer 1 only
    "gemma2-mqa-untied-nocap": lambda: Gemma2Config(
        **SIZES,
        num_hidden_layers=3,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=3,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        tie_word_embeddings=False,
    ),
    # untied, so greedy generation from random weights does not collapse onto one token
    "gemma2-untied-capped": lambda: Gemma2Config(
        **SIZES,
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=4,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=10.0,
        tie_word_embeddings=False,
    ),
}
