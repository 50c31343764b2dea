"""The device check: run it first on any machine with a GPU (under 8 minutes on one), and paste
its table into bench/RESULTS.md with the device named.

    python bench/gpu_check.py                  # CUDA: the real defaults, ResNet-50 at 224 px
    python bench/gpu_check.py --device cpu     # small sizes: proves the script itself works (CI)

It never passes by mistake: ``--device cuda`` (the default) with no GPU visible stops at once
with exit status 2; each check runs on its own, so one that raises is a FAILED row and the others
still run; the table is always printed, and written as JSON (``--json``, default
``gpu_check.json`` in the working folder) for bench/RESULTS.md. A throughput row is compared with
a floor from this device's own measured matmul peak and the model's FLOPs, and marked SHORT below it.

What it checks, each a row of the table (a failed or short check makes the exit status 1):
1. pretraining with the default batch (chosen from the GPU's memory) and AMP: pairs/s, peak
   memory against the estimate the batch was chosen by, and the loader's own pairs/s against
   the GPU's (training steps on batches already on the device): is the loader the bottleneck?
2. two processes under torchrun on two GPUs (skipped, and said, with one);
3. export to ONNX, then `embed` and `search --json` through ONNX Runtime's CUDA provider (and
   TensorRT when its runtime is installed), the JSON parsed; with TensorRT, one engine in all
   (embed's encoder and the index generations' copies share it: named by content);
4. FAISS on the GPU when a GPU build is installed (k <= 2048 on the GPU, larger k on the CPU);
5. detection fine-tuning steps with AMP (fp16 + loss scaler);
6. the batched colour augmentation runs without a device sync;
7. the batched crops (crop_on_device) equal torchvision's crop on the GPU, and their time;
8. `embed --precision fp16` against fp32 on CUDA (and TensorRT): images/s and top-10 neighbours
   shared, the figures the GPU default of `--precision auto` waits for.
Images are drawn by the script itself. The package must be installed (models/ and cli/ are
installed inside simsiam_embed); on the lent GPU machine, whose image has torch but no faiss and
nothing to fetch, ``bash bench/gpu_day.sh`` installs it from this tree with the wheels it carries
and runs this script. Rows that machine cannot run (ONNX Runtime's CUDA and TensorRT providers,
with a CPU build of onnxruntime) say so and are skipped, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

try:
    import simsiam_embed.models  # noqa: F401  (installed inside the package: absent from a bare checkout)
except ImportError as missing:
    print(f"FAILED: simsiam_embed is not installed ({missing}): pip install -e . here, or on the lent GPU machine "
          "bash bench/gpu_day.sh", file=sys.stderr)
    sys.exit(2)

from simsiam_embed.training.augment import (  # noqa: E402
    AugmentationRecipe, BatchAugment, crop_on_device, draw_uncropped_views, draw_view, stack_uncropped,
)
from simsiam_embed.trained_model import build_model  # noqa: E402
from simsiam_embed.settings import PAIR_BYTES_224_AMP  # noqa: E402
from simsiam_embed.models import simsiam_loss  # noqa: E402
from simsiam_embed.training.pretrain import pretrain  # noqa: E402
from simsiam_embed.training.loop import MixedPrecision, StopRequest  # noqa: E402
from simsiam_embed.workspace import Workspace  # noqa: E402

CLI = [sys.executable, "-m", "simsiam_embed.cli.main"]


def draw_images(folder: Path, count: int, side: int) -> Path:
    """Photos of shapes on noisy backgrounds, as JPEGs (what a loader really decodes), drawn by
    every core (tens of thousands for a GPU's timed window)."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_draw_image, [(folder, number, side) for number in range(count)], chunksize=64))
    return folder


def _draw_image(task: tuple[Path, int, int]) -> None:
    folder, number, side = task
    rng = np.random.default_rng(number)
    pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(0, side // 2, 2))
    draw.ellipse([x, y, x + side // 3, y + side // 3], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image.save(folder / f"photo-{number:05d}.jpg", quality=90)


def coco_boxes(folder: Path, side: int) -> Path:
    """A COCO file of one box per image (the shape drawn by draw_images is not needed: any box trains)."""
    images = sorted(folder.glob("*.jpg"))
    document = {"images": [{"id": i, "file_name": p.name, "width": side, "height": side} for i, p in enumerate(images)],
                "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [side / 8, side / 8, side / 3, side / 3],
                                 "area": side * side / 9, "iscrowd": 0} for i in range(len(images))],
                "categories": [{"id": 1, "name": "shape"}]}
    path = folder / "boxes.json"
    path.write_text(json.dumps(document))
    return path


def run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []
        self.failed = False

    def add(self, check: str, ok: bool | None, figures: str, short: bool = False) -> None:
        """ok: True passed, False failed, None skipped; ``short``: ran, but below its floor."""
        verdict = "SHORT" if ok and short else {True: "ok", False: "FAILED", None: "skipped"}[ok]
        self.failed |= ok is False or verdict == "SHORT"
        self.rows.append((check, verdict, figures))
        print(f"{check}: {verdict}: {figures}", flush=True)

    def run(self, check: str, work, *args) -> Any:
        """``work(self, *args)``; an exception is this check's FAILED row, and the next check runs."""
        try:
            return work(self, *args)
        except Exception as error:   # noqa: BLE001  (any failure is a row of the table, not the end of it)
            self.add(check, False, f"{type(error).__name__}: {str(error).strip().splitlines()[-1:] or ''}"[:200])
            return None

    def print(self, device: str) -> None:
        print(f"\ndevice: {device}\n\n| check | result | figures |\n| --- | --- | --- |")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")

    def write_json(self, path: Path, device: str) -> None:
        path.write_text(json.dumps({"device": device, "failed": self.failed,
                                    "rows": [dict(zip(("check", "result", "figures"), row)) for row in self.rows]},
                                   indent=2) + "\n")
        print(f"\ntable as JSON: {path}")


#: The pretraining row is SHORT when the whole loop (loader, augmentation, step) reaches less
#: than this share of the device's own pace (training steps on batches already on the device,
#: measured in the same run). A floor from the matmul peak (10% of it over 48.7 GFLOP a pair)
#: asked more of eager ResNet-50 than the GPU alone gives: it measured the model, not the loop.
FLOOR_SHARE_OF_DEVICE = 0.5


def matmul_peak(device: str, dtype: torch.dtype, size: int = 4096, repeats: int = 10) -> float:
    """FLOP/s of a square matmul on ``device``: the device's own ceiling, measured, not from a spec sheet."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return repeats * 2 * size ** 3 / (time.perf_counter() - began)


def flops_per_pair(config) -> float:
    """Training FLOPs of one image pair (forward and backward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(config).train()
    views = torch.randn(2, 3, config.crop_size, config.crop_size)
    with FlopCounterMode(display=False) as counter:
        simsiam_loss(model(views, views.clone())).backward()
    return counter.get_total_flops() / 2


def check_pretraining(table: Table, images: Path, workspace: Path, device: str, small: bool, steps: int) -> Path:
    """End-to-end pretraining steps against the device's own pace. The folder holds more than
    ``steps`` batches, so the timed window has no end-of-epoch checkpoint in it (with 2,048
    images at batch 512 it held about 7)."""
    settings = {"device": device}
    if small:
        settings.update(crop_size=16, batch_size=8, dim=64, projector_hidden_dim=64, predictor_hidden_dim=16,
                        num_workers=2)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stop = StopRequest(stop_at_step=steps)
    began = time.monotonic()
    result = pretrain(images, Workspace(workspace), settings, run_name="check", report=lambda m: print(m, flush=True),
                      show_progress=False, stop=stop)
    config = result.config
    epochs = result.step / result.steps_per_epoch
    figures = (f"{config.backbone} {config.crop_size} px, batch {config.batch_size}, AMP {config.amp}: "
               f"{result.pairs_per_second or 0:.0f} pairs/s over {result.step} steps ({epochs:.2f} epochs, "
               f"{time.monotonic() - began:.0f} s)")
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        estimate = PAIR_BYTES_224_AMP.get(config.backbone, 0) * (config.crop_size / 224) ** 2 * config.batch_size
        figures += f"; peak memory {peak / 2**30:.1f} GiB (estimate {estimate / 2**30:.1f} GiB)"

    device_rate = device_pace(config, device, small)
    loader_rate = result.pairs_per_second or 0.0
    floor = FLOOR_SHARE_OF_DEVICE * device_rate
    short = not small and loader_rate < floor   # the small CPU sizes prove the script, not a device's pace
    figures += f"; floor {floor:.0f} pairs/s ({FLOOR_SHARE_OF_DEVICE:.0%} of the device's own pace)"
    table.add("pretrain, default batch and AMP", result.step == steps, figures, short=short)
    device_figures = f"device alone {device_rate:.0f} pairs/s"
    if not small:
        peak = matmul_peak(device, torch.bfloat16 if config.amp == "bf16" else torch.float16 if config.amp == "fp16"
                           else torch.float32)
        device_figures += (f" ({device_rate * flops_per_pair(config) / peak:.0%} of the measured "
                           f"{peak / 1e12:.0f} TFLOP/s matmul peak)")
    table.add("loader vs device", True,
              f"end to end {loader_rate:.0f} pairs/s, {device_figures}: "
              + ("the loader keeps up" if loader_rate >= 0.9 * device_rate else
                 f"the loader is the bottleneck ({loader_rate / device_rate:.0%} of the device's pace)"))
    return result.run_dir


def device_pace(config, device: str, small: bool) -> float:
    """Pairs/s of training steps on batches already on the device: no loader at all."""
    model = build_model(config).to(device).train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    amp = MixedPrecision(config.amp, device)
    recipe = AugmentationRecipe(config.crop_size, blur=config.blur)
    augment = BatchAugment(recipe, device)
    crops = torch.randint(0, 256, (2 * config.batch_size, 3, config.crop_size, config.crop_size), dtype=torch.uint8,
                          device=device)
    # The parameters the loader draws (jitter 80%, grayscale 20%, blur as the recipe says), on the
    # CPU as the loader hands them over: zeros would skip every colour operation and time too little.
    canvas = Image.new("RGB", (config.crop_size, config.crop_size))
    parameters = torch.stack([draw_view(canvas, recipe)[1] for _ in range(2 * config.batch_size)])
    timed = 3 if small else 30
    for step in range(timed + 2):
        if step == 2:
            _synchronize(device)
            began = time.monotonic()
        views = augment(crops, parameters).contiguous(
            memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
        with amp.autocast():
            loss = simsiam_loss(model(views[:config.batch_size], views[config.batch_size:]))
        amp.backward_and_step(loss, optimizer)
    _synchronize(device)
    return timed * config.batch_size / (time.monotonic() - began)


def check_augmentation_syncs(table: Table, device: str, small: bool) -> None:
    """The batched colour augmentation decides which views take which operation from the loader's
    CPU copy of the parameters: on a GPU it must run without one device sync (it made 18 a step)."""
    check = "colour augmentation, no device sync"
    if small:
        table.add(check, None, "a CPU has no device syncs")
        return
    recipe = AugmentationRecipe(224, blur=True)
    augment = BatchAugment(recipe, device)
    canvas = Image.new("RGB", (224, 224))
    parameters = torch.stack([draw_view(canvas, recipe)[1] for _ in range(512)])
    crops = torch.randint(0, 256, (512, 3, 224, 224), dtype=torch.uint8, device=device)
    augment(crops, parameters)   # the first call may sync while CUDA sets itself up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment(crops, parameters)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    table.add(check, True, "512 views at 224 px under torch.cuda.set_sync_debug_mode('error')")


def check_batched_crops(table: Table, device: str, small: bool) -> None:
    """crop_on_device resizes all views of a group of images in two batched products: on the GPU
    it must equal torchvision's crop (within 0.5 of 255: TF32 matmuls) and cost milliseconds."""
    from torchvision.transforms import functional as TF

    count, size = (16, 32) if small else (256, 224)
    rng = np.random.default_rng(0)
    recipe = AugmentationRecipe(size)
    photos = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(count)]
    samples = [draw_uncropped_views(photo, recipe) for photo in photos]
    groups, boxes, flips, _ = stack_uncropped(samples)
    crop_on_device(groups, boxes, flips, size, device)   # the first call sets CUDA up
    _synchronize(device)
    syncs = "not checked on a CPU"
    if device.startswith("cuda"):
        # As the loader hands a batch over (pin_memory): then no copy may make the host wait.
        pinned = [type(group)(group[0].pin_memory(), group[1].pin_memory()) for group in groups]
        torch.cuda.set_sync_debug_mode("error")
        try:
            crop_on_device(pinned, boxes.pin_memory(), flips.pin_memory(), size, device)
            syncs = "no device sync (CUDA sync debug mode 'error', pinned batch)"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _synchronize(device)
    began = time.monotonic()
    views = crop_on_device(groups, boxes, flips, size, device)
    _synchronize(device)
    seconds = time.monotonic() - began
    worst = 0.0
    for sample in range(min(count, 8)):
        top, left, height, width = boxes[sample, 0].tolist()
        expected = TF.resized_crop(samples[sample][0].float(), top, left, height, width, [size, size], antialias=True)
        expected = expected.flip(-1) if flips[sample, 0] else expected
        worst = max(worst, (views[sample].cpu() - expected).abs().max().item())
    table.add("batched crops on the device", worst <= 0.5,
              f"{count} photos 500x375 -> 2x{count} views at {size} px in {len(groups)} group(s): "
              f"{seconds * 1000:.1f} ms; largest difference from torchvision {worst:.3f} of 255; {syncs}")


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_two_processes(table: Table, images: Path, workspace: Path, small: bool) -> None:
    if torch.cuda.device_count() < 2:
        table.add("torchrun, 2 processes on 2 GPUs", None, f"{torch.cuda.device_count()} GPU(s) here")
        return
    extra = ["--crop-size", "16", "--batch-size", "8"] if small else []
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                  "simsiam_embed.cli.main", "pretrain", str(images), "--epochs", "1", "--name", "two", *extra,
                  "--workspace", str(workspace)], cwd=workspace)
    table.add("torchrun, 2 processes on 2 GPUs", result.returncode == 0, result.stderr.strip().splitlines()[-1][:160])


def check_inference(table: Table, run_dir: Path, images: Path, workspace: Path, on_gpu: bool) -> None:
    from simsiam_embed.inference.onnx_encoder import tensorrt_installed

    exported = run([*CLI, "export", str(run_dir), "-o", str(workspace / "encoder.onnx")], cwd=workspace)
    table.add("export to ONNX (parity check)", exported.returncode == 0, (exported.stdout or exported.stderr).strip()[-160:])
    gpu_build = onnxruntime_has_cuda()
    providers = ["cuda", "tensorrt"] if on_gpu and gpu_build else ["cpu"]
    if on_gpu and not gpu_build:
        table.add("ONNX Runtime CUDA and TensorRT", None, "onnxruntime here is a CPU build (no CUDAExecutionProvider): "
                                                          "the flow runs on its CPU provider instead")
    for provider in providers:
        if provider == "tensorrt" and not tensorrt_installed():
            table.add("ONNX Runtime TensorRT", None, "TensorRT's runtime is not installed")
            continue
        began = time.monotonic()
        embedded = run([*CLI, "embed", str(images), "-o", str(workspace / f"vectors-{provider}"), "--model",
                        str(workspace / "encoder.onnx"), "--provider", provider], cwd=workspace)
        indexed = run([*CLI, "index", str(images), "--model", str(workspace / "encoder.onnx"), "--provider", provider,
                       "--index-dir", str(workspace / f"index-{provider}"), "--json"], cwd=workspace)
        searched = run([*CLI, "search", str(next(images.glob("*.jpg"))), "--json", "--provider", provider,
                        "--index-dir", str(workspace / f"index-{provider}")], cwd=workspace)
        try:
            hits = json.loads(searched.stdout)[0]["hits"]
            json.loads(indexed.stdout)
            parsed = f"JSON parsed, top score {hits[0]['score']:.4f}"
        except (ValueError, IndexError, KeyError):
            parsed = f"JSON NOT parsed: {searched.stdout[:120]!r} {searched.stderr[-200:]!r}"
        ok = embedded.returncode == indexed.returncode == searched.returncode == 0 and "NOT" not in parsed
        table.add(f"embed + index + search --json, provider {provider}", ok,
                  f"{embedded.stdout.strip()[:100]}; {parsed}; {time.monotonic() - began:.0f} s")
        if provider == "tensorrt":
            # embed (the export), index (the generation's copy) and search (that copy again) run
            # one encoder: one engine folder, named by its content, in the workspace's cache.
            folders = [folder for folder in (workspace / ".tensorrt-cache").glob("*") if folder.is_dir()]
            engines = [engine for folder in folders for engine in folder.glob("*.engine")]
            table.add("TensorRT: one engine for the encoder and its index copies", len(folders) == 1 and bool(engines),
                      f"{len(folders)} engine folder(s), {len(engines)} engine file(s) in {workspace / '.tensorrt-cache'}")


def onnxruntime_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def check_fp16_embedding(table: Table, run_dir: Path, images: Path, workspace: Path, on_gpu: bool) -> None:
    """`--precision fp16` against fp32 on each GPU provider: images/s and the share of each image's
    10 nearest neighbours fp16 finds as fp32 does (what `auto` on GPUs is to be decided by)."""
    if not on_gpu or not onnxruntime_has_cuda():
        table.add("embed fp16 against fp32", None, "fp16 is for GPUs" if not on_gpu else
                  "onnxruntime here is a CPU build: no GPU provider to run fp16 on")
        return
    from simsiam_embed.inference.onnx_encoder import tensorrt_installed

    for provider in ["cuda"] + (["tensorrt"] if tensorrt_installed() else []):
        rates, vectors = {}, {}
        for precision in ("fp32", "fp16"):
            out = workspace / f"vectors-{provider}-{precision}"
            embedded = run([*CLI, "embed", str(images), "-o", str(out), "--model", str(run_dir), "--provider", provider,
                            "--precision", precision], cwd=workspace)
            if embedded.returncode != 0:
                table.add(f"embed fp16 against fp32, provider {provider}", False, embedded.stderr.strip()[-160:])
                break
            rates[precision] = float(re.search(r"\(([\d.]+) images/s", embedded.stdout).group(1))
            vectors[precision] = np.load(out / "embeddings.npy")[:1000]
        else:
            neighbours = []
            for features in vectors.values():
                similarity = features @ features.T
                np.fill_diagonal(similarity, -np.inf)
                neighbours.append(np.argsort(-similarity, axis=1)[:, :10])
            overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(*neighbours)]))
            table.add(f"embed fp16 against fp32, provider {provider}", overlap >= 0.95,
                      f"fp32 {rates['fp32']:.0f} images/s, fp16 {rates['fp16']:.0f} images/s "
                      f"({rates['fp16'] / rates['fp32']:.2f}x); top-10 neighbours shared {overlap:.3f}")


def check_faiss_gpu(table: Table) -> None:
    import faiss

    from simsiam_embed.index.store import GPU_MAX_K, LoadedIndex, to_gpu_if_available

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        table.add("FAISS on the GPU", None, "faiss-cpu installed (no GPU build)")
        return
    vectors = np.random.default_rng(0).standard_normal((100_000, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(512))
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    gpu = to_gpu_if_available(index)
    loaded = LoadedIndex(Path("."), Path("."), None, index, {}, vectors, np.arange(len(vectors)), gpu)
    began = time.monotonic()
    _, ids = loaded.search(vectors[:1000], 10)
    seconds = time.monotonic() - began
    _, many = loaded.search(vectors[:2], GPU_MAX_K + 1000)
    ok = gpu is not index and bool((ids[:, 0] == np.arange(1000)).all()) and many.shape[1] == GPU_MAX_K + 1000
    table.add("FAISS on the GPU", ok, f"1,000 queries on 100k x 512 flat: {1000 / seconds:.0f} queries/s; "
                                      f"k={GPU_MAX_K + 1000} answered on the CPU")


def check_detection(table: Table, images: Path, image_side: int, side: int, workspace: Path, device: str,
                    steps: int) -> None:
    from simsiam_embed.detection.finetune import DetectionConfig, finetune_detection

    boxes = coco_boxes(images, image_side)
    on_gpu = device.startswith("cuda")
    config = DetectionConfig(data=str(boxes), init="random", backbone="resnet50" if on_gpu else "resnet18",
                             epochs=1, batch_size=4 if on_gpu else 2, min_size=side, max_size=side, warmup_steps=2,
                             roi_samples=64, device=device, amp="fp16" if on_gpu else "off", channels_last=on_gpu,
                             num_workers=2)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    began = time.monotonic()
    result = finetune_detection(config, Workspace(workspace), "detection-check", report=lambda m: print(m, flush=True),
                                show_progress=False, stop=StopRequest(stop_at_step=steps))
    seconds = time.monotonic() - began
    figures = f"{result.step} steps of batch {config.batch_size} at {side} px, AMP {config.amp}: {seconds:.0f} s"
    if on_gpu:
        figures += f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    table.add("detection fine-tuning", result.step == steps and all(np.isfinite(result.losses)), figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default; fails without a GPU) or cpu (small sizes)")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="where to write the table as JSON (default: OUT/gpu_check.json, "
                                                  "or ./gpu_check.json with a temporary folder)")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("FAILED: --device cuda, and PyTorch sees no CUDA GPU here (use --device cpu to check the script itself)",
              file=sys.stderr)
        sys.exit(2)
    small = not on_gpu
    name = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({os.cpu_count()} cores), small sizes"
    table = Table()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = (args.out or Path(tmp)).resolve()
        workspace.mkdir(parents=True, exist_ok=True)
        try:
            side = 256 if on_gpu else 48
            steps = 20 if on_gpu else 3
            # On a GPU more than `steps` batches of the largest default (512): no checkpoint in the timed window.
            images = draw_images(workspace / "images", (steps + 2) * 512 if on_gpu else 24, side)
            run_dir = table.run("pretrain, default batch and AMP", check_pretraining, images, workspace, args.device,
                                small, steps)
            table.run("colour augmentation, no device sync", check_augmentation_syncs, args.device, small)
            table.run("batched crops on the device", check_batched_crops, args.device, small)
            table.run("torchrun, 2 processes on 2 GPUs", check_two_processes, images, workspace, small)
            # Inference and detection need no more images than a few batches.
            few = draw_images(workspace / "few-images", 1024, side) if on_gpu else images
            if run_dir is not None:
                table.run("export and inference", check_inference, run_dir, few, workspace, on_gpu)
                table.run("embed fp16 against fp32", check_fp16_embedding, run_dir, few, workspace, on_gpu)
            table.run("FAISS on the GPU", check_faiss_gpu)
            table.run("detection fine-tuning", check_detection, few, side, 512 if on_gpu else 64, workspace,
                      args.device, 20 if on_gpu else 3)
        finally:
            table.print(name)
            table.write_json(args.json or (args.out or Path.cwd()) / "gpu_check.json", name)
    sys.exit(1 if table.failed else 0)


if __name__ == "__main__":
    main()
