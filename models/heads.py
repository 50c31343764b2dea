"""SimSiam's projection and prediction MLPs (Chen & He, CVPR 2021, Section 4.1 and Appendix).

    >>> projector = ProjectionMLP(in_dim=512, num_layers=2)     # CIFAR recipe
    >>> predictor = PredictionMLP(dim=2048, hidden_dim=512)      # the 4x bottleneck
"""

from __future__ import annotations

from torch import nn


def _linear_bn_relu(in_dim: int, out_dim: int, batch_norm: bool) -> list[nn.Module]:
    if not batch_norm:
        return [nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True)]
    # No bias: the BN that follows has its own shift.
    return [nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True)]


class ProjectionMLP(nn.Sequential):
    """The projector: (Linear, BN, ReLU) x (num_layers - 1), then Linear and BN without affine.

    The paper uses 3 layers on ImageNet and 2 on CIFAR, every layer 2048 wide. The output BN
    has no learnable scale or shift (the official code also freezes the last Linear's bias,
    which that BN makes redundant; we build it without one).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 2048,
        num_layers: int = 3,
        batch_norm: bool = True,
    ):
        if num_layers < 1:
            raise ValueError("the projection MLP needs at least one layer")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += _linear_bn_relu(dim, hidden_dim, batch_norm)
            dim = hidden_dim
        if batch_norm:
            layers += [nn.Linear(dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False)]
        else:
            layers += [nn.Linear(dim, out_dim)]
        super().__init__(*layers)
        self.out_dim = out_dim


class PredictionMLP(nn.Sequential):
    """The predictor h: a bottleneck 2048 -> 512 -> 2048; BN on the hidden layer only.

    The paper (Appendix B) finds BN on h's output makes training unstable, so it has none.
    """

    def __init__(self, dim: int = 2048, hidden_dim: int = 512, batch_norm: bool = True):
        super().__init__(*_linear_bn_relu(dim, hidden_dim, batch_norm), nn.Linear(hidden_dim, dim))
