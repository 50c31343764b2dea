"""The networks: backbones, SimSiam heads and the SimSiam module (installed as simsiam_embed.models).

They know nothing of files or the command line.
"""

from simsiam_embed.models.backbones import BACKBONE_NAMES, build_backbone
from simsiam_embed.models.heads import PredictionMLP, ProjectionMLP
from simsiam_embed.models.simsiam import SimSiam, SimSiamOutput, negative_cosine_similarity, simsiam_loss

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
