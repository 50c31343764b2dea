"""`simsiam-embed pretrain DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from simsiam_embed.settings import BACKBONE_NAMES, RECIPES, default_help, parse_duration
from .options import FiniteFloatRange, is_main_process, workspace_at, workspace_option
from .lazy import library

training_pretrain = library("training.pretrain")

_positive = FiniteFloatRange(min=0, min_open=True)



@click.command("pretrain")
@click.argument("data_dir", type=click.Path(path_type=Path))
@workspace_option
@click.option("--name", help="Run name: the run lives in runs/NAME.  [default: the image folder's name]")
@click.option("--resume", is_flag=True, help="Continue the interrupted run from its checkpoint.")
@click.option("--epochs", type=click.IntRange(min=1), help=default_help("epochs", "Passes over the folder."))
@click.option("--time-budget", help="Train for this long instead of --epochs (e.g. 20m, 2h); the schedule is planned to finish on time.")
@click.option("--recipe", type=click.Choice(RECIPES), help=default_help("recipe", "imagenet (paper, Sec. 4) or cifar (paper's small-image recipe)."))
@click.option("--backbone", type=click.Choice(BACKBONE_NAMES), help=default_help("backbone"))
@click.option("--crop-size", type=click.IntRange(min=8), help=default_help("crop_size", "Training crop side in pixels."))
@click.option("--batch-size", type=click.IntRange(min=2), help=default_help("batch_size", "Total batch over all processes."))
@click.option("--base-lr", type=_positive, help=default_help("base_lr", "lr = base-lr x batch / 256."))
@click.option("--weight-decay", type=FiniteFloatRange(min=0), help=default_help("weight_decay"))
@click.option("--momentum", type=FiniteFloatRange(min=0, max=1), help=default_help("momentum"))
@click.option("--fix-predictor-lr/--decay-predictor-lr", default=None, help=default_help("fix_predictor_lr", "Keep the predictor at the initial lr."))
@click.option("--dim", type=click.IntRange(min=1), help=default_help("dim", "Projector output and predictor input width."))
@click.option("--projector-layers", type=click.IntRange(min=1), help=default_help("projector_layers"))
@click.option("--projector-hidden-dim", type=click.IntRange(min=1), help=default_help("projector_hidden_dim"))
@click.option("--predictor-hidden-dim", type=click.IntRange(min=1), help=default_help("predictor_hidden_dim", "The bottleneck."))
@click.option("--blur/--no-blur", default=None, help=default_help("blur", "Gaussian blur augmentation."))
@click.option("--min-crop-scale", type=FiniteFloatRange(min=0, max=1, min_open=True), help=default_help("min_crop_scale", "Smallest crop area fraction."))
@click.option("--color-jitter", type=FiniteFloatRange(min=0), help=default_help("color_jitter", "Brightness, contrast, saturation strength (hue: a quarter)."))
@click.option("--small-views", type=click.IntRange(min=0, max=16),
              help=default_help("small_views", "Multi-crop (SwAV, DINO): small extra views a sample, each predicting both full views; 0 is the paper's two."))
@click.option("--small-crop-size", type=click.IntRange(min=8), help=default_help("small_crop_size", "Side of the small views."))
@click.option("--start-crop-size", type=click.IntRange(min=8),
              help="Progressive resizing (fast.ai, FFCV): crops start at this side, grow to --crop-size from 40% "
                   "to 85% of the steps, and end at it; early steps cost less.  [default: off, the paper's one size]")
@click.option("--warmup-fraction", type=FiniteFloatRange(0, 1, max_open=True), help=default_help("warmup_fraction", "Share of steps with a linear lr warm-up."))
@click.option("--stem-stride", type=click.IntRange(1, 2), help=default_help("stem_stride", "Small-image stem stride; 2 is 4x cheaper and coarser."))
@click.option("--no-stop-grad", "no_stop_grad", is_flag=True, help="Ablation (paper Fig. 2): remove the stop-gradient; collapses.")
@click.option("--no-predictor", "no_predictor", is_flag=True, help="Ablation (paper Table 1a): no prediction MLP; collapses.")
@click.option("--asymmetric-loss", is_flag=True, help="Ablation (paper Table 4): D(p1, z2) only.")
@click.option("--no-heads-bn", is_flag=True, help="Ablation (paper Table 3): no batch norm in the MLP heads.")
@click.option("--zero-init-residual/--torchvision-init", "zero_init_residual", default=None,
              help=default_help("zero_init_residual", "Start each residual block as an identity (the official "
                                "SimSiam code), or with torchvision's own init."))
@click.option("--seed", type=int, help=default_help("seed"))
@click.option("--workers", "num_workers", type=click.IntRange(min=0), help=default_help("num_workers", "Image-decoding processes."))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help=default_help("device"))
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), help=default_help("amp", "Mixed precision."))
@click.option("--log-every", type=click.IntRange(min=1), help=default_help("log_every", "Steps between lines of metrics.jsonl."))
@click.option("--init", metavar="FILE|NAME",
              help="Start the backbone from these weights: a torchvision or timm ResNet state dict (.pth), a "
                   "safetensors file (timm or Hugging Face names), another run, or pretrained weights by "
                   "name: imagenet (torchvision's default ImageNet weights of the backbone), torchvision's "
                   "e.g. resnet50.IMAGENET1K_V2 (torch.hub's cache) or timm's e.g. resnet50.a1_in1k (the "
                   "Hugging Face cache), downloaded once and hash-checked on every use; the backbone is the "
                   "weights'. none: random init, as the paper, always.  [default: random init, as the paper; "
                   "on a CPU whose --time-budget affords too few steps to learn from it, imagenet if its "
                   "weights are in torch.hub's cache]")
@click.option("--val-dir", type=click.Path(exists=True, file_okay=False),
              help="Labelled folder (VAL/<class>/images): kNN accuracy every --val-every epochs, against random init.")
@click.option("--val-every", type=click.IntRange(min=1), help=default_help("val_every", "Epochs between kNN evaluations."))
@click.option("--no-draft", is_flag=True, help="Decode JPEGs at full size even when the crop is much smaller.")
@click.option("--no-image-store", is_flag=True,
              help="Decode every image again each epoch instead of keeping its decoded pixels in RUN/decoded/.")
def pretrain_command(data_dir: Path, workspace: Path, name: str | None, resume: bool, time_budget: str | None,
                     no_stop_grad: bool, no_predictor: bool, asymmetric_loss: bool, no_heads_bn: bool,
                     no_draft: bool, no_image_store: bool, **settings) -> None:
    """Train a SimSiam encoder on every image under DATA_DIR (recursively; labels are not used).

    Settings not given are chosen from the data and the hardware, printed, and saved in
    runs/NAME/config.json. Ctrl-C saves a checkpoint; --resume continues from it.
    """
    if time_budget is not None:
        settings["time_budget_s"] = parse_duration(time_budget)
    if settings.get("init") is not None:
        settings["init"] = str(settings["init"])
    # Ablation flags only ever switch a part off; unset means "as the paper".
    settings.update(
        stop_gradient=False if no_stop_grad else None,
        use_predictor=False if no_predictor else None,
        symmetric_loss=False if asymmetric_loss else None,
        heads_batch_norm=False if no_heads_bn else None,
        decode_draft=False if no_draft else None,
        store_images=False if no_image_store else None,
    )
    result = training_pretrain.pretrain(data_dir, workspace_at(workspace), settings, run_name=name, resume=resume,
                      report=lambda message: click.echo(message, err=True))
    if result.already_finished:
        return
    if not result.finished:
        sys.exit(result.stop.exit_status)   # stopped by Ctrl-C (130) or SIGTERM (143), checkpoint saved: not a success
    if not is_main_process():
        return
    skipped = f"; {len(result.skipped)} unreadable files skipped (see {result.run_dir / 'skipped.jsonl'})" if result.skipped else ""
    # A pace needs two steps (the first pays for start-up): never "0 image pairs/s".
    pace = (f"{result.pairs_per_second:.0f} image pairs/s" if result.pairs_per_second
            else "pace not measured (one step)")
    replanned = (f", the time budget's plan corrected {result.replans} time(s) to the pace (metrics.jsonl)"
                 if result.replans else "")
    click.echo(
        f"done: {result.step} steps ({result.epochs_done:.1f} epochs{replanned}) in {result.elapsed_s / 60:.1f} min, "
        f"loss {result.loss:.3f}, z-std {result.z_std:.4f} (healthy ~{result.config.dim ** -0.5:.4f}), "
        f"{pace}{skipped}\n"
        f"encoder: {result.checkpoint}\nnext: simsiam-embed index"
    )
    if result.knn_verdict:
        click.echo(result.knn_verdict)
