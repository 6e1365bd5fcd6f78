"""Calibration data for post-training quantization: already-preprocessed batches fed to ONNX Runtime's calibrator.

The batches come from the caller (``toolkit.tasks.quantize`` preprocesses the user's images with the model's own
:class:`~toolkit.signature.PreprocessSpec`), so this layer never decodes or resizes an image itself and the
calibration sees exactly what the deployed model will see. A tqdm bar counts the calibration batches, because
ONNX Runtime's calibrator runs the whole augmented graph once per batch and gives no sign of life meanwhile.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..signature import INPUT_IMAGES, INPUT_SIZES


def feeds_from_batches(batches: Iterable[tuple[Any, Any]], sizes_dtype: str = "int64") -> list[dict[str, np.ndarray]]:
    """(images [N,3,H,W] float32, orig_target_sizes [N,2]) pairs (torch or numpy) -> ONNX Runtime feed dicts."""
    feeds = []
    for images, sizes in batches:
        images = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
        sizes = sizes.numpy() if hasattr(sizes, "numpy") else np.asarray(sizes)
        if images.ndim != 4 or images.dtype != np.float32:
            raise InputError(f"calibration images must be float32 [N,3,H,W], got {images.dtype} {list(images.shape)}")
        feeds.append({INPUT_IMAGES: np.ascontiguousarray(images), INPUT_SIZES: sizes.astype(sizes_dtype)})
    if not feeds:
        raise InputError("no calibration images: give at least one image (or --synthetic N)")
    return feeds


def make_reader(feeds: Sequence[Mapping[str, np.ndarray]], progress: bool = True, desc: str = "calibrate") -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``feeds`` that draws a progress bar."""
    from onnxruntime.quantization import CalibrationDataReader
    from tqdm.auto import tqdm

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._bar = tqdm(total=len(feeds), desc=desc, unit="batch", disable=not progress, leave=False)
            self._it: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._it, None)
            if item is None:
                self._bar.close()
                return None
            self._bar.update(1)
            return dict(item)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return _Reader()
