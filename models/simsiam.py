"""The SimSiam module and its loss, written to read against the paper's Algorithm 1.

    f = backbone + projector          # encoder
    h = predictor                      # prediction MLP
    z1, z2 = f(x1), f(x2)
    p1, p2 = h(z1), h(z2)
    L = D(p1, z2) / 2 + D(p2, z1) / 2, with D(p, z) = -cos(p, stopgrad(z))

Optionally with small extra views (multi-crop, as SwAV and DINO add them): each small view's
prediction is pulled towards both full views' z, and the loss averages every (prediction,
other view's target) pair, so its minimum stays -1.

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
    #: Predictions of the small views, N x S x dim (sample-major), when there are any.
    p_small: torch.Tensor | None = None


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

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, small: torch.Tensor | None = None) -> SimSiamOutput:
        """``small``: N x S small views (N*S images, sample-major), one batch of their own so that
        batch norm sees one resolution at a time (as SwAV runs its crops)."""
        z1, z2 = self.encode(view1), self.encode(view2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        p_small = None
        if small is not None:
            p_small = self.predictor(self.encode(small)).unflatten(0, (len(view1), -1))
        if self.stop_gradient:
            # The stop-gradient: z is a constant target, the one thing that prevents collapse.
            z1, z2 = z1.detach(), z2.detach()
        return SimSiamOutput(p1, p2, z1, z2, p_small)


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
    With small views, the mean over every pair (a view's prediction, a full view's target other
    than itself): the two pairs above and 2S per sample for S small views, so one small view
    weighs what one full view does.
    """
    if not symmetric:
        full_views = [(output.p1, output.z2)]
    else:
        full_views = [(output.p1, output.z2), (output.p2, output.z1)]
    loss = sum(negative_cosine_similarity(p, z) for p, z in full_views)
    pairs = len(full_views)
    if output.p_small is not None:
        small_views = output.p_small.shape[1]
        for z in (output.z1, output.z2):
            # Every small view against this target: the mean over N x S, weighted by S.
            loss = loss + small_views * negative_cosine_similarity(output.p_small, z.unsqueeze(1).expand_as(output.p_small))
        pairs += 2 * small_views
    return loss / pairs
