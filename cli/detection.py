"""`simsiam-embed finetune-detection` and `export-detectron2`: the detection transfer."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from simsiam_embed.detection.settings import DetectionConfig
from simsiam_embed.settings import BACKBONE_NAMES, INITS, NORMS, SCHEDULES, field_default
from .lazy import library
from .options import FiniteFloatRange, is_main_process, workspace_at, workspace_option

detection_finetune = library("detection.finetune")
detection_detectron2 = library("detection.detectron2")


def _format_ap(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _default(name: str, text: str = "") -> str:
    """Help text with DetectionConfig's own default, so that the two cannot drift apart."""
    return f"{text}  [default: {field_default(DetectionConfig, name)}]".strip()


@click.command("finetune-detection")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Training boxes: a COCO .json file, a PASCAL VOC folder of .xml files, a YOLO folder "
                   "(images/, labels/, classes.txt), or an Ultralytics / Roboflow data.yaml (or its folder): its train split.")
@click.option("--val-data", type=click.Path(path_type=Path),
              help="Validation boxes, any of the same formats (a data.yaml: its val split); scored with COCO AP.  "
                   "[default: the val split of a --data data.yaml, if it names one]")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path),
              help="The SimSiam run folder or checkpoint to start from, or a torchvision/timm ResNet (.pth, "
                   ".safetensors).  [default: the latest run]")
@click.option("--init", type=click.Choice(INITS), help=_default("init", "random: the same recipe from scratch, for comparison."))
@click.option("--backbone", type=click.Choice(BACKBONE_NAMES), help="Only with --init random.  [default: resnet50 on GPU, resnet18 on CPU]")
@click.option("--norm", type=click.Choice(NORMS),
              help="Backbone BN: frozen statistics, trainable BN, or SyncBN (torchrun on GPUs).  [default: syncbn "
                   "under torchrun on GPUs (the paper's recipe), bn otherwise]")
@click.option("--trainable-layers", type=click.IntRange(0, 5), help=_default("trainable_layers", "Backbone stages that train (5: all, the paper's)."))
@click.option("--epochs", type=click.IntRange(min=1), help=_default("epochs"))
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Images per step over all processes.  [default: 4 on a CPU; on GPUs what their memory fits, up to 16]")
@click.option("--base-lr", type=FiniteFloatRange(min=0, min_open=True), help=_default("base_lr", "lr = base-lr x batch / 16."))
@click.option("--warmup-steps", type=click.IntRange(min=0), help=_default("warmup_steps"))
@click.option("--schedule", type=click.Choice(SCHEDULES), help=_default("schedule", "step: x0.1 at 2/3 and 8/9 of training."))
@click.option("--min-size", type=click.IntRange(min=32), help=_default("min_size", "Shorter image side the detector resizes to."))
@click.option("--max-size", type=click.IntRange(min=32), help=_default("max_size", "Longest image side after resizing."))
@click.option("--roi-samples", type=click.IntRange(min=1),
              help=_default("roi_samples", "Proposals per image in the box head's loss (detectron2's 512); 128 trains faster on a CPU."))
@click.option("--device", help="cuda or cpu.  [default: cuda when available]")
@click.option("--workers", "num_workers", type=click.IntRange(min=0), help=_default("num_workers"))
@click.option("--seed", type=int, help=_default("seed"))
@click.option("--name", help="Run name: the run lives in runs/NAME.  [default: detection-<data>-<init>]")
@click.option("--resume", is_flag=True, help="Continue the interrupted run from its checkpoint.")
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
def finetune_detection_command(data: Path, val_data: Path | None, checkpoint: Path | None, name: str | None,
                               resume: bool, workspace: Path, as_json: bool, **settings) -> None:
    """Fine-tune Faster R-CNN (ResNet-FPN) from the SimSiam backbone on your boxes; COCO AP on --val-data."""
    given = {key: value for key, value in settings.items() if value is not None}
    # What the user gave: on --resume these may not contradict the run's own settings.
    explicit = {"data", *given} | {key for key, value in (("val_data", val_data), ("checkpoint", checkpoint)) if value}
    place = workspace_at(workspace)
    init = given.get("init", field_default(DetectionConfig, "init"))
    if init == "simsiam" and checkpoint is None:
        checkpoint = place.latest_run_dir()
    if init == "simsiam" and "backbone" in given:
        raise click.UsageError("--backbone is taken from the checkpoint; it is only for --init random")
    config = detection_finetune.DetectionConfig(
        data=str(data), val_data=str(val_data) if val_data else None,
        checkpoint=str(checkpoint) if checkpoint else None, **given)
    result = detection_finetune.finetune_detection(config, place, name, resume, show_progress=not as_json,
                                                   explicit=explicit)
    if not result.finished:
        sys.exit(result.stop.exit_status)   # stopped by Ctrl-C (130) or SIGTERM (143), checkpoint saved: as pretrain
    if not is_main_process():
        return
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
