from transformers import GPTNeoConfig

from tests.loading.zoo import VOCAB


def gpt_neo(**options):
    sizes = dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4)
    return GPTNeoConfig(**{**sizes, **options})


VARIANTS = {
    # layer 0 global, layer 1 local with a window shorter than the 12-token test prompt
    "gpt_neo": lambda: gpt_neo(attention_types=[[["global", "local"], 1]], window_size=4),
    "gpt_neo-local-untied": lambda: gpt_neo(
        num_layers=3,
        attention_types=[[["local"], 3]],
        window_size=5,
        intermediate_size=128,
        activation_function="gelu",
        tie_word_embeddings=False,
    ),
}
