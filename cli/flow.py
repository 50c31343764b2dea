"""`export`, `embed`, `index` and `search`: the stages after pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import click

from simsiam_embed.settings import (
    DEFAULT_RECALL, EMBED_BATCH_SIZE, EMBED_FORMATS, EMBED_PRECISIONS, EMBED_WORKERS, HEADS, INT8_MIN_IMAGES,
    MIN_COSINE_FP16, MIN_COSINE_FP32, MIN_NEIGHBOUR_OVERLAP_INT8,
)
from .options import FiniteFloatRange, echo_err, is_main_process, printable, workspace_at, workspace_option
from .lazy import library

artefacts = library("artefacts")
inference_embed = library("inference.embed")
inference_export = library("inference.export")
inference_weights_export = library("inference.weights_export")
flow = library("flow")
image_files = library("image_files")
index_search = library("index.search")


provider_option = click.option(
    "--provider", type=click.Choice(["tensorrt", "cuda", "cpu"]),
    help="Force an ONNX Runtime provider.  [default: TensorRT, CUDA, CPU: the first that works]")
backend_option = click.option(
    "--backend", type=click.Choice(["onnx", "torch"]), default="onnx",
    help="Embed with the exported ONNX encoder, or with the PyTorch checkpoint directly.")
batch_option = click.option("--batch-size", type=click.IntRange(min=1), default=EMBED_BATCH_SIZE, help="Images per forward pass.")
workers_option = click.option("--workers", type=click.IntRange(min=0),
                              help=f"Image-decoding processes.  [default: with the encoder on a GPU, every core "
                                   f"(shared among torchrun's processes); on the CPU {EMBED_WORKERS}]")
precision_option = click.option(
    "--precision", type=click.Choice(EMBED_PRECISIONS), default="auto",
    help=f"The run's encoder in fp32, fp16 (GPUs only: half-precision weights, and TensorRT's fp16 mode), or "
         f"int8 (quantised on the run's images; refused unless each image's 10 "
         f"nearest neighbours stay {MIN_NEIGHBOUR_OVERLAP_INT8:.0%} fp32's).  [default: auto: int8 on a CPU with "
         f"int8 dot products (AVX512-VNNI, AVX-VNNI, AMX) for {INT8_MIN_IMAGES:,} images or more, else fp32; "
         f"an index keeps the encoder it was built with]")



@click.command("export")
@click.argument("source", required=False, type=click.Path(exists=True, path_type=Path))
@workspace_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="File to write.  [default: encoder.onnx in the run folder, encoder-fp16.onnx with --fp16, encoder-int8.onnx with --int8, "
                   "backbone.safetensors with --format safetensors]")
@click.option("--format", "file_format", type=click.Choice(["onnx", "safetensors"]), default="onnx",
              help="onnx: the encoder with its preprocessing, for index, search and ONNX Runtime; safetensors: the "
                   "backbone's weights under torchvision/timm names, with a .json of its architecture and "
                   "preprocessing beside it.")
@click.option("--head", type=click.Choice(HEADS), default="backbone",
              help="backbone: pooled features (for retrieval and transfer); projector: the SimSiam z.")
@click.option("--int8", is_flag=True,
              help=f"int8 weights and activations for CPU inference (ONNX Runtime static quantisation calibrated on "
                   f"the run's images; fastest where the CPU has int8 dot products: AVX512-VNNI, AMX); refused unless "
                   f"each image's 10 nearest neighbours stay {MIN_NEIGHBOUR_OVERLAP_INT8:.0%} the same as fp32's.")
@click.option("--fp16", is_flag=True, help=f"Half-precision weights for GPU inference (fp32 inputs and outputs); "
              f"checked against fp32 at cosine >= {MIN_COSINE_FP16} instead of {MIN_COSINE_FP32}.")
def export_command(source: Path | None, workspace: Path, output: Path | None, file_format: str, head: str,
                   int8: bool, fp16: bool) -> None:
    """Export a run's encoder (RUN folder or CHECKPOINT; default: the latest run) to ONNX.

    The file carries its preprocessing in its metadata; every export ends with a parity check
    on real images against PyTorch and fails if they disagree. --format safetensors writes the
    backbone's weights for torchvision and timm instead.
    """
    checkpoint = artefacts.resolve_checkpoint_path(source if source is not None else workspace_at(workspace).latest_run_dir())
    if fp16 and int8:
        raise click.UsageError("choose --fp16 (GPUs) or --int8 (CPUs), not both")
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    if file_format == "safetensors":
        if precision != "fp32" or head != "backbone":
            raise click.UsageError("--fp16, --int8 and --head are for ONNX; --format safetensors writes the backbone's fp32 weights")
        exported = inference_weights_export.export_safetensors(
            checkpoint, output or checkpoint.with_name(artefacts.BACKBONE_WEIGHTS_FILE))
        click.echo(f"wrote {exported.path} ({exported.tensors} tensors of a {exported.backbone}, torchvision/timm "
                   f"names) and {exported.config_path}")
        return
    output = output or artefacts.exported_encoder_path(checkpoint, head, precision)
    result = inference_export.export_onnx(checkpoint, output, head=head, precision=precision)
    overlap = (f"; top-10 neighbours shared with fp32: {result.neighbour_overlap:.3f} (>= {MIN_NEIGHBOUR_OVERLAP_INT8})"
               if result.neighbour_overlap is not None else "")
    click.echo(f"wrote {result.path} ({result.embedding_dim}-d, {precision}); parity with PyTorch "
               f"on {result.parity_images} images: smallest cosine {result.min_cosine:.6f} "
               f"(>= {result.min_cosine_required}), largest difference {result.max_abs_diff:.2e}{overlap}")


@click.command("embed")
@click.argument("image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for embeddings.npy, paths.jsonl (each row's path and label) and skipped.jsonl.")
@click.option("--format", "file_format", type=click.Choice(EMBED_FORMATS), default="npy",
              help="npy: embeddings.npy and paths.jsonl; parquet: embeddings.parquet with path, label and embedding "
                   "columns (pyarrow, the [interop] extra), as clip-retrieval and FiftyOne read them.")
@workspace_option
@click.option("--model", type=click.Path(path_type=Path),
              help="encoder.onnx, a run folder or a checkpoint, or pretrained weights by name (imagenet, "
                   "resnet50.IMAGENET1K_V2, timm's resnet50.a1_in1k: no training needed).  [default: the latest run's encoder]")
@backend_option
@provider_option
@precision_option
@batch_option
@workers_option
def embed_command(image_dir: Path, output: Path, file_format: str, workspace: Path, model: Path | None, backend: str,
                  provider: str | None, precision: str, batch_size: int, workers: int | None) -> None:
    """Embed every image under IMAGE_DIR into unit-length vectors (runs under torchrun, sharded).

    Vectors are kept in shards under OUTPUT/.embedding as they are made: a killed run, started
    again with the same command, continues from the last finished shard.
    """
    encoder, identity = flow.resolve_encoder(workspace_at(workspace), model, backend, provider, echo_err, precision,
                                             lambda: len(image_files.discover_images(image_dir)))
    echo_err(f"encoder: {encoder.description}")
    workers = flow.decode_workers(workers, encoder, echo_err)
    result = inference_embed.embed_folder(image_dir, encoder, output, batch_size, workers, file_format=file_format,
                                          encoder_digest=identity.digest, report=echo_err)
    if not is_main_process():
        return
    skipped = f", {len(result.failures)} unreadable skipped (skipped.jsonl)" if result.failures else ""
    written = artefacts.EMBEDDINGS_PARQUET_FILE if file_format == "parquet" else artefacts.EMBEDDINGS_FILE
    click.echo(f"embedded {result.count} images into {result.output / written} "
               f"({result.images_per_second:.0f} images/s{skipped})")


@click.command("index")
@click.argument("image_dir", required=False, type=click.Path(path_type=Path))
@workspace_option
@click.option("--model", type=click.Path(path_type=Path),
              help="encoder.onnx, a run folder or a checkpoint, or pretrained weights by name (imagenet, "
                   "resnet50.IMAGENET1K_V2, timm's resnet50.a1_in1k: no training needed).  [default: the latest run's, exported if needed]")
@click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path), help="[default: WORKSPACE/index]")
@click.option("--index-type", help="flat, hnsw, ivfpq, or any FAISS factory string.  [default: by size]")
@click.option("--rebuild", is_flag=True, help="Embed everything again instead of only new and changed files.")
@click.option("--recall", type=FiniteFloatRange(min=0, max=1, min_open=True),
              help=f"Recall@10 an approximate index (HNSW, IVF) is tuned to on held-back queries of its own vectors: "
                   f"the fastest setting that meets it is kept.  [default: the last update's, else {DEFAULT_RECALL}]")
@backend_option
@provider_option
@precision_option
@batch_option
@workers_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def index_command(image_dir: Path | None, workspace: Path, model: Path | None, index_dir: Path | None,
                  index_type: str | None, rebuild: bool, recall: float | None, backend: str, provider: str | None,
                  precision: str, batch_size: int, workers: int | None, as_json: bool) -> None:
    """Embed the images of IMAGE_DIR (default: the latest run's folder) into a FAISS index.

    Running it again embeds only new or changed files and drops deleted ones.
    """
    update = flow.index_folder(workspace_at(workspace), image_dir, model, index_dir, index_type, rebuild, backend,
                          provider, batch_size, workers, report=echo_err, recall=recall, precision=precision)
    if as_json:
        click.echo(json.dumps({
            "index_dir": str(update.folder), "count": update.count, "added": update.added, "changed": update.changed,
            "removed": update.removed, "unchanged": update.unchanged, "index_type": update.factory,
            "skipped": [{"path": p, "reason": r} for p, r in update.failures], "seconds": round(update.seconds, 2),
            "search_parameters": update.tuning.parameters if update.tuning else None,
            "recall_at_10": round(update.tuning.recall, 4) if update.tuning else None,
        }, indent=2))
        return
    if update.rebuilt_because:
        echo_err(f"full rebuild: {update.rebuilt_because}")
    skipped = f"; {len(update.failures)} unreadable files skipped" if update.failures else ""
    click.echo(f"index {update.folder}: {update.count} images ({update.added} added, {update.changed} changed, "
               f"{update.removed} removed){skipped}; {update.factory} ({update.reason})\n"
               f"next: simsiam-embed search QUERY.jpg")


@click.command("search")
@click.argument("queries", nargs=-1, required=True, type=click.Path(path_type=Path))
@workspace_option
@click.option("-k", type=click.IntRange(min=1), help="Results per query.  [default: 10, or the index size if smaller]")
@click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path), help="[default: WORKSPACE/index]")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Refuse to search unless the index was built with this encoder file.")
@click.option("--exclude-self", is_flag=True, help="Leave a query that is itself in the index out of its results.")
@provider_option
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a self-contained page with thumbnails of each query and its results.")
def search_command(queries: tuple[Path, ...], workspace: Path, k: int | None, index_dir: Path | None, model: Path | None,
                   exclude_self: bool, provider: str | None, as_json: bool, html_path: Path | None) -> None:
    """The K most similar indexed images for each QUERY (an image, or a folder of them)."""
    place = workspace_at(workspace)
    results = index_search.search_images(index_dir or place.default_index_dir, list(queries), k, exclude_self, model,
                                         provider, report=echo_err, engine_cache=place.engine_cache_dir)
    if html_path is not None:
        index_search.write_results_html(results, html_path)
        echo_err(f"wrote {html_path}")
    if as_json:
        click.echo(json.dumps([result.to_dict() for result in results], indent=2))
        return
    echo_err("scores: cosines of vectors centred on the index's mean (1: the same picture, about 0: unrelated), "
             "as dedup, clusters and outliers score")
    for result in results:
        click.echo(printable(result.query))
        for hit in result.hits:
            click.echo(f"  {hit.rank:>3}  {hit.score:.4f}  {printable(hit.path)}")
