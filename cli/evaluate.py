"""`simsiam-embed knn`: how good is the encoder, in labelled numbers."""

from __future__ import annotations

import json
from pathlib import Path

import click

from simsiam_embed.settings import EMBED_WORKERS, KNN_SETTINGS
from .options import FiniteFloatRange, echo_err, workspace_at, workspace_option
from .lazy import library

artefacts = library("artefacts")
inference_onnx_encoder = library("inference.onnx_encoder")
inference_embed = library("inference.embed")
flow = library("flow")
inference_evaluate = library("inference.evaluate")



def _labelled_folders_and_model(command):
    """--train, --test, --workspace and --model: what every evaluation command reads."""
    options = [
        click.option("--train", "train_dir", type=click.Path(path_type=Path), required=True,
                     help="Labelled training images (the kNN bank): TRAIN/<class>/images."),
        click.option("--test", "test_dir", type=click.Path(path_type=Path), required=True,
                     help="Labelled test images: TEST/<class>/images."),
        workspace_option,
        click.option("--model", type=click.Path(path_type=Path),
                     help="encoder.onnx, a run folder or a checkpoint, or pretrained weights by name (imagenet, "
                          "resnet50.IMAGENET1K_V2, timm's resnet50.a1_in1k).  [default: the latest run]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("knn")
@_labelled_folders_and_model
@click.option("-k", type=click.IntRange(min=1), help=f"Neighbours.  [default: {KNN_SETTINGS[0][0]}, and {KNN_SETTINGS[1][0]}]")
@click.option("-t", "--temperature", type=FiniteFloatRange(min=0, min_open=True),
              help=f"Vote weight exp(sim / T).  [default: {KNN_SETTINGS[0][1]}, and {KNN_SETTINGS[1][1]}]")
@click.option("--compare-random-init", is_flag=True, help="Also score the same network at its random initialisation.")
@click.option("--compare-raw-pixels", is_flag=True,
              help="Also score the images' own pixels (at most 32 px, each image's mean removed): the floor.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--workers", type=click.IntRange(min=0), default=EMBED_WORKERS, help="Image-decoding processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def knn_command(train_dir: Path, test_dir: Path, workspace: Path, model: Path | None, k: int | None,
                temperature: float | None, compare_random_init: bool, compare_raw_pixels: bool, batch_size: int,
                workers: int, as_json: bool) -> None:
    """Weighted kNN classification of TEST by TRAIN in the encoder's space: top-1, top-5, per class."""
    if (k is None) != (temperature is None):
        settings = ((k or KNN_SETTINGS[0][0], temperature or KNN_SETTINGS[0][1]),)
    else:
        settings = ((k, temperature),) if k is not None else KNN_SETTINGS
    place = workspace_at(workspace)
    source = flow.named_model(place, model, echo_err) if model is not None else place.latest_run_dir()
    encoders = [("trained", _encoder_from(source))]
    if compare_random_init:
        if source.suffix == ".onnx":
            raise click.UsageError("--compare-random-init needs a run folder or checkpoint as --model, not an ONNX file")
        encoders.append(("random init", inference_embed.TorchEncoder(artefacts.resolve_checkpoint_path(source), random_init=True)))
    if compare_raw_pixels:
        side = min(inference_embed.RAW_PIXEL_SIDE, encoders[0][1].preprocessing.input_size)
        encoders.append(("raw pixels", inference_embed.RawPixelEncoder(side)))
    results = {name: inference_evaluate.evaluate_knn(encoder, train_dir, test_dir, settings, batch_size, workers, not as_json)
               for name, encoder in encoders}
    if as_json:
        click.echo(json.dumps({name: {"bank": e.bank_count, "test": e.test_count, "skipped": e.skipped,
                                      "knn": [r.to_dict() for r in e.reports]} for name, e in results.items()}, indent=2))
        return
    for name, evaluation in results.items():
        for report in evaluation.reports:
            click.echo(f"{name:>11}: kNN (k={report.k}, T={report.temperature}) top-1 {report.top1:.3f}, "
                       f"top-5 {report.top5:.3f} on {report.test_count} test images, bank {evaluation.bank_count}")
    first = next(iter(results.values()))
    missing = first.reports[0].classes_missing_from_bank
    if missing:
        click.echo(f"note: test classes with no bank images (always counted wrong): {', '.join(missing)}", err=True)
    if not as_json and len(first.reports[0].per_class) <= 20:
        report = first.reports[0]
        click.echo("per class (trained, first setting): " +
                   ", ".join(f"{name} {accuracy:.2f}" for name, accuracy in report.per_class.items()))


def _encoder_from(source: Path):
    """An exported encoder.onnx, or a run folder / checkpoint (embedded with PyTorch)."""
    return inference_onnx_encoder.OnnxEncoder(source) if source.suffix == ".onnx" else inference_embed.TorchEncoder(artefacts.resolve_checkpoint_path(source))


@click.command("linear-probe")
@_labelled_folders_and_model
@click.option("--epochs", type=click.IntRange(min=1), default=100, help="L-BFGS passes over the frozen features.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, help="Images per forward pass while embedding.")
@click.option("--workers", type=click.IntRange(min=0), default=EMBED_WORKERS, help="Image-decoding processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def linear_probe_command(train_dir: Path, test_dir: Path, workspace: Path, model: Path | None, epochs: int,
                         batch_size: int, workers: int, as_json: bool) -> None:
    """Train a linear classifier on the frozen encoder's features of TRAIN; report TEST accuracy."""
    place = workspace_at(workspace)
    source = flow.named_model(place, model, echo_err) if model is not None else place.latest_run_dir()
    report = inference_evaluate.evaluate_linear_probe(_encoder_from(source), train_dir, test_dir, epochs, batch_size, workers, not as_json)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"linear probe: top-1 {report.top1:.3f}, top-5 {report.top5:.3f} on {report.test_count} test images "
               f"(train top-1 {report.train_top1:.3f} on {report.train_count})")
