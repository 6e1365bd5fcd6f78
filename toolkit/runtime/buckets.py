"""Static shape buckets: one engine per batch size, behind one engine that serves every batch up to the largest.

Why: a package compiled for one static batch lets the compiler specialize every kernel (and a CUDA graph per
bucket is captured once), where a dynamic-batch package keeps symbolic sizes. ``rtdetr-deploy build --static
--batch 1,8,32 -o model.buckets`` writes one static package per batch size (``model.b1.pt2``, ...) and this
manifest; ``toolkit.load("model.buckets")`` gives a :class:`BucketEngine`. A call with ``n`` images runs on the
smallest bucket ``b >= n``: the batch is padded to ``b`` by repeating its last image (real values, never garbage
that could trip a sentinel) and the outputs are sliced back to ``n``. Each image's detections depend on that
image only (inference-mode norms), so the padding changes no result.

Both binders check: this engine's binder checks the caller's tensors against the signature with ``N`` in
[1, largest bucket], and each bucket's own binder checks the padded batch against its static signature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic import write_text
from ..errors import EngineError
from .base import BaseEngine
from .binding import BoundInputs

SUFFIX = ".buckets"
MANIFEST_VERSION = 1


class BucketEngine(BaseEngine):
    """Dispatch each call to the smallest static engine that fits (see the module docstring).

    ``engines``: batch size -> engine whose batch dim is fixed at that size (its signature's ``N`` bounds).
    ``calls``: how many calls each bucket served (for tests and for finding an unused bucket).
    """

    backend = "buckets"

    def __init__(self, engines: Mapping[int, BaseEngine], **options: Any) -> None:
        if not engines:
            raise EngineError("a bucket engine needs at least one bucket")
        self.engines = {int(b): e for b, e in sorted(engines.items())}
        first = next(iter(self.engines.values()))
        for b, e in self.engines.items():
            lo, hi = e.signature.bounds("N")
            if (lo, hi) != (b, b):
                raise EngineError(f"bucket {b}: its engine's batch is {lo}..{hi}, not the static {b} a bucket needs")
            if e.device != first.device or e.signature.with_bounds(N=(0, None)) != first.signature.with_bounds(N=(0, None)):
                raise EngineError(f"bucket {b}: its engine's signature or device differs from bucket {next(iter(self.engines))}'s")
        self.buckets = tuple(self.engines)
        self.calls = {b: 0 for b in self.buckets}
        super().__init__(first.signature.with_bounds(N=(1, self.buckets[-1])), first.device,
                         class_names=first.class_names, **options)

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds ``n`` images."""
        for b in self.buckets:
            if b >= n:
                return b
        raise EngineError(f"batch {n} exceeds the largest bucket ({self.buckets[-1]}); split it or build a larger bucket")

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        n = next(iter(bound.tensors.values())).shape[0]
        b = self.bucket_for(n)
        feeds = bound.tensors
        if b != n:
            feeds = {k: torch.cat([t, t[-1:].expand(b - n, *t.shape[1:])]) for k, t in feeds.items()}
        out = self.engines[b].infer(feeds)
        self.calls[b] += 1
        return self._into_callers({k: v[:n] for k, v in out.items()}, bound)

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


def write_manifest(path: str | Path, packages: Mapping[int, Path], info: dict[str, Any]) -> Path:
    """The ``.buckets`` manifest: batch size -> package file (relative to the manifest), plus ``info``."""
    path = Path(path)
    data = {"manifest_version": MANIFEST_VERSION, **info,
            "buckets": {str(b): str(Path(p).relative_to(path.parent)) for b, p in sorted(packages.items())}}
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        buckets = {int(b): path.parent / p for b, p in data["buckets"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EngineError(f"{path}: not a bucket manifest ({e.__class__.__name__}: {e}); rebuild with 'rtdetr-deploy build --static'") from None
    missing = [str(p.name) for p in buckets.values() if not p.exists()]
    if missing:
        raise EngineError(f"{path}: bucket package(s) {', '.join(missing)} missing beside it; rebuild with 'rtdetr-deploy build --static'")
    return {**data, "buckets": buckets}
