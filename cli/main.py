"""`simsiam-embed`: each command parses its options and calls one library function."""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from simsiam_embed.errors import UserError

#: Each command: the module that defines it (loaded only to run it or show its --help) and the
#: first paragraph of its docstring, which the group's --help lists without loading anything
#: (tests/test_house.py checks the two agree).
COMMANDS = {
    "pretrain": ("pretrain", "pretrain_command",
                 "Train a SimSiam encoder on every image under DATA_DIR (recursively; labels are not used)."),
    "index": ("flow", "index_command",
              "Embed the images of IMAGE_DIR (default: the latest run's folder) into a FAISS index."),
    "search": ("flow", "search_command",
               "The K most similar indexed images for each QUERY (an image, or a folder of them)."),
    "export": ("flow", "export_command",
               "Export a run's encoder (RUN folder or CHECKPOINT; default: the latest run) to ONNX."),
    "embed": ("flow", "embed_command",
              "Embed every image under IMAGE_DIR into unit-length vectors (runs under torchrun, sharded)."),
    "dedup": ("explore", "dedup_command",
              "Exact duplicates (same bytes) and near-duplicate groups among the indexed images."),
    "clusters": ("explore", "clusters_command",
                 "Group the indexed images by k-means on their embeddings (FAISS)."),
    "outliers": ("explore", "outliers_command",
                 "The indexed images least similar to their nearest neighbours, oddest first."),
    "quality": ("explore", "quality_command",
                "Image-quality checks on the indexed images: blurry, too dark or bright, tiny, near-uniform, damaged."),
    "map": ("explore", "map_command",
            "A 2-D map of the indexed images: a page where each point shows its image on hover."),
    "serve": ("explore", "serve_command",
              "A local web app over the index: drop an image to search, browse duplicates, clusters, outliers, "
              "image quality, the map and the latest run's report. JSON API with OpenAPI docs at /docs."),
    "report": ("explore", "report_command",
               "Draw a pretraining run's curves (default: the latest run) as PNG files and report.html in its "
               "folder."),
    "knn": ("evaluate", "knn_command",
            "Weighted kNN classification of TEST by TRAIN in the encoder's space: top-1, top-5, per class."),
    "linear-probe": ("evaluate", "linear_probe_command",
                     "Train a linear classifier on the frozen encoder's features of TRAIN; report TEST accuracy."),
    "finetune-detection": ("detection", "finetune_detection_command",
                           "Fine-tune Faster R-CNN (ResNet-FPN) from the SimSiam backbone on your boxes; COCO AP on --val-data."),
    "export-detectron2": ("detection", "export_detectron2_command",
                          "Write RUN's backbone (default: the latest run) as detectron2 ResNet weights (.pkl)."),
}


class _Commands(click.Group):
    """Commands loaded when used; the library's UserError becomes click's one-line ``Error: ...``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)   # click's own order

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _summary = COMMANDS[name]
        return getattr(importlib.import_module(f"simsiam_embed.cli.{module}"), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The summaries are COMMANDS' own: listing them loads no command module.
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)   # as click.Group does
        with formatter.section("Commands"):
            formatter.write_dl([(name, click.utils.make_default_short_help(COMMANDS[name][2], limit))
                                for name in self.list_commands(ctx)])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except Exception as error:
            if not _out_of_memory(error):
                raise   # a bug: its traceback is what a report needs
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise click.ClickException(f"out of memory ({first[:200]}): lower --batch-size (or --crop-size, "
                                       "--workers); a checkpoint already written is kept") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, torch.OutOfMemoryError (a RuntimeError: its type is named, so that
    --help need not import torch) or the CPU allocator's RuntimeError."""
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="simsiam-embed")
@click.option("--workspace", type=click.Path(file_okay=False),
              help="Folder that holds runs/ and index/, for the command that follows (as its own --workspace).")
@click.pass_context
def cli(ctx: click.Context, workspace: str | None) -> None:
    """Learn image embeddings from a folder of unlabelled images (SimSiam), then search them.

    \b
      simsiam-embed pretrain ./images     train an encoder on the folder
      simsiam-embed index                 embed every image and build a search index
      simsiam-embed search query.jpg      the most similar images, with scores
    """
    if workspace is not None:   # the command's default; its own --workspace, given too, still wins
        ctx.default_map = {name: {"workspace": workspace} for name in COMMANDS}


def main() -> None:
    # Oversized images are refused and listed by the library; PIL's own warning would only repeat it.
    warnings.filterwarnings("ignore", message="Image size .* exceeds limit")   # PIL's DecompressionBombWarning
    cli(prog_name="simsiam-embed")


if __name__ == "__main__":
    main()
