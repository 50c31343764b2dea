"""Pretrained starting points by name, through torchvision's or timm's own weight API and cache.

    >>> path, label, digest = pretrained_weights_file("imagenet", backbone="resnet50")
    >>> path        # $TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth (torch.hub's cache)
    >>> label       # 'resnet50.IMAGENET1K_V2'
    >>> pretrained_weights_file("resnet50.a1_in1k", backbone="resnet50")[0]
    ... # $HF_HUB_CACHE/models--timm--resnet50.a1_in1k/snapshots/<commit>/model.safetensors

Nothing is fetched unasked: only a name the user gave (``pretrain --init imagenet``) downloads,
once, into the cache where torchvision's own ``weights=`` (torch.hub's) or timm's
``pretrained=True`` (the Hugging Face Hub's) would put it. Each file is checked against the hash
its publisher gives, on download and again on every use (neither cache checks a file it holds):
torchvision's SHA-256 prefix in the file's name; the Hub's SHA-256 of the file, which names the
blob its cache keeps it in. The file is then read as any ``--init`` file is: tensors only,
finite, under torchvision's names (timm's plain ResNets use the same).

Names: torchvision's are ``<resnet>.<WEIGHTS>`` in capitals (its enum members), timm's are
``<resnet>.<tag>`` in lower case (its pretrained tags); "imagenet" is torchvision's DEFAULT.
"""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path
from typing import Callable

from simsiam_embed.artefacts import file_digest
from simsiam_embed.errors import Report, UserError
from simsiam_embed.settings import BACKBONE_NAMES

#: The ResNets this package trains (settings' list), and "imagenet" means torchvision's DEFAULT for each.
BACKBONES = BACKBONE_NAMES
GENERIC_NAME = "imagenet"
#: torch.hub's own rule: the hash prefix is what follows the last "-" in the file's name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")


def known_names() -> list[str]:
    """Every name ``--init`` takes: "imagenet", torchvision's ``<resnet>.<WEIGHTS>`` and, where
    timm is installed, timm's ``<resnet>.<tag>``."""
    from torchvision.models import get_model_weights

    names = [GENERIC_NAME]
    for backbone in BACKBONES:
        names += [f"{backbone}.{member}" for member in get_model_weights(backbone).__members__ if member != "DEFAULT"]
    try:
        import timm
    except ImportError:
        return names
    return names + [name for backbone in BACKBONES for name in timm.list_pretrained(f"{backbone}.*")]


def is_weights_name(text: str) -> bool:
    """Whether ``text`` is meant as a name (not a path): "imagenet", "<resnet>.<WEIGHTS>" or
    "<resnet>.<tag>"."""
    return text == GENERIC_NAME or bool(re.fullmatch(r"resnet\d+\.[A-Za-z0-9_]+", text))


def is_timm_name(text: str) -> bool:
    """timm's tags are lower case ("a1_in1k"); torchvision's enum members are capitals."""
    return bool(re.fullmatch(r"resnet\d+\.[a-z0-9_]+", text)) and text != GENERIC_NAME


def described(label: str) -> str:
    """An exact name with whose weights they are: "torchvision's resnet50.IMAGENET1K_V2"."""
    return f"timm's {label}" if is_timm_name(label) else f"torchvision's {label}"


def published_weights(name: str, backbone: str) -> tuple[str, str]:
    """(the exact name, the URL torchvision publishes) for ``name`` ("imagenet": ``backbone``'s
    DEFAULT weights), or a one-line error listing the names there are."""
    from torchvision.models import get_model_weights

    architecture, _, member = name.partition(".") if name != GENERIC_NAME else (backbone, "", "DEFAULT")
    try:
        weights = get_model_weights(architecture)[member] if architecture in BACKBONES else None
    except KeyError:
        weights = None
    if weights is None:
        raise _unknown_name(name)
    return f"{architecture}.{weights.name}", weights.url


def _unknown_name(name: str) -> UserError:
    """The one-line error for a name that is neither torchvision's nor timm's, listing those that are."""
    return UserError(f"{name} is neither a file nor a weights name known here: give a .pth or "
                     f".safetensors file, or one of {', '.join(known_names())}")


def _torch_hub_path(url: str) -> Path:
    """Where torch.hub keeps the file at ``url`` (torchvision's ``weights=`` puts it there too)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _torch_hub_download(url: str, destination: str, hash_prefix: str | None, progress: bool) -> None:
    import torch.hub

    torch.hub.download_url_to_file(url, destination, hash_prefix, progress=progress)


def cached_default_weights(backbone: str) -> tuple[str, Path] | None:
    """(exact name, file) of ``backbone``'s "imagenet" weights if torch.hub's cache holds them
    already: what a run may start from by default, since nothing needs downloading."""
    label, url = published_weights(GENERIC_NAME, backbone)
    cached = _torch_hub_path(url)
    return (label, cached) if cached.is_file() else None


def pretrained_weights_file(name: str, backbone: str, report: Report = print,
                            download: Callable[..., None] | None = None) -> tuple[Path, str, str]:
    """The cached file of ``name``'s weights (downloaded first if it is not in the cache), the
    exact name and the file's SHA-256 (read once, for the check); a one-line error when it cannot
    be had, naming the file and where it goes."""
    if is_timm_name(name):
        return _timm_weights_file(name, report, download)
    label, url = published_weights(name, backbone)
    cached = _torch_hub_path(url)
    file_name = cached.name
    hash_prefix = (_HASH_IN_NAME.search(file_name) or [None, None])[1]
    if not cached.is_file():
        report(f"downloading {label} ({url}) into {cached.parent}")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # torch.hub writes to a temporary file beside it, checks the hash, then renames:
            # an interrupted or corrupted download leaves no file behind.
            (download or _torch_hub_download)(url, str(cached), hash_prefix, progress=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            reason = str(getattr(error, "reason", None) or error).splitlines()[0][:160]
            raise UserError(f"cannot download {label} ({reason}): put {file_name} from {url} at {cached} "
                            "(or set TORCH_HOME), then run again") from None
    digest = file_digest(cached)
    if hash_prefix and not digest.startswith(hash_prefix):
        raise UserError(f"{cached} is not the file torchvision publishes for {label} (its SHA-256 does not begin "
                        f"{hash_prefix}): delete it (rm {cached}) and run again to download it anew")
    return cached, label, digest


#: The file timm's Hub repositories hold the weights in (its ``pretrained=True`` reads the same).
TIMM_WEIGHTS_FILE = "model.safetensors"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _timm_weights_file(name: str, report: Report,
                       download: Callable[..., str] | None = None) -> tuple[Path, str, str]:
    """timm's weights ``name`` from the Hugging Face Hub's cache (downloaded first if absent),
    checked against the SHA-256 the Hub publishes for the file: the name of the blob the cache
    keeps it in. Only timm's plain ResNets (torchvision's layer names) are offered."""
    architecture = name.partition(".")[0]
    try:
        import timm
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise UserError(f"{name} is one of timm's weights: pip install timm, or use torchvision's "
                        f"({GENERIC_NAME} or {architecture}.IMAGENET1K_V1)") from None
    repository = None
    if architecture in BACKBONES:
        try:
            repository = timm.models.get_pretrained_cfg(name).hf_hub_id
        except (RuntimeError, AttributeError):   # timm: "Invalid pretrained tag"; no config at all
            repository = None
    if not repository:
        raise _unknown_name(name)
    fetch = download or hf_hub_download
    cache = Path(constants.HF_HUB_CACHE)
    repository_folder = cache / f"models--{repository.replace('/', '--')}"
    try:
        cached = Path(fetch(repository, TIMM_WEIGHTS_FILE, local_files_only=True))
    except (OSError, ValueError):   # LocalEntryNotFoundError is an OSError
        report(f"downloading timm's {name} (Hugging Face Hub {repository}/{TIMM_WEIGHTS_FILE}) into {cache}")
        try:
            # The Hub's client writes to an .incomplete file and renames it when whole.
            cached = Path(fetch(repository, TIMM_WEIGHTS_FILE))
        except (OSError, ValueError) as error:   # the client's HTTP and offline errors are OSErrors
            reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
            raise UserError(f"cannot download timm's {name} ({reason}): on a machine online run `hf download "
                            f"{repository} {TIMM_WEIGHTS_FILE}` and copy its folder {repository_folder.name} "
                            f"into {cache} (or set HF_HUB_CACHE), then run again") from None
    # Where the cache holds copies instead of links (Windows without symlinks) the blob's name is
    # not at hand and the Hub client's own check on download is all there is.
    blob = cached.resolve()
    digest = file_digest(blob)
    if _SHA256.fullmatch(blob.name) and digest != blob.name:
        raise UserError(f"{cached} is not the file the Hugging Face Hub publishes for timm's {name} (its SHA-256 "
                        f"is not {blob.name[:12]}...): delete it (rm -r {repository_folder}) and run again")
    return cached, name, digest
