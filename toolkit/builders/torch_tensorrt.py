"""Build a Torch-TensorRT program (``.ep``) from a model: ``torch.export``, ``torch_tensorrt.compile``, ``torch_tensorrt.save``.

Like AOTInductor (:mod:`toolkit.builders.aoti`), Torch-TensorRT compiles the torch model, not the ONNX file:
:func:`build_torch_tensorrt` takes anything :func:`toolkit.models.loading.load_model` accepts. The model is exported
with the same dynamic-batch workarounds as AOTInductor, then the dynamo path turns the subgraphs TensorRT
supports (at least ``min_block_size`` ops each) into TensorRT engines and leaves the rest to PyTorch. The result
is saved as an ExportedProgram: ``MODEL.ep`` (the Torch-TensorRT convention), plus a sidecar ``MODEL.ep.json``.

The engines inside hold device code for one GPU architecture and one TensorRT version: the sidecar records
the compute capability and the Torch-TensorRT/TensorRT versions, and :mod:`toolkit.runtime.backends.torch_tensorrt`
refuses the program anywhere else.

Precision: since Torch-TensorRT 2.11 the dynamo path types layers explicitly from the model (2.14 has no
``enabled_precisions`` for it at all), so fp16/bf16 come from a half model: :class:`~toolkit.models.contract.ReducedPrecision`
puts the network body in half precision while the postprocess stays fp32. I/O is fp32 images / int64 sizes
either way. fp32 layers are built without TF32, like the exact-fp32 eager reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomic import check_output_path
from ..models.contract import PRECISIONS, ReducedPrecision
from ..models.loading import load_model
from ..runtime.backends.torch_tensorrt import INSTALL_HINT, tensorrt_version
from ..runtime.sidecar import write_sidecar
from .aoti import (
    _cache_key,
    _check_batch,
    _example_inputs,
    _export_and_compile,
    _from_cache,
    folded_body,
    _sidecar_info,
    source_record,
    _to_cache,
)
from .build import BuildError, cache_dir

SUFFIX = ".ep"


def _check_options(precision: str, batch: tuple[int, int, int], min_block_size: int) -> tuple[int, int, int]:
    if precision not in PRECISIONS:
        raise BuildError(f"precision must be one of {', '.join(PRECISIONS)} for Torch-TensorRT, got {precision!r}")
    if min_block_size < 1:
        raise BuildError(f"min_block_size must be at least 1, got {min_block_size}")
    return _check_batch(batch)


def _import_torch_tensorrt() -> Any:
    try:
        import torch_tensorrt
    except ImportError as e:
        raise BuildError(f"Torch-TensorRT is not installed ({e}): {INSTALL_HINT}") from None
    return torch_tensorrt


def _check_device(device: str, precision: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BuildError(f"device must be 'cuda' (or 'cuda:N'), got {device!r}") from None
    if dev.type != "cuda":
        raise BuildError(f"Torch-TensorRT builds TensorRT engines, which run on NVIDIA GPUs only: device must be 'cuda', got {device!r}")
    if not torch.cuda.is_available():
        raise BuildError("Torch-TensorRT needs a CUDA GPU and a CUDA build of torch; none is available here")
    dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if precision == "bf16":
        with torch.cuda.device(dev):  # is_bf16_supported asks the current device; emulation is no use to TensorRT
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                raise BuildError(f"precision='bf16' needs a GPU with bf16 support; {torch.cuda.get_device_name(dev)} has none (use fp16)")
    return dev


def _inputs(ttrt: Any, lo: int, opt: int, hi: int, h: int, w: int) -> list[Any]:
    """The engines' input profiles: images fp32 [N,3,H,W] and sizes int64 [N,2], N in [lo, hi]."""
    if lo == hi:
        return [ttrt.Input(shape=(lo, 3, h, w), dtype=torch.float32), ttrt.Input(shape=(lo, 2), dtype=torch.int64)]
    return [ttrt.Input(min_shape=(lo, 3, h, w), opt_shape=(opt, 3, h, w), max_shape=(hi, 3, h, w), dtype=torch.float32),
            ttrt.Input(min_shape=(lo, 2), opt_shape=(opt, 2), max_shape=(hi, 2), dtype=torch.int64)]


def build_torch_tensorrt(
    model: Any,
    output: str | Path,
    *,
    precision: str = "fp32",
    batch: tuple[int, int, int] = (1, 1, 8),
    device: str = "cuda",
    progress: bool = True,
    config: str | None = None,
    cache: bool = True,
    min_block_size: int = 5,
    fold: bool = True,
) -> Path:
    """Compile ``model`` with Torch-TensorRT to ``output`` (``.ep``) plus its sidecar; returns the path.

    ``model``: anything :func:`toolkit.models.loading.load_model` accepts (``config`` for a weights file).
    ``batch``: (min, opt, max); the program runs any batch in [min, max], TensorRT tunes for opt.
    ``device``: a CUDA device; the program runs only on GPUs of its compute capability, with the same
    Torch-TensorRT and TensorRT versions. ``min_block_size``: the fewest supported ops worth a TensorRT
    engine (smaller runs stay in PyTorch). ``cache``: reuse a program built before from the same weights,
    options, versions and GPU architecture (:func:`toolkit.builders.build.cache_dir`). ``fold``: compile a copy with
    BatchNorm folded into the convolutions (:func:`toolkit.models.fold.fold_model`); the sidecar records it.
    """
    output = check_output_path(output)
    if output.suffix != SUFFIX:
        raise BuildError(f"a Torch-TensorRT program must end in {SUFFIX}, got {output.name}")
    lo, opt, hi = _check_options(precision, batch, min_block_size)
    ttrt = _import_torch_tensorrt()
    dev = _check_device(device, precision)
    versions = {"torch_tensorrt_version": ttrt.__version__, "tensorrt_version": tensorrt_version()}
    gpu = {"gpu_name": torch.cuda.get_device_name(dev), "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability(dev))}
    deploy = load_model(model, config=config).eval()
    key = _cache_key(deploy, precision, (lo, opt, hi), "cuda",
                     {"backend": "torch-tensorrt", "min_block_size": min_block_size, "_fold": fold, **versions, **gpu})
    cached = cache_dir() / f"torch-tensorrt-{key}{SUFFIX}"
    if cache and _from_cache(cached, output, source_record(model, config, deploy)):
        return output
    folded, fold_info = folded_body(deploy, fold)
    body = ReducedPrecision(folded, PRECISIONS[precision]).to(dev).eval()
    h, w = deploy.preprocess.size
    images, sizes = _example_inputs(deploy, lo, opt, hi, dev)
    dynamic_shapes = None
    if lo < hi:  # save re-exports the compiled graph: the batch must stay one symbol shared by both inputs
        dim = torch.export.Dim("N", min=lo, max=hi)
        dynamic_shapes = ({0: dim}, {0: dim})

    def compile_to(program: Any, tmp: Path) -> None:
        try:
            compiled = ttrt.compile(program, ir="dynamo", arg_inputs=_inputs(ttrt, lo, opt, hi, h, w), device=dev,
                                    min_block_size=min_block_size, disable_tf32=True)
            ttrt.save(compiled, str(tmp), output_format="exported_program", arg_inputs=[images, sizes],
                      dynamic_shapes=dynamic_shapes, retrace=True)
        except Exception as e:
            raise BuildError(f"Torch-TensorRT build failed: {e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0]}") from None

    # torch's archive writer expects .pt2: the program is written as one and renamed to the output
    _export_and_compile(body, (images, sizes), lo, hi, output, "program.pt2",
                        f"building TensorRT engines with Torch-TensorRT {ttrt.__version__} ({precision}); this takes minutes",
                        compile_to, progress)

    info = {**_sidecar_info(deploy, "torch-tensorrt", "cuda", precision, (lo, opt, hi), source_record(model, config, deploy)), **versions, **gpu,
            "min_block_size": min_block_size, "fold": fold_info}
    write_sidecar(output, info)
    if cache:
        _to_cache(output, cached)
    return output
