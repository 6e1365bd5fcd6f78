"""Static shape buckets (``rtdetr-deploy build --static --batch 1,8,32 -o model.buckets``): one package per batch
size, each compiled for that batch alone, and the manifest :mod:`toolkit.runtime.buckets` loads as one engine.

The packages go beside the manifest as ``NAME.b{N}.pt2`` (AOTInductor) or ``NAME.b{N}.ep`` (Torch-TensorRT),
each with its own sidecar (static batch ``N..N``) and through the builder's own cache; the manifest records
the buckets, the backend and the signature the bucket engine presents (batch 1 up to the largest bucket).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..atomic import check_output_path
from ..models.loading import load_model
from ..runtime.buckets import SUFFIX, write_manifest
from ..runtime.sidecar import read_sidecar
from .build import MODEL_BUILDERS, BuildError

PACKAGE_SUFFIX = {"aoti": ".pt2", "torch-tensorrt": ".ep"}


def check_buckets(batches: Sequence[Any]) -> tuple[int, ...]:
    """Sorted distinct positive batch sizes, or a :class:`BuildError`."""
    try:
        sizes = sorted({int(b) for b in batches})
    except (TypeError, ValueError):
        raise BuildError(f"bucket batch sizes must be integers, got {list(batches)!r}") from None
    if not sizes or sizes[0] < 1:
        raise BuildError(f"bucket batch sizes must be positive integers, got {list(batches)!r}")
    return tuple(sizes)


def build_buckets(model: Any, output: str | Path, batches: Sequence[int], *, backend: str = "aoti",
                  config: str | None = None, progress: bool = True, **options: Any) -> Path:
    """Build one static package per size in ``batches`` for ``backend`` and the manifest ``output`` (``.buckets``).

    ``model``: anything :func:`toolkit.models.loading.load_model` accepts; ``options`` go to every package's builder
    (precision, device, fold, inductor_configs, cache...). Returns the manifest path.
    """
    output = check_output_path(output)
    if output.suffix != SUFFIX:
        raise BuildError(f"a bucket manifest must end in {SUFFIX}, got {output.name} (its packages are written beside it)")
    if backend not in PACKAGE_SUFFIX:
        raise BuildError(f"static buckets are built for {', '.join(PACKAGE_SUFFIX)}; got backend {backend!r}")
    sizes = check_buckets(batches)
    module_name, function = MODEL_BUILDERS[backend]
    builder = getattr(import_module(f".{module_name}", __package__), function)
    deploy = load_model(model, config=config).eval()
    if not isinstance(model, nn.Module):  # every package records where its weights came from (source_record)
        from ..export.onnx import _source_metadata

        deploy.source_metadata = _source_metadata(model, config)
    packages: dict[int, Path] = {}
    for i, b in enumerate(sizes):
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"bucket {i + 1}/{len(sizes)}: batch {b}")
        packages[b] = builder(deploy, output.with_name(f"{output.stem}.b{b}{PACKAGE_SUFFIX[backend]}"), batch=(b, b, b),
                              progress=progress, **options)
    meta = read_sidecar(packages[sizes[-1]])
    signature = dict(meta["signature"], dim_bounds={**meta["signature"].get("dim_bounds", {}), "N": [1, sizes[-1]]})
    info = {"backend": "buckets", "inner_backend": backend, "batches": list(sizes), "precision": meta.get("precision"),
            "device": meta.get("device"), "signature": signature, "class_names": meta.get("class_names"),
            "fold": meta.get("fold"), "model_source": meta.get("model_source")}
    return write_manifest(output, packages, info)
