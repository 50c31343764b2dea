"""Pretrained starting points by name, through torchvision's own weight API, download and cache.

    >>> path, label, digest = pretrained_weights_file("imagenet", backbone="resnet50")
    >>> path        # $TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth (torch.hub's cache)
    >>> label       # 'resnet50.IMAGENET1K_V2'

Nothing is fetched unasked: only a name the user gave (``pretrain --init imagenet``) downloads,
once, into torch.hub's cache, where torchvision's own ``weights=`` would put it. torchvision
publishes each file's SHA-256 prefix in its name; a download is checked against it by torch.hub,
and so is a file already in the cache, every time (torch.hub trusts a cached file as it is). The
file is then read as any ``--init`` file is: tensors only, finite, under torchvision's names.
"""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path
from typing import Callable

from simsiam_embed.artefacts import file_digest
from simsiam_embed.errors import UserError

#: The ResNets this package trains, and what "imagenet" means for each: torchvision's DEFAULT.
BACKBONES = ("resnet18", "resnet34", "resnet50")
GENERIC_NAME = "imagenet"
#: torch.hub's own rule: the hash prefix is what follows the last "-" in the file's name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")


def known_names() -> list[str]:
    """Every name ``--init`` takes: "imagenet" and torchvision's ``<resnet>.<weights>``."""
    from torchvision.models import get_model_weights

    names = [GENERIC_NAME]
    for backbone in BACKBONES:
        names += [f"{backbone}.{member}" for member in get_model_weights(backbone).__members__ if member != "DEFAULT"]
    return names


def is_weights_name(text: str) -> bool:
    """Whether ``text`` is meant as a name (not a path): "imagenet" or "<resnet>.<WEIGHTS>"."""
    return text == GENERIC_NAME or bool(re.fullmatch(r"resnet\d+\.[A-Z0-9_]+", text))


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
        raise UserError(f"{name} is neither a file nor a weights name known here: give a .pth or "
                        f".safetensors file, or one of {', '.join(known_names())}")
    return f"{architecture}.{weights.name}", weights.url


def pretrained_weights_file(name: str, backbone: str, report: Callable[[str], None] = print,
                            download: Callable[..., None] | None = None) -> tuple[Path, str, str]:
    """The cached file of ``name``'s weights (downloaded first if it is not in the cache), the
    exact name and the file's SHA-256 (read once, for the check); a one-line error when it cannot
    be had, naming the file and where it goes."""
    import torch.hub

    label, url = published_weights(name, backbone)
    file_name = url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    hash_prefix = (_HASH_IN_NAME.search(file_name) or [None, None])[1]
    if not cached.is_file():
        report(f"downloading {label} ({url}) into {cached.parent}")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # torch.hub writes to a temporary file beside it, checks the hash, then renames:
            # an interrupted or corrupted download leaves no file behind.
            (download or torch.hub.download_url_to_file)(url, str(cached), hash_prefix, progress=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            reason = str(getattr(error, "reason", None) or error).splitlines()[0][:160]
            raise UserError(f"cannot download {label} ({reason}): put {file_name} from {url} at {cached} "
                            "(or set TORCH_HOME), then run again") from None
    digest = file_digest(cached)
    if hash_prefix and not digest.startswith(hash_prefix):
        raise UserError(f"{cached} is not the file torchvision publishes for {label} (its SHA-256 does not begin "
                        f"{hash_prefix}): delete it (rm {cached}) and run again to download it anew")
    return cached, label, digest
