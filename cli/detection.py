"""`simsiam-embed finetune-detection` and `export-detectron2`: the detection transfer."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from simsiam_embed.settings import BACKBONE_NAMES, INITS, NORMS, SCHEDULES
from .lazy import library
from .options import FiniteFloatRange, workspace_at, workspace_option

detection_finetune = library("detection.finetune")
detection_detectron2 = library("detection.detectron2")

#: Command-line names that differ from DetectionConfig's field names.
_CONFIG_FIELD = {"workers": "num_workers"}


def _format_ap(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


@click.command("finetune-detection")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Training boxes: a COCO .json file, a PASCAL VOC folder of .xml files, a YOLO folder "
                   "(images/, labels/, classes.txt), or an Ultralytics / Roboflow data.yaml (or its folder): its train split.")
@click.option("--val-data", type=click.Path(path_type=Path),
              help="Validation boxes, any of the same formats (a data.yaml: its val split); scored with COCO AP.  "
                   "[default: the val split of a --data data.yaml, if it names one]")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path),
              help="The SimSiam run folder or checkpoint to start from.  [default: the latest run]")
@click.option("--init", type=click.Choice(INITS), default="simsiam", help="random: the same recipe from scratch, for comparison.")
@click.option("--backbone", type=click.Choice(BACKBONE_NAMES), help="Only with --init random.  [default: resnet50 on GPU, resnet18 on CPU]")
@click.option("--norm", type=click.Choice(NORMS), default="bn",
              help="Backbone BN: frozen statistics, trainable BN, or SyncBN (torchrun on GPUs).")
@click.option("--trainable-layers", type=click.IntRange(0, 5), default=5, help="Backbone stages that train (5: all, the paper's).")
@click.option("--epochs", type=click.IntRange(min=1), default=12)
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Images per step over all processes.  [default: 4 on a CPU; on GPUs what their memory fits, up to 16]")
@click.option("--base-lr", type=FiniteFloatRange(min=0, min_open=True), default=0.02, help="lr = base-lr x batch / 16.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=100)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="step", help="step: x0.1 at 2/3 and 8/9 of training.")
@click.option("--min-size", type=click.IntRange(min=32), default=512, help="Shorter image side the detector resizes to.")
@click.option("--max-size", type=click.IntRange(min=32), default=853, help="Longest image side after resizing.")
@click.option("--roi-samples", type=click.IntRange(min=1), default=512,
              help="Proposals per image in the box head's loss (detectron2's 512); 128 trains faster on a CPU.")
@click.option("--device", help="cuda or cpu.  [default: cuda when available]")
@click.option("--workers", type=click.IntRange(min=0), default=2)
@click.option("--seed", type=int, default=0)
@click.option("--name", help="Run name: the run lives in runs/NAME.  [default: detection-<data>-<init>]")
@click.option("--resume", is_flag=True, help="Continue the interrupted run from its checkpoint.")
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
def finetune_detection_command(data: Path, val_data: Path | None, checkpoint: Path | None, init: str, backbone: str | None,
                               norm: str, trainable_layers: int, epochs: int, batch_size: int | None, base_lr: float,
                               warmup_steps: int, schedule: str, min_size: int, max_size: int, roi_samples: int,
                               device: str | None, workers: int, seed: int, name: str | None, resume: bool,
                               workspace: Path, as_json: bool) -> None:
    """Fine-tune Faster R-CNN (ResNet-FPN) from the SimSiam backbone on your boxes; COCO AP on --val-data."""
    context = click.get_current_context()
    explicit = {_CONFIG_FIELD.get(name, name) for name in context.params
                if context.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
                and name not in ("name", "resume", "workspace", "as_json")}
    place = workspace_at(workspace)
    if init == "simsiam" and checkpoint is None:
        checkpoint = place.latest_run_dir()
    if init == "simsiam" and backbone is not None:
        raise click.UsageError("--backbone is taken from the checkpoint; it is only for --init random")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if batch_size is None:
        batch_size, reason = detection_finetune.default_detection_batch(device, max_size, int(os.environ.get("WORLD_SIZE", "1")))
        if not as_json:
            click.echo(f"chosen: {reason}", err=True)
    config = detection_finetune.DetectionConfig(
        data=str(data), val_data=str(val_data) if val_data else None,
        checkpoint=str(checkpoint) if checkpoint else None, init=init, backbone=backbone, norm=norm,
        trainable_layers=trainable_layers, epochs=epochs, batch_size=batch_size, base_lr=base_lr,
        warmup_steps=warmup_steps, schedule=schedule, min_size=min_size, max_size=max_size, roi_samples=roi_samples,
        seed=seed, num_workers=workers, device=device,
        # fp16 + loss scaler, not bf16, even where bf16 is native: bf16's 8-bit mantissa moves decoded
        # boxes by about 4 px at 512-1024 px (a box regression is a small delta on a large coordinate).
        amp="fp16" if on_gpu else "off", channels_last=on_gpu,
    )
    result = detection_finetune.finetune_detection(config, place, name, resume, show_progress=not as_json, explicit=explicit)
    if not result.finished:
        sys.exit(result.stop.exit_status)   # stopped by Ctrl-C (130) or SIGTERM (143), checkpoint saved: as pretrain
    if as_json:
        click.echo(json.dumps({"run": str(result.run_dir), "steps": result.step, "finished": result.finished,
                               "already_finished": result.already_finished, "init": result.config.init,
                               "loaded_tensors": result.loaded_tensors, "data_problems": result.data_problems,
                               "evaluation": result.evaluation.to_dict() if result.evaluation else None}, indent=2))
        return
    evaluation = result.evaluation
    if evaluation is None:
        if not result.already_finished:
            click.echo(f"{result.run_dir}: fine-tuned {result.step} steps (no --val-data, so no AP)")
        return
    click.echo(f"{result.run_dir}: AP {_format_ap(evaluation.ap)}, AP50 {_format_ap(evaluation.ap50)}, "
               f"AP75 {_format_ap(evaluation.ap75)} on {evaluation.images} images ({evaluation.boxes} boxes)")
    click.echo("per class AP: " + ", ".join(f"{cls} {_format_ap(ap)}" for cls, ap in evaluation.per_class_ap.items()))


@click.command("export-detectron2")
@click.argument("run", type=click.Path(exists=True, path_type=Path), required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .pkl to write.")
@workspace_option
def export_detectron2_command(run: Path | None, output: Path, workspace: Path) -> None:
    """Write RUN's backbone (default: the latest run) as detectron2 ResNet weights (.pkl)."""
    count, settings = detection_detectron2.export_detectron2(run or workspace_at(workspace).latest_run_dir(), output)
    click.echo(f"wrote {output}: {count} tensors under detectron2's ResNet names")
    click.echo(f"train with detectron2's tools/train_net.py ... {settings}")
