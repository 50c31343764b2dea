"""`simsiam-embed`: each command parses its options and calls one library function."""

from __future__ import annotations

import sys
import warnings

import click
from PIL import Image

from ..errors import UserError
from .detection import export_detectron2_command, finetune_detection_command
from .evaluate import knn_command, linear_probe_command
from .explore import (clusters_command, dedup_command, map_command, outliers_command, report_command,
                      serve_command)
from .flow import embed_command, export_command, index_command, search_command
from .pretrain import pretrain_command


class _Commands(click.Group):
    """Turns the library's UserError into click's one-line ``Error: ...`` and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="simsiam-embed")
def cli() -> None:
    """Learn image embeddings from a folder of unlabelled images (SimSiam), then search them.

    \b
      simsiam-embed pretrain ./images     train an encoder on the folder
      simsiam-embed index                 embed every image and build a search index
      simsiam-embed search query.jpg      the most similar images, with scores
    """


for command in (pretrain_command, index_command, search_command, export_command, embed_command, dedup_command,
                clusters_command, outliers_command, map_command, serve_command, report_command, knn_command,
                linear_probe_command, finetune_detection_command, export_detectron2_command):
    cli.add_command(command)


def main() -> None:
    # Oversized images are refused and listed by the library; PIL's own warning would only repeat it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    cli(prog_name="simsiam-embed")


if __name__ == "__main__":
    main()
