"""Model organisms: small models with known mechanisms, trained here in minutes on a CPU.

``train(organism)`` runs any of them; ``mechscope.zoo`` loads the shipped checkpoints.
"""

from mechscope.toys.organism import Findings, Organism
from mechscope.toys.registry import ORGANISMS, organism_class
from mechscope.toys.training import TrainConfig, TrainResult, train

__all__ = ["ORGANISMS", "Findings", "Organism", "TrainConfig", "TrainResult", "organism_class", "train"]
