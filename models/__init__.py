"""The networks: backbones, SimSiam heads and the SimSiam module (installed as simsiam_embed.models).

They know nothing of files or the command line.
"""

from .backbones import BACKBONE_NAMES, build_backbone
from .heads import PredictionMLP, ProjectionMLP
from .simsiam import SimSiam, SimSiamOutput, negative_cosine_similarity, simsiam_loss

__all__ = [
    "BACKBONE_NAMES",
    "build_backbone",
    "PredictionMLP",
    "ProjectionMLP",
    "SimSiam",
    "SimSiamOutput",
    "negative_cosine_similarity",
    "simsiam_loss",
]
