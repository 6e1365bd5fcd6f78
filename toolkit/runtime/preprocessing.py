"""The one preprocessing helper: image files, PIL images or uint8 tensors -> ``images`` + ``orig_target_sizes``.

Every backend and the torch reference get their inputs from here, driven by the model's
:class:`~toolkit.signature.PreprocessSpec`, so stretch-vs-letterbox and (w,h)-vs-(h,w) cannot drift
between scripts. Resizing is torchvision's (transforms.v2), decoding is torchvision.io.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import InputError
from ..signature import INPUT_IMAGES, PreprocessSpec

if TYPE_CHECKING:
    from ..base import BaseEngine

PILLOW_SUFFIXES = (".bmp",)  # torchvision.io cannot decode these; Pillow (optional) can
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", *PILLOW_SUFFIXES)


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file into a uint8 RGB tensor [3,H,W] as it is displayed; a clear error for anything else.

    The EXIF orientation is applied (a phone photo stored sideways is turned upright), so boxes refer to the
    image as viewers show it. 16-bit images are scaled to 8 bits. Formats torchvision cannot decode (BMP)
    are read with Pillow.
    """
    from torchvision.io import ImageReadMode, decode_image

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p}: no such file")
    try:
        img = decode_image(str(p), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception as e:  # torchvision raises RuntimeError for undecodable bytes and formats it lacks
        img = _read_with_pillow(p, e)
    if img.ndim == 4:  # an animated GIF: its first frame, as viewers show before playing
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        from torchvision.transforms.v2.functional import to_dtype

        img = to_dtype(img, torch.uint8, scale=True)
    return img


def _read_with_pillow(p: Path, first: Exception) -> torch.Tensor:
    try:
        from PIL import Image, ImageOps
        from torchvision.transforms.v2.functional import pil_to_tensor
    except ImportError:
        if p.suffix.lower() in PILLOW_SUFFIXES:
            raise InputError(f"image {p}: {p.suffix} files need Pillow (pip install pillow); or convert it to PNG or JPEG") from None
        Image = None
    try:
        if Image is None:
            raise first

        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            return pil_to_tensor(im.convert("RGB"))
    except Exception:
        raise InputError(f"image {p}: not a readable image ({first.__class__.__name__}: "
                         f"{(str(first).strip().splitlines() or [''])[0]})") from None


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand directories into their image files (sorted); keep files as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    if not out:
        raise InputError(f"no images found in {', '.join(map(str, paths)) or '(nothing given)'}")
    return out


def _to_uint8_chw(image: Any) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"image tensors must be uint8 [3,H,W] RGB, got {str(image.dtype).removeprefix('torch.')} {list(image.shape)}")
        return image
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL comes with torchvision
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(image.convert("RGB"))
    raise InputError(f"cannot preprocess a {type(image).__name__}: pass image paths, PIL images or uint8 [3,H,W] tensors")


def letterbox_geometry(orig_wh: tuple[int, int], size_hw: tuple[int, int]) -> tuple[float, int, int, int, int]:
    """(scale, new_w, new_h, pad_left, pad_top) of a centred letterbox; the postprocess inverts exactly this."""
    w, h = orig_wh
    scale = min(size_hw[1] / w, size_hw[0] / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return scale, new_w, new_h, (size_hw[1] - new_w) // 2, (size_hw[0] - new_h) // 2


def resize_normalize(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [3,h,w] or a stack of same-sized ones [N,3,h,w] (any device) -> float32 at ``spec.size`` in
    ``spec.value_range``: the resize (stretch or letterbox), channel order and range of the preprocessing spec.
    One resize call for a whole stack (the GPU pipeline's batches), bitwise what it does to each image alone."""
    from torchvision.transforms.v2 import functional as F

    h, w = int(images.shape[-2]), int(images.shape[-1])
    if spec.resize == "stretch":
        out = F.resize(images, list(spec.size), antialias=True)
    else:
        _, new_w, new_h, left, top = letterbox_geometry((w, h), spec.size)
        out = F.resize(images, [new_h, new_w], antialias=True)
        right, bottom = spec.size[1] - new_w - left, spec.size[0] - new_h - top
        out = F.pad(out, [left, top, right, bottom], fill=round(spec.pad_value * 255))
    out = F.to_dtype(out, torch.float32, scale=True)
    if spec.channel_order == "BGR":
        out = out.flip(-3)
    lo, hi = spec.value_range
    if (lo, hi) != (0.0, 1.0):
        out = out * (hi - lo) + lo
    return out.contiguous()


def preprocess_one(image: Any, spec: PreprocessSpec) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> (float32 [3,H,W] in ``spec.value_range``, original (w, h))."""
    img = _to_uint8_chw(image)
    return resize_normalize(img, spec), (int(img.shape[-1]), int(img.shape[-2]))


def preprocess(images: Any, spec: PreprocessSpec, sizes_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (one or a list of paths / PIL / uint8 tensors) -> ``images`` [N,3,H,W] float32, ``orig_target_sizes`` [N,2] (w,h)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise InputError("no images to preprocess")
    pairs = [preprocess_one(im, spec) for im in images]
    batch = torch.stack([p[0] for p in pairs])
    sizes = torch.tensor([p[1] for p in pairs], dtype=sizes_dtype)
    return batch, sizes


def engine_preprocess(engine: BaseEngine) -> PreprocessSpec:
    """The engine's own preprocessing; for files without it, the fixed input size of ``images``."""
    if engine.signature.preprocess is not None:
        return engine.signature.preprocess
    _, _, h, w = engine.signature.input(INPUT_IMAGES).shape
    if not (isinstance(h, int) and isinstance(w, int)):
        raise InputError("the engine declares no preprocessing and no fixed input size; re-export it with rtdetr-deploy export")
    return PreprocessSpec(size=(h, w))
