from transformers import GPTJConfig

from tests.loading.zoo import VOCAB


def gptj(**options):
    return GPTJConfig(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128, **options)


VARIANTS = {
    "gptj": lambda: gptj(rotary_dim=16),  # the whole head rotates
    "gptj-partial-rotary": lambda: gptj(rotary_dim=8),
    "gptj-tied": lambda: gptj(rotary_dim=4, tie_word_embeddings=True),  # the head's bias stays its own
}
