"""The SimSiam module and its loss, written to read against the paper's Algorithm 1.

    f = backbone + projector          # encoder
    h = predictor                      # prediction MLP
    z1, z2 = f(x1), f(x2)
    p1, p2 = h(z1), h(z2)
    L = D(p1, z2) / 2 + D(p2, z1) / 2, with D(p, z) = -cos(p, stopgrad(z))

    >>> model = SimSiam(build_backbone("resnet18", small_images=True), projector_layers=2)
    >>> loss = simsiam_loss(model(view1, view2))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from simsiam_embed.models.backbones import Backbone
from simsiam_embed.models.heads import PredictionMLP, ProjectionMLP


class SimSiamOutput(NamedTuple):
    p1: torch.Tensor
    p2: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor


class SimSiam(nn.Module):
    """Backbone + projection MLP (the encoder f) and the prediction MLP h.

    ``use_predictor=False`` and ``stop_gradient=False`` are the paper's ablations (Table 1 and
    Figure 2): both collapse. They exist so the collapse can be reproduced, not to be used.
    """

    def __init__(
        self,
        backbone: Backbone,
        projector_layers: int = 3,
        projector_hidden_dim: int = 2048,
        dim: int = 2048,
        predictor_hidden_dim: int = 512,
        heads_batch_norm: bool = True,
        use_predictor: bool = True,
        stop_gradient: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionMLP(
            backbone.feature_dim, projector_hidden_dim, dim, projector_layers, heads_batch_norm
        )
        # Without a predictor h is the identity (Table 1a, "no pred. MLP").
        self.predictor = (
            PredictionMLP(dim, predictor_hidden_dim, heads_batch_norm) if use_predictor else nn.Identity()
        )
        self.stop_gradient = stop_gradient

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z = f(x): the projector's output."""
        return self.projector(self.backbone(images))

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> SimSiamOutput:
        z1, z2 = self.encode(view1), self.encode(view2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.stop_gradient:
            # The stop-gradient: z is a constant target, the one thing that prevents collapse.
            z1, z2 = z1.detach(), z2.detach()
        return SimSiamOutput(p1, p2, z1, z2)


def negative_cosine_similarity(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) of the paper (Eq. 1), averaged over the batch. Any stop-gradient is the caller's.

    Always in fp32, also under autocast: CPU autocast would run it in bf16 (8 bits of mantissa),
    too coarse for a loss whose useful range is a few thousandths near -1.
    """
    with torch.autocast(device_type=p.device.type, enabled=False):
        return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def simsiam_loss(output: SimSiamOutput, symmetric: bool = True) -> torch.Tensor:
    """The symmetrized loss L = D(p1, z2)/2 + D(p2, z1)/2 (Eq. 2); minimum -1.

    ``symmetric=False`` is the paper's asymmetric variant (Table 4, "asym."): D(p1, z2) alone.
    """
    if not symmetric:
        return negative_cosine_similarity(output.p1, output.z2)
    return (
        negative_cosine_similarity(output.p1, output.z2) / 2
        + negative_cosine_similarity(output.p2, output.z1) / 2
    )
