"""The artefact layer and the one training loop: what a received folder must not do, and what
every task gets from the loop (divergence decided on every rank, a checkpoint that must fit)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import (
    FAST_TRAINING, assert_one_line_error_in_process, build_pixel_index, invoke, make_image_folder,
)
from simsiam_embed.artefacts import (
    Checkpoint, EncoderMetadata, RunFolder, encoder_path_for, exported_encoder_path, read_metrics,
)
from simsiam_embed.errors import UserError
from simsiam_embed.images import Preprocessing
from simsiam_embed.index.store import load_index
from simsiam_embed.training.loop import LoopPlan, MixedPrecision, StopRequest, TaskDefaults, TrainingLoop

# --------------------------------------------------------------------------------------------
# A received index folder


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=1)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's notes\n")
    (index_dir / ".lock").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        build_pixel_index(folder, index_dir)
    assert victim.read_text() == "the user's notes\n"


def _received_index(tmp_path: Path, per_class: int = 1) -> tuple[Path, Path, Path]:
    """An index as received: its image folder, the index folder and its live generation."""
    folder = make_image_folder(tmp_path / "images", per_class=per_class)
    index_dir = tmp_path / "index"
    build_pixel_index(folder, index_dir)
    return folder, index_dir, index_dir / (index_dir / "CURRENT").read_text().strip()


def test_current_as_a_symlink_is_never_read_through(tmp_path):
    _, index_dir, _ = _received_index(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("gen-TOPSECRET-password\n")
    (index_dir / "CURRENT").unlink()
    (index_dir / "CURRENT").symlink_to(secret)
    with pytest.raises(UserError) as refused:
        load_index(index_dir)
    assert "symbolic link" in str(refused.value) and "TOPSECRET" not in str(refused.value)


def test_a_damaged_current_is_named_not_quoted(tmp_path):
    _, index_dir, _ = _received_index(tmp_path)
    (index_dir / "CURRENT").write_text("my-bank-pin-1234\n")
    with pytest.raises(UserError) as refused:
        load_index(index_dir)
    assert "CURRENT" in str(refused.value) and "1234" not in str(refused.value)


def test_a_generation_that_is_a_symlink_outside_the_index_is_refused(tmp_path):
    _, index_dir, live = _received_index(tmp_path)
    outside = tmp_path / "elsewhere"
    live.rename(outside)
    live.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="symbolic link"):
        load_index(index_dir)


@pytest.mark.parametrize("name", ["faiss.index", "vectors.npy", "catalog.sqlite", "ids.npy"])
def test_a_file_of_a_generation_that_is_a_link_is_refused(tmp_path, name):
    _, index_dir, live = _received_index(tmp_path)
    outside = tmp_path / f"outside-{name}"
    (live / name).rename(outside)
    (live / name).symlink_to(outside)
    with pytest.raises(UserError, match=f"{name} is a symbolic link"):
        load_index(index_dir)


def test_a_damaged_faiss_index_is_named_not_quoted_and_prints_nothing(tmp_path, capfd):
    _, index_dir, live = _received_index(tmp_path)
    (live / "faiss.index").write_bytes(b"PIN-8642" + bytes(64))
    with pytest.raises(UserError) as refused:
        load_index(index_dir)
    assert "faiss.index is not an index FAISS can read" in str(refused.value)
    assert "8642" not in str(refused.value)
    assert capfd.readouterr().out == ""


def test_ids_that_do_not_match_the_catalog_are_refused(tmp_path):
    folder, index_dir, live = _received_index(tmp_path, per_class=2)
    ids = np.load(live / "ids.npy")
    np.save(live / "ids.npy", np.zeros_like(ids))
    with pytest.raises(UserError, match="ids do not match its catalog"):
        load_index(index_dir)
    assert_one_line_error_in_process(invoke("search", str(next(folder.rglob("*.png"))), "--index-dir", str(index_dir)),
                                     "ids do not match")


@pytest.mark.parametrize("index_type", [None, "IVF4,Flat"])
def test_ids_in_another_order_than_the_faiss_index_holds_are_refused(tmp_path, index_type):
    """A reversal keeps every id in the catalog's range: only FAISS's own ids tell it is wrong."""
    from conftest import PixelEncoder, pixel_identity
    from simsiam_embed.index.store import update_index

    folder = make_image_folder(tmp_path / "images", per_class=12)
    index_dir = tmp_path / "index"
    (tmp_path / "model.onnx").write_bytes(b"stand-in")
    update_index(folder, PixelEncoder(), pixel_identity(tmp_path / "model.onnx"), index_dir, index_type,
                 workers=0, report=lambda _m: None, show_progress=False)
    live = index_dir / (index_dir / "CURRENT").read_text().strip()
    load_index(index_dir)   # as built, it opens
    ids = np.load(live / "ids.npy")
    np.save(live / "ids.npy", ids[::-1].copy())
    with pytest.raises(UserError, match="ids.npy does not match the FAISS index's ids"):
        load_index(index_dir)


def test_ids_that_are_not_integers_are_named_as_the_ids(tmp_path):
    _, index_dir, live = _received_index(tmp_path, per_class=2)
    np.save(live / "ids.npy", np.load(live / "ids.npy").astype(np.float64))
    with pytest.raises(UserError, match="ids.npy holds float64 values"):
        load_index(index_dir)


def test_an_index_run_that_finds_no_change_writes_no_new_generation(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=1)
    encoder = tmp_path / "pixel.onnx"
    from conftest import write_pixel_onnx

    write_pixel_onnx(encoder)
    build_pixel_index(folder, tmp_path / "index", encoder)
    generation = (tmp_path / "index" / "CURRENT").read_text()
    again = build_pixel_index(folder, tmp_path / "index", encoder)
    assert (tmp_path / "index" / "CURRENT").read_text() == generation
    assert again.unchanged == again.count > 0 and again.added == again.changed == again.removed == 0


# --------------------------------------------------------------------------------------------
# Artefact types


def test_checkpoint_round_trip_and_facts_without_weights(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    Checkpoint(kind="pretrain", settings={"data_dir": "/data"}, model={"w": torch.ones(3)}, step=7, total_steps=9,
               finished=False, elapsed_s=1.5, skipped={"a.png": "truncated"}, extra={"steps_per_epoch": 3}).save(path)
    loaded = Checkpoint.load(path, kind="pretrain")
    assert loaded.step == 7 and loaded.total_steps == 9 and loaded.skipped == {"a.png": "truncated"}
    assert loaded.extra == {"steps_per_epoch": 3} and torch.equal(loaded.model["w"], torch.ones(3))
    facts = RunFolder(path.parent).facts()
    assert (facts.kind, facts.step, facts.finished, facts.data_dir) == ("pretrain", 7, False, "/data")


def test_encoder_metadata_round_trips_and_refuses_a_bad_field():
    metadata = EncoderMetadata(Preprocessing(input_size=28, resize_size=28), embedding_dim=512, backbone="resnet18")
    assert EncoderMetadata.from_props(metadata.to_props(), "e.onnx") == metadata
    for field, bad in (("embedding_dim", "0"), ("mean", "[1, 2]"), ("head", "decoder"), ("interpolation", "magic")):
        with pytest.raises(UserError, match=field):
            EncoderMetadata.from_props({**metadata.to_props(), field: bad}, "e.onnx")


def test_metrics_records_keep_numbers_and_flags_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": -0.5, "note": "text", "collapse_warning": true, "lr": null}\n'
                    '{"step": "3", "loss": 1}\n{"step": 4, "loss": NaN}\n{"step": 5\n')
    records = read_metrics(path)
    assert [r.step for r in records] == [2, 4]
    assert records[0].values == {"loss": -0.5, "collapse_warning": True} and records[1].get("loss") is None


def test_an_encoder_lives_beside_the_checkpoint_it_came_from(tmp_path):
    assert encoder_path_for(tmp_path / "checkpoint.pt") == tmp_path / "encoder.onnx"
    assert encoder_path_for(tmp_path / "epoch-10.pt") == tmp_path / "epoch-10.onnx"
    assert exported_encoder_path(tmp_path / "checkpoint.pt", "projector", "fp16").name == "encoder-projector-fp16.onnx"


def test_index_model_names_the_checkpoint_file_it_is_given(tmp_path):
    """`index --model some/file.pt` used some/checkpoint.pt instead."""
    from simsiam_embed.settings import PretrainConfig
    from simsiam_embed.trained_model import build_model

    images = make_image_folder(tmp_path / "images", per_class=1, size=16)
    config = PretrainConfig(str(images), "mine", recipe="cifar", backbone="resnet18", small_image_stem=True,
                            crop_size=16, dim=16, projector_hidden_dim=16, predictor_hidden_dim=8, projector_layers=2)
    folder = tmp_path / "models"
    folder.mkdir()
    Checkpoint(kind="pretrain", settings=config.to_dict(), model=build_model(config).state_dict(), step=1,
               finished=True).save(folder / "mine.pt")
    (folder / "checkpoint.pt").write_bytes(b"not the one asked for")
    result = invoke("index", str(images), "--model", str(folder / "mine.pt"), "--workspace", str(tmp_path),
                    "--workers", "0")
    assert result.exit_code == 0, result.output
    assert (folder / "mine.onnx").is_file() and not (folder / "encoder.onnx").exists()


# --------------------------------------------------------------------------------------------
# The one training loop


class _TinyTask(TaskDefaults):
    """A task with a linear model whose loss turns NaN at ``nan_from`` (on the ranks in ``nan_ranks``)."""

    kind = "pretrain"

    def __init__(self, nan_from: int | None = None):
        from simsiam_embed.settings import PretrainConfig

        self.settings = PretrainConfig(data_dir="d", run_name="tiny")
        torch.manual_seed(0)
        self.model = self.network = nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.amp = MixedPrecision("off", "cpu")
        self.dataset = list(range(8))
        self.nan_from = nan_from
        self.steps = 0

    def loader_shape(self):
        return torch.tensor, 8, "numbers"

    def begin_step(self, step, total_steps):
        return 0.1

    def train_step(self, batch):
        loss = self.model(torch.ones(len(batch), 4)).pow(2).mean()
        if self.nan_from is not None and self.steps >= self.nan_from:
            loss = loss * float("nan")
        self.steps += 1
        self.amp.backward_and_step(loss, self.optimizer)
        return {"loss": loss.detach()}


class _Dataset(list):
    def __getitem__(self, key):
        return (float(key[1]) if isinstance(key, tuple) else super().__getitem__(key)), None


def _loop(tmp_path: Path, task: _TinyTask, total_steps: int = 8, clock=None) -> TrainingLoop:
    from simsiam_embed.distributed import DistributedContext

    task.dataset = _Dataset(range(8))
    (tmp_path / "run").mkdir(exist_ok=True)
    plan = LoopPlan(steps_per_epoch=4, total_steps=total_steps, log_every=2, batch_size=2, seed=0, workers=0)
    return TrainingLoop(task, RunFolder(tmp_path / "run"), plan, DistributedContext(), "cpu", lambda _m: None,
                        **({"clock": clock} if clock else {}))


def test_the_loop_trains_checkpoints_each_epoch_and_finishes(tmp_path):
    loop = _loop(tmp_path, _TinyTask())
    outcome = loop.run(StopRequest(), started=0.0, show_progress=False)
    assert outcome.finished and outcome.step == 8
    saved = Checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert saved.finished and saved.step == 8 and saved.kind == "pretrain"
    steps = [r.step for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.has("lr")]
    assert steps == [1, 2, 4, 6, 8]   # every log_every, and the first step (a short run still has curves)


def test_a_diverging_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    loop = _loop(tmp_path, _TinyTask(nan_from=5))
    with pytest.raises(UserError, match="training diverged: the (loss|weights) became NaN") as diverged:
        loop.run(StopRequest(), started=0.0, show_progress=False)
    assert "step 4" in str(diverged.value)
    saved = Checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert saved.step == 4 and all(torch.isfinite(v).all() for v in saved.model.values())


def test_divergence_is_decided_on_the_mean_over_every_rank(tmp_path, monkeypatch):
    """Under torchrun the decision must be the same on every rank: it is taken on the all-reduced
    mean of the loss, never on one rank's own value (which left the others waiting in DDP)."""
    import simsiam_embed.training.loop as loop_module

    seen = []

    def mean_over_ranks(value, context):
        seen.append(float(value))
        return torch.tensor(float("nan"))   # another rank's loss went non-finite; this one's did not

    monkeypatch.setattr(loop_module, "mean_over_ranks", mean_over_ranks)
    loop = _loop(tmp_path, _TinyTask())
    with pytest.raises(UserError, match="the loss became NaN"):
        loop.run(StopRequest(), started=0.0, show_progress=False)
    assert seen and all(math.isfinite(value) for value in seen)


def test_a_run_that_cannot_fit_its_checkpoint_stops_before_the_first_step(tmp_path, monkeypatch):
    import shutil

    import simsiam_embed.artefacts as artefacts

    real = shutil.disk_usage
    monkeypatch.setattr(artefacts.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=200_000))   # about 200 KB free
    task = _TinyTask()
    task.model = task.network = nn.Linear(1000, 200)   # a checkpoint of about 800 KB
    task.optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1)
    loop = _loop(tmp_path, task)
    with pytest.raises(UserError, match="No space|free some space"):
        loop.run(StopRequest(), started=0.0, show_progress=False)
    assert task.steps == 0 and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_run_whose_folder_holds_one_checkpoint_but_not_two_stops_before_the_first_step(tmp_path, monkeypatch):
    """The second save writes beside the first: room for one copy is a run that fails at its end."""
    import shutil

    import simsiam_embed.artefacts as artefacts

    real = shutil.disk_usage
    free = {"bytes": 3_000_000}   # a checkpoint (weights and momentum) of about 1.6 MB fits once, not twice
    monkeypatch.setattr(artefacts.shutil, "disk_usage", lambda path: real(path)._replace(free=free["bytes"]))
    task = _TinyTask()
    task.model = task.network = nn.Linear(1000, 200)
    task.optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="checkpoints need about"):
        _loop(tmp_path, task).run(StopRequest(), started=0.0, show_progress=False)
    assert task.steps == 0

    # Resuming: the checkpoint on disk already holds its bytes; the same free space takes the next one.
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(bytes(1_600_000))
    _loop(tmp_path, task).check_space()


def test_a_network_too_large_for_memory_is_one_line(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=3)
    result = invoke("pretrain", str(folder), *FAST_TRAINING, "--projector-hidden-dim", "1000000000", cwd=tmp_path)
    assert_one_line_error_in_process(result, "projector")


def test_wide_heads_that_cannot_train_in_memory_are_refused_before_the_first_step(tmp_path, monkeypatch):
    """--dim 300000 built (PyTorch allocates lazily), trained two steps at 16 GB and was killed."""
    import simsiam_embed.training.pretrain as pretrain_module

    monkeypatch.setattr(pretrain_module, "physical_memory_bytes", lambda: 24 << 30)   # the 24 GiB machine
    folder = make_image_folder(tmp_path / "images", per_class=3)
    result = invoke("pretrain", str(folder), *FAST_TRAINING, "--dim", "300000", "--projector-hidden-dim", "2048",
                    "--predictor-hidden-dim", "512",
                    cwd=tmp_path)
    assert_one_line_error_in_process(result, "--dim (now 300000)", "GiB")
    assert not (tmp_path / "runs" / "images" / "checkpoint.pt").exists()


# --------------------------------------------------------------------------------------------
# Defaults in one place


def test_a_chosen_line_is_printed_only_for_what_was_chosen(monkeypatch):
    """`pretrain --amp off` printed "chosen: AMP bf16 on the CPU" on CPUs with bf16 units."""
    import simsiam_embed.settings as settings

    monkeypatch.setattr(settings, "default_amp", lambda device: "bf16")
    chosen = settings.resolve_pretrain_config("d", "r", 1000, 32, "cpu", {})
    assert chosen.amp == "bf16" and any("AMP bf16" in line for line in chosen.choices)
    given = settings.resolve_pretrain_config("d", "r", 1000, 32, "cpu", {"amp": "off"})
    assert given.amp == "off" and not any("AMP" in line for line in given.choices)


def test_the_settings_dataclass_holds_the_effective_defaults(monkeypatch):
    """The dataclass said channels_last False, amp off and 4 workers while every run used others."""
    import simsiam_embed.settings as settings

    monkeypatch.setattr(settings, "default_amp", lambda device: "bf16")
    built = settings.PretrainConfig("d", "r")
    assert built.channels_last is True and built.amp == "bf16"
    assert built.num_workers == settings.default_loader_workers()
    resolved = settings.resolve_pretrain_config("d", "r", 10_000, 300, "cpu", {"recipe": "imagenet", "backbone": "resnet50"})
    # The folder's size and the CPU set these, and say why; whether the images fit the crop is the folder's.
    adapted = {"epochs", "batch_size", "choices", "images_within_crop"}
    differ = {key for key, value in resolved.to_dict().items() if getattr(built, key) != value} - adapted
    assert differ == set()
    cifar = settings.resolve_pretrain_config("d", "r", 10_000, 32, "cpu", {})
    for key, value in settings.RECIPE_SETTINGS["cifar"].items():
        assert getattr(cifar, key) == value or key in {"epochs", "batch_size"}


def test_pretrain_help_shows_the_recipes_defaults():
    from cli.pretrain import pretrain_command

    helps = {param.name: param.help for param in pretrain_command.params}
    assert "[default: 0.05, cifar 0.03; 0.3x that with --init]" in helps["base_lr"]
    assert "[default: 3, cifar 2]" in helps["projector_layers"]
    assert "[default: on, cifar off]" in helps["blur"]
    assert "bf16 on GPUs and CPUs with native bf16" in helps["amp"]   # it said "off on CPU"


def test_detection_help_shows_the_configs_own_defaults():
    """finetune-detection wrote every default twice, in the CLI and in DetectionConfig."""
    import dataclasses

    from cli.detection import finetune_detection_command
    from simsiam_embed.detection.settings import DetectionConfig

    params = {param.name: param for param in finetune_detection_command.params}
    parsed = finetune_detection_command.make_context("finetune-detection", ["--data", "boxes.json"]).params
    for field in dataclasses.fields(DetectionConfig):
        option = params.get(field.name)
        if option is None or field.default in (None, dataclasses.MISSING):
            continue
        assert parsed[field.name] is None, field.name   # unset: the config decides, not a copy of its default
        assert f"[default: {field.default}]" in option.help, field.name


def test_a_python_caller_gets_the_gpu_policy_of_the_command_line(monkeypatch):
    """Detection's device, AMP and batch policy lived in the CLI: a Python caller trained fp32 on a GPU."""
    import simsiam_embed.settings as settings
    from simsiam_embed.detection.settings import DetectionConfig

    monkeypatch.setattr(settings, "gpu_memory_bytes", lambda _device: 80 * 2 ** 30)
    on_gpu = DetectionConfig(data="x", device="cuda")
    choices = on_gpu.choose_for_hardware(processes=1)
    assert (on_gpu.amp, on_gpu.channels_last, on_gpu.batch_size) == ("fp16", True, 16)
    assert choices and choices[0].startswith("batch 16:")
    on_cpu = DetectionConfig(data="x", device="cpu", batch_size=2)
    assert on_cpu.choose_for_hardware() == [] and (on_cpu.amp, on_cpu.channels_last, on_cpu.batch_size) == ("off", False, 2)
    assert on_gpu.norm == on_cpu.norm == "bn"   # one process: its own batch norm


def test_detection_on_several_gpus_shares_batch_norm_statistics(monkeypatch):
    """Under torchrun on GPUs detection defaulted to per-GPU BN over 2 images a GPU."""
    import simsiam_embed.settings as settings
    from simsiam_embed.detection.settings import DetectionConfig

    monkeypatch.setattr(settings, "gpu_memory_bytes", lambda _device: 16 * 2 ** 30)
    several = DetectionConfig(data="x", device="cuda")
    choices = several.choose_for_hardware(processes=4)
    assert several.norm == "syncbn" and any(line.startswith("norm syncbn") for line in choices)
    chosen = DetectionConfig(data="x", device="cuda", norm="bn")
    chosen.choose_for_hardware(processes=4)
    assert chosen.norm == "bn"   # the user's word stands


def test_embedding_defaults_are_written_once(tmp_path):
    import inspect

    from cli.flow import embed_command, index_command
    from simsiam_embed.flow import index_folder
    from simsiam_embed.inference.embed import embed_folder, embed_paths
    from simsiam_embed.settings import EMBED_BATCH_SIZE, EMBED_WORKERS

    for function in (embed_folder, embed_paths):
        parameters = inspect.signature(function).parameters
        assert (parameters["batch_size"].default, parameters["workers"].default) == (EMBED_BATCH_SIZE, EMBED_WORKERS)
    # The commands leave the workers to settings.embed_workers, which knows where the encoder runs.
    parameters = inspect.signature(index_folder).parameters
    assert (parameters["batch_size"].default, parameters["workers"].default) == (EMBED_BATCH_SIZE, None)
    for command in (embed_command, index_command):
        defaults = command.make_context(command.name, [str(tmp_path), "-o", "out"] if command is embed_command else []).params
        assert (defaults["batch_size"], defaults["workers"]) == (EMBED_BATCH_SIZE, None)


# --------------------------------------------------------------------------------------------
# The command line starts at once


@pytest.mark.parametrize("args", [["--help"], ["pretrain", "--help"], ["index", "--help"], ["search", "--help"],
                                  ["dedup", "--help"], ["finetune-detection", "--help"], ["knn", "--help"]])
def test_help_imports_no_heavy_library(args):
    import subprocess
    import sys

    probe = ("import sys\nfrom simsiam_embed.cli.main import cli\ntry:\n    cli(%r, prog_name='simsiam-embed')\n"
             "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'faiss', 'onnxruntime', 'onnx') if m in sys.modules))"
             % (args,))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_listed_command_is_the_command_of_that_name():
    import click

    from simsiam_embed.cli.main import COMMANDS, cli

    context = click.Context(cli)
    for name, (_module, _attribute, summary) in COMMANDS.items():
        command = cli.get_command(context, name)
        assert command.name == name
        assert summary == " ".join(command.help.strip().split("\n\n")[0].split())   # the listing is its docstring


# --------------------------------------------------------------------------------------------
# The Python API: the README's example, run as written


def test_the_python_api_does_the_three_commands_work(tmp_path, monkeypatch):
    import re

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    example = re.search(r"<!-- python-api -->\n```python\n(.*?)```", readme, re.S).group(1)
    images = make_image_folder(tmp_path / "images", per_class=4)
    (tmp_path / "query.jpg").write_bytes((images / "disc" / "disc-00.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example.replace('overrides={"epochs": 1}', 'overrides={"epochs": 1, "crop_size": 16, '
                                 '"batch_size": 8, "num_workers": 0, "projector_hidden_dim": 64, "dim": 64, '
                                 '"predictor_hidden_dim": 16}'), "README", "exec"), namespace)
    hits = namespace["hits"]
    assert hits and hits[0].score > 0.99 and Path(hits[0].path).name == "disc-00.png"


def test_an_unfinished_time_budget_run_is_named_without_none(tmp_path):
    """`index` printed "step 3 of None" for a time-budget run stopped before its plan."""
    from simsiam_embed.flow import _warn_if_unfinished
    from simsiam_embed.settings import PretrainConfig

    config = PretrainConfig(data_dir="d", run_name="r", epochs=None, time_budget_s=60.0)
    Checkpoint(kind="pretrain", settings=config.to_dict(), model={}, step=3, finished=False,
               total_steps=None).save(tmp_path / "checkpoint.pt")
    said = []
    _warn_if_unfinished(tmp_path / "checkpoint.pt", said.append)
    assert "(step 3)" in said[0] and "None" not in said[0]


def test_an_optional_package_is_asked_for_one_way(tmp_path, monkeypatch):
    """Six styles of "is this extra installed" were spread over the stages (find_spec, bare
    imports, imports of a class); one helper now answers, and one refusal names the extra."""
    from simsiam_embed.optional import installed, require

    assert installed("json") and installed("json", "dumps")
    assert not installed("json", "no_such_name") and not installed("no_such_package_here")
    (tmp_path / "hollow").mkdir()   # what a half-uninstalled package leaves: an importable empty folder
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed("hollow") and not installed("hollow", "UMAP")
    with pytest.raises(UserError, match=r"--format parquet needs no_such_package_here: pip install 'simsiam-embed\[interop\]'"):
        require("no_such_package_here.parquet", "--format parquet", "interop")


def test_the_backbone_names_are_one_list():
    """settings (read by --help, which must not import torch) and the model factories each name
    the backbones; they must be the same list."""
    from simsiam_embed.models.backbones import BACKBONE_NAMES as BUILT
    from simsiam_embed.pretrained_weights import BACKBONES
    from simsiam_embed.settings import BACKBONE_NAMES

    assert BACKBONE_NAMES == BUILT == BACKBONES
