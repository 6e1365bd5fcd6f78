"""End-to-end throughput, ``bench --end-to-end``: JPEG files on disk to detections through the image pipeline.

The files (640x480 JPEGs at quality 90, like camera frames) are written once per process to a temporary
folder; the measurement reads, decodes (on the GPU with CUDA), preprocesses and infers them batch by batch,
the decode of the next batches overlapping the inference of this one, and divides the images by the wall time
to the last result on the device.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..runtime.base import BaseEngine
from ..runtime.pipeline import ImagePipeline
from ..runtime.preprocessing import engine_preprocess
from ..signature import INPUT_IMAGES, INPUT_SIZES

_FOLDERS: dict[tuple[int, tuple[int, int], int], Path] = {}


def synthetic_jpegs(count: int, size_hw: tuple[int, int] = (480, 640), quality: int = 90) -> Path:
    """A folder of ``count`` distinct structured JPEGs (written once per process)."""
    from torchvision.io import encode_jpeg

    from ..export.verify import verification_images

    key = (count, tuple(size_hw), quality)
    if key not in _FOLDERS or not _FOLDERS[key].is_dir():
        folder = Path(tempfile.mkdtemp(prefix="rtdetr-e2e-"))
        for i in range(0, count, 16):
            images = verification_images(min(16, count - i), tuple(size_hw), seed=3 + i)
            for k, im in enumerate(images):
                data = encode_jpeg((im.clamp(0, 1) * 255).to(torch.uint8), quality=quality)
                (folder / f"{i + k:05d}.jpg").write_bytes(data.numpy().tobytes())
        _FOLDERS[key] = folder
    return _FOLDERS[key]


def _pass(engine: BaseEngine, paths: list[Path], batch: int, device: torch.device, spec: Any) -> int:
    pipeline = ImagePipeline(paths, spec, batch, device)
    n = 0
    for b in pipeline:
        engine.infer({INPUT_IMAGES: b.images, INPUT_SIZES: b.sizes})
        n += len(b.paths)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def end_to_end_images_per_s(engine: BaseEngine, batch: int, device: torch.device, *, batches: int | None = None, files: int = 64,
                            spec: Any = None) -> float:
    """Images per second from JPEG files to outputs on the device, over ``batches`` batches (20 on a GPU, 3 on the
    CPU) after an untimed pass of 2."""
    batches = batches if batches is not None else (20 if device.type == "cuda" else 3)
    spec = spec if spec is not None else engine_preprocess(engine)
    folder = synthetic_jpegs(files)
    names = sorted(folder.glob("*.jpg"))
    paths = [names[i % len(names)] for i in range(batch * batches)]
    _pass(engine, paths[:batch * 2], batch, device, spec)  # warm-up: decoder handles, allocator, lazy engine set-up
    start = time.perf_counter()
    n = _pass(engine, paths, batch, device, spec)
    return n / (time.perf_counter() - start)
