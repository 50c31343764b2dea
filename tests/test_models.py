import pytest
import torch
from torch import nn

from simsiam_embed.models import (
    PredictionMLP, ProjectionMLP, SimSiam, build_backbone, negative_cosine_similarity, simsiam_loss,
)


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_backbones_give_pooled_features(name, dim):
    backbone = build_backbone(name).eval()
    assert backbone.feature_dim == dim
    assert backbone(torch.zeros(2, 3, 64, 64)).shape == (2, dim)


def test_small_image_stem_keeps_resolution():
    small = build_backbone("resnet18", small_images=True)
    assert small.resnet.conv1.kernel_size == (3, 3) and small.resnet.conv1.stride == (1, 1)
    assert isinstance(small.resnet.maxpool, nn.Identity)
    assert small.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 512)


def test_stem_stride_two_halves_every_feature_map():
    stride_two = build_backbone("resnet18", small_images=True, stem_stride=2).eval()
    assert stride_two.resnet.conv1.stride == (2, 2)
    assert stride_two.resnet.layer1(stride_two.resnet.conv1(torch.zeros(2, 3, 28, 28))).shape[-2:] == (14, 14)


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("vgg16")


def test_projection_mlp_follows_the_paper():
    three = ProjectionMLP(512, 2048, 2048, num_layers=3)
    linears = [m for m in three if isinstance(m, nn.Linear)]
    norms = [m for m in three if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == 3 and all(layer.bias is None for layer in linears)
    assert len(norms) == 3 and norms[-1].affine is False and norms[0].affine is True
    assert isinstance(three[-1], nn.BatchNorm1d)
    two = ProjectionMLP(512, num_layers=2)
    assert len([m for m in two if isinstance(m, nn.Linear)]) == 2
    assert three.eval()(torch.randn(4, 512)).shape == (4, 2048)


def test_prediction_mlp_is_a_bottleneck_without_output_bn():
    predictor = PredictionMLP(2048, 512)
    first, bn, relu, last = predictor
    assert (first.in_features, first.out_features, last.out_features) == (2048, 512, 2048)
    assert first.bias is None and last.bias is not None
    assert isinstance(bn, nn.BatchNorm1d) and isinstance(relu, nn.ReLU)


def _tiny_model(**kwargs) -> SimSiam:
    return SimSiam(build_backbone("resnet18", small_images=True), projector_layers=2,
                   projector_hidden_dim=32, dim=32, predictor_hidden_dim=8, **kwargs)


def test_loss_is_symmetric_and_bounded():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 32) for _ in range(4))
    from simsiam_embed.models import SimSiamOutput

    forward = simsiam_loss(SimSiamOutput(p1, p2, z1, z2))
    swapped = simsiam_loss(SimSiamOutput(p2, p1, z2, z1))
    assert torch.allclose(forward, swapped)
    assert -1.0 <= forward.item() <= 1.0
    assert simsiam_loss(SimSiamOutput(z2, z1, z1, z2)).item() == pytest.approx(-1.0)
    assert negative_cosine_similarity(p1, -p1).item() == pytest.approx(1.0)


def _parameter_grads(model, loss):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)])


def test_stop_gradient_blocks_the_target_branch():
    torch.manual_seed(0)
    model = _tiny_model()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    output = model(x1, x2)
    assert not output.z1.requires_grad and not output.z2.requires_grad
    through_model = _parameter_grads(model, simsiam_loss(output))

    # The same loss written out by hand, once with z as a constant and once without.
    z1, z2 = model.encode(x1), model.encode(x2)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    stopped = negative_cosine_similarity(p1, z2.detach()) / 2 + negative_cosine_similarity(p2, z1.detach()) / 2
    flowing = negative_cosine_similarity(p1, z2) / 2 + negative_cosine_similarity(p2, z1) / 2
    assert torch.allclose(through_model, _parameter_grads(model, stopped), atol=1e-6)
    assert not torch.allclose(through_model, _parameter_grads(model, flowing), atol=1e-6)


def test_without_stop_gradient_the_target_gets_gradient():
    torch.manual_seed(0)
    model = _tiny_model(stop_gradient=False)
    output = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert output.z1.requires_grad and output.z2.requires_grad
    grad = torch.autograd.grad(simsiam_loss(output), output.z2)[0]
    assert grad.abs().sum() > 0


def test_no_predictor_ablation_has_no_predictor_module():
    model = _tiny_model(use_predictor=False)
    assert isinstance(model.predictor, nn.Identity)
    assert not list(model.predictor.parameters())


def test_the_loss_is_computed_in_fp32_under_bf16_autocast():
    from simsiam_embed.models import negative_cosine_similarity

    p, z = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_p, low_z = torch.nn.functional.linear(p, torch.eye(16)), torch.nn.functional.linear(z, torch.eye(16))
        assert low_p.dtype == torch.bfloat16   # what the heads hand over under autocast
        loss = negative_cosine_similarity(low_p, low_z)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("capability, native, expected", [((7, 0), True, "fp16"), ((7, 5), True, "fp16"),
                                                          ((8, 0), True, "bf16"), ((9, 0), True, "bf16")])
def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, native, expected):
    """V100 and T4 report bf16 support through emulation; they get fp16 with a loss scaler."""
    from simsiam_embed.settings import default_amp

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _index=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native if not including_emulation else True)
    assert default_amp("cuda") == expected


def test_small_views_predict_both_full_views_and_the_loss_stays_a_mean():
    """Multi-crop: the loss averages the two full-view pairs and every (small view, full view)
    pair, so it is -1 when all agree, and each small view pulls on the backbone."""
    from simsiam_embed.models import SimSiamOutput

    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 32) for _ in range(4))
    p_small = torch.randn(6, 3, 32)
    by_hand = (negative_cosine_similarity(p1, z2) + negative_cosine_similarity(p2, z1)
               + sum(negative_cosine_similarity(p_small[:, s], z) for s in range(3) for z in (z1, z2))) / 8
    assert simsiam_loss(SimSiamOutput(p1, p2, z1, z2, p_small)).item() == pytest.approx(by_hand.item(), abs=1e-6)
    aligned = SimSiamOutput(z2, z1, z1, z2, (z1 + z2).unsqueeze(1).expand(-1, 3, -1))
    assert simsiam_loss(SimSiamOutput(z2, z1, z1, z2)).item() == pytest.approx(-1.0)
    assert simsiam_loss(aligned).item() > -1.0   # a small view between the two is not both
    same = torch.randn(6, 32)
    assert simsiam_loss(SimSiamOutput(same, same, same, same, torch.stack([same] * 3, 1))).item() == pytest.approx(-1.0)

    model = _tiny_model()
    x1, x2, small = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(8, 3, 8, 8)
    output = model(x1, x2, small)
    assert output.p_small.shape == (4, 2, 32) and not output.z1.requires_grad
    # The small views reach the backbone: without them the gradient differs.
    with_small = _parameter_grads(model, simsiam_loss(output))
    without = _parameter_grads(model, simsiam_loss(model(x1, x2)))
    assert not torch.allclose(with_small, without)


def test_residual_blocks_start_as_identities_unless_torchvisions_init_is_asked_for():
    from simsiam_embed.settings import PretrainConfig
    from simsiam_embed.trained_model import build_model

    official = build_model(PretrainConfig(data_dir="", run_name="r", backbone="resnet18"))
    assert torch.count_nonzero(official.backbone.resnet.layer1[0].bn2.weight) == 0
    torchvision_init = build_model(PretrainConfig(data_dir="", run_name="r", backbone="resnet18", zero_init_residual=False))
    assert torch.all(torchvision_init.backbone.resnet.layer1[0].bn2.weight == 1)
