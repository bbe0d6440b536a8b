from transformers import GPT2Config

from tests.loading.zoo import VOCAB

VARIANTS = {
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    "gpt2-untied-relu": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=False,
        activation_function="relu",
    ),
}
