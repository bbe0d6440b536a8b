"""A synthetic language of short stories: indirect objects, repeated names, agreement, copied lists.

``SyntheticLanguage`` is the organism (``mechscope train language``); ``grammar`` generates
documents with their latent variables; ``tokenizer`` trains and saves the BPE tokenizer.
"""

from mechscope.toys.language.grammar import Sample
from mechscope.toys.language.organism import SyntheticLanguage, figure

__all__ = ["Sample", "SyntheticLanguage", "figure"]
