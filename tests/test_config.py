import pytest

from simsiam_embed.settings import PretrainConfig, default_epochs, parse_duration, resolve_pretrain_config
from simsiam_embed.errors import UserError


def resolve(num_images=10_000, side=32, device="cpu", processes=1, **overrides):
    return resolve_pretrain_config("/data", "run", num_images, side, device, overrides, processes=processes)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of the given memory (GiB) and compute capability, as far as the config rules can tell."""
    import torch

    import simsiam_embed.settings as config_module

    def install(memory_gib: float = 80, capability: tuple[int, int] = (8, 0)):
        monkeypatch.setattr(config_module, "gpu_memory_bytes", lambda _device: int(memory_gib * 2 ** 30))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _index=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability[0] >= 8)
    install()
    return install


def test_lr_follows_the_linear_scaling_rule():
    assert PretrainConfig("d", "r", base_lr=0.05, batch_size=512).lr == pytest.approx(0.1)
    assert PretrainConfig("d", "r", base_lr=0.03, batch_size=128).lr == pytest.approx(0.015)


def test_small_images_get_the_cifar_recipe():
    config = resolve(side=32)
    assert (config.recipe, config.backbone, config.small_image_stem) == ("cifar", "resnet18", True)
    assert (config.base_lr, config.weight_decay, config.projector_layers, config.blur) == (0.03, 5e-4, 2, False)
    assert config.crop_size == 32 and config.epochs == 800
    assert config.momentum == 0.9 and config.fix_predictor_lr and config.dim == 2048
    assert any("recipe cifar" in choice for choice in config.choices)


def test_large_images_get_the_imagenet_recipe(fake_gpu):
    gpu = resolve(num_images=1_281_167, side=375, device="cuda")
    assert (gpu.recipe, gpu.backbone, gpu.crop_size, gpu.base_lr, gpu.weight_decay) == ("imagenet", "resnet50", 224, 0.05, 1e-4)
    assert gpu.epochs == 100 and gpu.batch_size == 512 and gpu.projector_layers == 3 and gpu.blur
    cpu = resolve(num_images=1_281_167, side=375)
    assert cpu.backbone == "resnet18" and cpu.batch_size == 256
    assert any("no GPU" in choice for choice in cpu.choices)


def test_medium_images_crop_at_their_own_size():
    assert resolve(side=100).crop_size == 96


def test_epochs_grow_as_the_folder_shrinks():
    assert default_epochs("imagenet", 1_281_167) == 100
    assert 100 < default_epochs("imagenet", 100_000) < 800
    assert default_epochs("imagenet", 500) == 800
    assert default_epochs("cifar", 50_000) == 800


def test_explicit_settings_win_and_are_not_reported_as_choices():
    config = resolve(side=32, backbone="resnet34", base_lr=0.1, epochs=3, batch_size=64)
    assert (config.backbone, config.base_lr, config.epochs, config.batch_size) == ("resnet34", 0.1, 3, 64)
    assert not any("epochs" in choice for choice in config.choices)


def test_time_budget_replaces_epochs():
    config = resolve(time_budget_s=60.0)
    assert config.epochs is None and config.time_budget_s == 60.0
    with pytest.raises(UserError, match="either"):
        resolve(time_budget_s=60.0, epochs=3)


def test_batch_shrinks_to_a_small_folder_but_an_explicit_batch_must_fit():
    assert resolve(num_images=100).batch_size == 64
    with pytest.raises(UserError, match="fewer than one batch"):
        resolve(num_images=100, batch_size=128)
    with pytest.raises(UserError, match="at least 2"):
        resolve(num_images=1)


def test_fp16_needs_a_gpu():
    with pytest.raises(UserError, match="fp16"):
        resolve(amp="fp16")


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("2h", 7200), ("1h30m", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "20x", "0m", "-5m", ""])
def test_bad_durations_are_refused(text):
    with pytest.raises(UserError, match="duration|positive"):
        parse_duration(text)


@pytest.mark.parametrize("memory_gib, processes, expected", [(80, 1, 512), (40, 1, 256), (24, 1, 128), (16, 1, 64),
                                                             (24, 4, 512), (16, 2, 128)])
def test_the_gpu_batch_follows_the_memory_and_keeps_the_lr_rule(fake_gpu, memory_gib, processes, expected):
    """The default 512 pairs of ResNet-50 at 224 px need about 55 GB under AMP: an OOM on 24-40 GB cards."""
    fake_gpu(memory_gib)
    config = resolve(num_images=100_000, side=375, device="cuda", processes=processes)
    assert config.batch_size == expected and config.lr == pytest.approx(0.05 * expected / 256)
    said = [choice for choice in config.choices if choice.startswith(f"batch {expected}:")]
    assert bool(said) == (expected < 512)


def test_an_explicit_gpu_batch_is_kept(fake_gpu):
    fake_gpu(16)
    assert resolve(num_images=100_000, side=375, device="cuda", batch_size=512).batch_size == 512


@pytest.mark.parametrize("processes, expected", [(3, 510), (5, 510), (6, 510), (7, 511), (8, 512)])
def test_the_default_gpu_batch_divides_over_the_processes(fake_gpu, processes, expected):
    """Each process takes batch // processes pairs: 512 over 3 trained 510 while the lr counted 512."""
    fake_gpu(80)
    config = resolve(num_images=100_000, side=375, device="cuda", processes=processes)
    assert config.batch_size == expected and config.lr == pytest.approx(0.05 * expected / 256)
    assert any(choice.startswith(f"batch {expected}: a multiple of the {processes} processes")
               for choice in config.choices) == (expected != 512)


def test_an_explicit_batch_that_does_not_divide_over_the_processes_is_refused(fake_gpu):
    fake_gpu(80)
    with pytest.raises(UserError, match=r"--batch-size 512 does not divide over 3 processes .*: use --batch-size 510 or 513"):
        resolve(num_images=100_000, side=375, device="cuda", processes=3, batch_size=512)


def test_gpu_runs_crop_on_the_device_and_cpu_runs_in_the_workers(fake_gpu):
    gpu = resolve(num_images=10_000, side=375, device="cuda")
    assert gpu.crop_on_device and gpu.augment_on_device
    assert any("crops made on the GPU" in choice for choice in gpu.choices)
    assert not resolve(num_images=10_000, side=375, device="cpu").crop_on_device


def test_small_views_take_swavs_ratio_and_the_loader_crops_them(fake_gpu):
    assert resolve(side=32, small_views=4).small_crop_size == 14   # 32 x 96 / 224
    assert resolve(side=375, small_views=2).small_crop_size == 96
    assert resolve(side=32, small_views=2, small_crop_size=16).small_crop_size == 16
    assert resolve(side=32).small_views == 0 and resolve(side=32).small_crop_size is None
    gpu = resolve(side=375, device="cuda", small_views=2)
    assert not gpu.crop_on_device and any("small views" in choice for choice in gpu.choices)
    with pytest.raises(UserError, match="--small-views needs crops made by the loader"):
        resolve(side=375, device="cuda", small_views=2, crop_on_device=True)
    with pytest.raises(UserError, match="--small-crop-size must be between 8 and the crop size"):
        resolve(side=32, small_views=2, small_crop_size=40)


def test_a_damaged_small_view_setting_is_refused_when_read_back():
    values = PretrainConfig("/data", "run").to_dict()
    with pytest.raises(UserError, match="'small_crop_size' is 10000000"):
        PretrainConfig.from_dict(dict(values, small_views=2, small_crop_size=10_000_000))
    with pytest.raises(UserError, match="'small_views' is -1"):
        PretrainConfig.from_dict(dict(values, small_views=-1))


def test_progressive_resizing_starts_no_larger_than_the_crop_and_is_off_by_default():
    assert resolve(side=32).start_crop_size is None
    assert resolve(side=32, start_crop_size=16).start_crop_size == 16
    with pytest.raises(UserError, match="--start-crop-size must be between 8 and the crop size \\(32\\)"):
        resolve(side=32, start_crop_size=40)
    values = PretrainConfig("/data", "run").to_dict()
    with pytest.raises(UserError, match="'start_crop_size' is 0"):
        PretrainConfig.from_dict(dict(values, start_crop_size=0))


def test_embedding_decodes_with_every_core_for_a_gpu_and_few_for_a_cpu_encoder(monkeypatch):
    """Two decoders starve a GPU that embeds thousands of images a second; on a CPU the encoder's
    own threads need the cores."""
    import os

    from simsiam_embed.settings import EMBED_WORKERS, embed_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert embed_workers(None, on_gpu=True)[0] == 8          # the cores shared among torchrun's processes
    assert embed_workers(None, on_gpu=False)[0] == EMBED_WORKERS
    assert embed_workers(5, on_gpu=True) == (5, "--workers 5")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert embed_workers(None, on_gpu=False)[0] == 1


@pytest.mark.parametrize("median_side, overrides, whole", [
    (32, {"recipe": "imagenet", "crop_size": 32}, True),    # standard stem, images no larger than the crop
    (28, {}, True),                                        # the CIFAR recipe
    (500, {}, False),                                      # photos: the 0.875 centre crop
    (96, {"recipe": "imagenet"}, True),                    # cropped at the images' own 96 px
    (100, {"recipe": "imagenet"}, False),                  # larger than the 96-px crop
])
def test_evaluation_shows_images_no_larger_than_the_crop_whole(median_side, overrides, whole):
    from simsiam_embed.trained_model import preprocessing_for

    config = resolve_pretrain_config("d", "r", 1000, median_side, "cpu", overrides)
    preprocessing = preprocessing_for(config)
    assert (preprocessing.resize_size == preprocessing.input_size) is whole, (median_side, overrides, preprocessing)


def test_a_warm_start_continues_at_a_lower_lr_unless_one_is_given():
    from simsiam_embed.settings import WARM_START_LR_SHARE

    warm = resolve_pretrain_config("d", "r", 1000, 300, "cpu", {"init": "weights.pth"})
    assert warm.base_lr == pytest.approx(0.05 * WARM_START_LR_SHARE) and WARM_START_LR_SHARE < 1
    assert any(choice.startswith(f"base lr {warm.base_lr:g}: a warm start") for choice in warm.choices)
    given = resolve_pretrain_config("d", "r", 1000, 300, "cpu", {"init": "weights.pth", "base_lr": 0.05})
    assert given.base_lr == 0.05
    assert resolve_pretrain_config("d", "r", 1000, 300, "cpu", {}).base_lr == 0.05
