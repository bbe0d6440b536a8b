"""Sparse autoencoders: architectures behind one interface, an activation store, training with
exact resume, the field's evaluation metrics, ground truth to score them against, and SAELens'
file format."""

from mechscope.sae.activations import ActivationStore
from mechscope.sae.base import SAE, Losses, SAEConfig, SAEError, SparseLatents, build_sae
from mechscope.sae.evaluation import SAEMetrics, evaluate_sae
from mechscope.sae.features import FeatureStats, feature_statistics
from mechscope.sae.ground_truth import SyntheticDictionary, latent_alignment, match_features
from mechscope.sae.jumprelu import JumpReLUSAE
from mechscope.sae.relu import ReLUSAE
from mechscope.sae.saelens import load_saelens, save_saelens
from mechscope.sae.token_sources import TokenSource, token_source
from mechscope.sae.topk import BatchTopKSAE, TopKSAE
from mechscope.sae.training import TrainSAEConfig, train_sae
from mechscope.sae.transcoder import (
    BatchTopKTranscoder,
    JumpReLUTranscoder,
    ReLUTranscoder,
    TopKTranscoder,
    Transcoder,
    transcoder_config,
)

__all__ = [
    "SAE",
    "ActivationStore",
    "BatchTopKSAE",
    "BatchTopKTranscoder",
    "FeatureStats",
    "JumpReLUSAE",
    "JumpReLUTranscoder",
    "Losses",
    "ReLUSAE",
    "ReLUTranscoder",
    "SAEConfig",
    "SAEError",
    "SAEMetrics",
    "SparseLatents",
    "SyntheticDictionary",
    "TokenSource",
    "TopKSAE",
    "TopKTranscoder",
    "TrainSAEConfig",
    "Transcoder",
    "build_sae",
    "evaluate_sae",
    "feature_statistics",
    "latent_alignment",
    "load_saelens",
    "match_features",
    "save_saelens",
    "token_source",
    "train_sae",
    "transcoder_config",
]
