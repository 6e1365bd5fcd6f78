"""Build an AOTInductor package (``.pt2``) from a model: ``torch.export`` then ``aoti_compile_and_package``.

AOTInductor compiles from the torch model, not from ONNX: :func:`build_aoti` takes anything
:func:`toolkit.models.loading.load_model` accepts. The package has a dynamic batch in ``[min, max]`` (one
package serves every batch size of the range) and a sidecar ``MODEL.pt2.json`` that records what
:mod:`toolkit.runtime.backends.aoti` needs to run or refuse it: device type (and GPU, compute capability),
precision, batch range, the deploy signature and the class names.

Dynamic batch: two spots of transformers' RT-DETR / D-FINE forward pin the symbolic batch to the example's
size under ``torch.export`` ("Constraints violated (N)"): ``batch_size = len(source_flatten)`` (``len()``
of a tensor must return a Python int) and, on CUDA only, the downsampling of the unused pixel mask
with the batch in the channel dim (the upsample's ``n_channels < 4`` heuristic guards it); D-FINE and
DEIMv2 also need transformers' torch checks off. Each family's patches live with the family
(:mod:`toolkit.models.families`); :func:`_dynamic_batch_patches` applies them for the duration of the
export only, without changing any value the model computes.

``fold`` (default): the package is compiled from a copy with BatchNorm folded into the convolutions and the
position embedding precomputed (:func:`toolkit.models.fold.fold_model`, proved equal in fp32 first); the
sidecar's ``fold`` records what was folded (``"off"`` without).

``precision="fp16"`` puts the network body in half precision (half weights, not autocast casts); the deploy postprocess (sigmoid, top-K,
box scaling) stays fp32 since :func:`toolkit.models.contract.postprocess` casts logits and boxes to float.
I/O is fp32 images / int64 sizes either way.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..atomic import check_output_path
from ..errors import ExportError
from ..models.contract import PRECISIONS, DeployModel, ReducedPrecision
from ..models.families import family_of, symbolic_len
from ..models.fold import FoldError, fold_model
from ..models.loading import load_model
from ..models.weights import weights_sha256
from ..numerics import tf32
from ..progress import Steps
from ..runtime.sidecar import sidecar_path, write_sidecar
from ..signature import CONTRACT_VERSION
from .build import BuildError, _copy, cache_dir

DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def _dynamic_batch_patches(model: nn.Module) -> Iterator[None]:
    """Keep the batch symbolic through the detector's forward, for the duration of an export only.

    Each transformers detector inside ``model`` gets its family's patches (:meth:`toolkit.models.families.Family.
    export_patches`: the ``len`` shadow, the batch-first pixel mask where the backbone wrapper takes one,
    transformers' torch checks off where Inductor needs it); any other module gets the ``len`` shadow only.
    """
    detectors, prefixes = [], []  # outermost detectors only (their submodules carry the same config)
    for name, m in model.named_modules():
        if family_of(m) is not None and not any(name == p or name.startswith(p + ".") for p in prefixes):
            detectors.append(m)
            prefixes.append(name)
    with contextlib.ExitStack() as stack:
        for m in detectors:
            stack.enter_context(family_of(m).export_patches(m))
        if not detectors:
            stack.enter_context(symbolic_len(model))
        yield


def _check_options(precision: str, batch: tuple[int, int, int], device: str) -> tuple[int, int, int]:
    if precision not in PRECISIONS:
        raise BuildError(f"precision must be one of {', '.join(PRECISIONS)} for AOTInductor, got {precision!r}")
    if device not in DEVICES:
        raise BuildError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BuildError("device='cuda' needs a CUDA GPU and a CUDA build of torch; none is available here (build with device='cpu')")
    if device == "cpu" and precision != "fp32":
        raise BuildError(f"{precision} AOTInductor packages are built for CUDA only; use precision='fp32' for a CPU package")
    return _check_batch(batch)


def _check_batch(batch: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(b) for b in batch)
    except (TypeError, ValueError):
        raise BuildError(f"batch must be (min, opt, max), got {batch!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise BuildError(f"batch must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")
    return lo, opt, hi


def _export(module: nn.Module, example: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int) -> Any:
    """``torch.export`` with a dynamic batch in [lo, hi] (static when lo == hi)."""
    dynamic_shapes = None
    if lo < hi:
        n = torch.export.Dim("N", min=lo, max=hi)
        dynamic_shapes = {"images": {0: n}, "orig_target_sizes": {0: n}}
    try:
        with _dynamic_batch_patches(module), torch.no_grad():
            return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise ExportError(f"torch.export failed: {e.__class__.__name__}: {str(e).strip().splitlines()[0]}") from None


def _export_and_compile(body: nn.Module, example: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int, output: Path,
                        tmp_name: str, compiling: str, compile_to: Callable[[Any, Path], None], progress: bool) -> None:
    """Export ``body`` (dynamic batch in [lo, hi]), then ``compile_to(program, tmp)`` into a temporary folder beside
    ``output``; ``tmp`` is renamed to ``output`` only once complete, so a failed build leaves nothing behind.
    ``compiling``: the progress message while ``compile_to`` runs (``tmp_name``: the name it expects to write)."""
    steps = Steps("build", enabled=progress)  # lines with elapsed time, also in logs (a spinner needs a terminal)
    tmpdir = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        with steps.step("exporting with torch.export"):
            program = _export(body, example, lo, hi)
        tmp = tmpdir / tmp_name
        with steps.step(compiling):
            compile_to(program, tmp)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


CUDA_INDUCTOR_DEFAULTS: dict[str, Any] = {"freezing": True, "force_layout_optimization": True}
"""Inductor options every CUDA package gets unless the caller overrides them (``freezing=0``), chosen by
measurement (H100, R50 fp16 + CUDA graph, docs/benchmarks.md): ``force_layout_optimization`` keeps the
convolutions channels_last although the batch is dynamic (Inductor turns that off for symbolic sizes, and
cuDNN then transposes around every convolution), ``freezing`` folds the weights as constants. Together:
batch 32 from 1085 to 1311 img/s, batch 1 from 2.35 to 2.09 ms, fixture mAP 0.8335 against 0.8340."""


TUNE_INDUCTOR_CONFIGS: dict[str, Any] = {"max_autotune": True, "coordinate_descent_tuning": True}
"""``build --tune``: Inductor benchmarks its GEMM/convolution templates and tunes its Triton kernels at build time
(minutes, in parallel compile workers); the package cache and Inductor's own cache keep the result. Load time and
results are unaffected. Not a default because it did not pay for R50 fp16 on an H100: its convolution choices
made the whole model 8% slower at batch 1 and 3% at batch 32 (docs/benchmarks.md, run E)."""


def build_aoti(
    model: Any,
    output: str | Path,
    *,
    precision: str = "fp32",
    batch: tuple[int, int, int] = (1, 1, 8),
    device: str = "cpu",
    progress: bool = True,
    config: str | None = None,
    inductor_configs: dict[str, Any] | None = None,
    cache: bool = True,
    fold: bool = True,
    fused_deform_attn: bool = False,
) -> Path:
    """Compile ``model`` to an AOTInductor package at ``output`` (``.pt2``) plus its sidecar; returns the path.

    ``cache``: reuse a package built before from the same weights, options, torch version and GPU
    (the engine cache of :func:`toolkit.builders.build.cache_dir`); compiles take minutes, a hit takes a copy.

    ``model``: anything :func:`toolkit.models.loading.load_model` accepts (``config`` for a weights file).
    ``batch``: (min, opt, max) of the dynamic batch; the package runs any batch in [min, max].
    ``device``: "cpu" or "cuda" (a CUDA package runs only on CUDA GPUs of the compute capability it was
    built on). ``inductor_configs``: extra ``torch._inductor`` options for the compile (e.g.
    ``{"max_autotune": True}`` on CUDA), over :data:`CUDA_INDUCTOR_DEFAULTS` on CUDA; they cost build time
    only, never load time, and the sidecar records them. ``fold``: fold BatchNorm and precompute constants
    first (see the module docstring). ``fused_deform_attn`` (CUDA only; also accepted as the option
    ``fused_deform_attn=1`` among ``inductor_configs``, which is how ``bench --aoti-config`` passes it): the
    multi-scale deformable attention as the fused Triton kernel of :mod:`toolkit.models.deform_kernel`.
    """
    output = check_output_path(output)
    if output.suffix != ".pt2":
        raise BuildError(f"an AOTInductor package must end in .pt2, got {output.name}")
    lo, opt, hi = _check_options(precision, batch, device)
    deploy = load_model(model, config=config).eval()
    inductor = {**(CUDA_INDUCTOR_DEFAULTS if device == "cuda" else {}), **(inductor_configs or {})}
    fused_deform_attn = bool(int(inductor.pop("fused_deform_attn", 0))) or fused_deform_attn  # a toolkit option
    if fused_deform_attn and device != "cuda":
        raise BuildError("--fused-deform-attn compiles a Triton kernel: it needs --device cuda")
    key = {**inductor, "_fold": fold, **({"_fused_deform_attn": True} if fused_deform_attn else {})}
    cached = cache_dir() / f"aoti-{_cache_key(deploy, precision, (lo, opt, hi), device, key)}.pt2"
    if cache and _from_cache(cached, output, source_record(model, config, deploy)):
        return output
    folded, fold_info = folded_body(deploy, fold)
    body = ReducedPrecision(folded, PRECISIONS[precision]).to(device).eval()
    images, sizes = _example_inputs(deploy, lo, opt, hi, device)

    def compile_to(program: Any, tmp: Path) -> None:
        try:
            with tf32(False):  # kernels chosen for exact fp32, as the eager reference computes
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                         inductor_configs=dict(inductor))  # it adds keys
        except Exception as e:
            raise BuildError(f"AOTInductor compile failed: {e.__class__.__name__}: {str(e).strip().splitlines()[0]}") from None

    fused = 0
    with contextlib.ExitStack() as stack:
        if fused_deform_attn:
            from ..models.deform_kernel import fused_deformable_attention

            fused = stack.enter_context(fused_deformable_attention(body))
            if not fused:
                raise BuildError("--fused-deform-attn: this model has no multi-scale deformable attention module to fuse "
                                 "(D-FINE and DEIMv2 sample with their own formula)")
        _export_and_compile(body, (images, sizes), lo, hi, output, output.name,
                            f"compiling with AOTInductor for {device} ({precision}); this takes minutes on CPU", compile_to,
                            progress)

    info = _sidecar_info(deploy, "aoti", device, precision, (lo, opt, hi), source_record(model, config, deploy))
    info["inductor_configs"] = inductor
    info["fold"] = fold_info
    if fused:
        info["fused_deform_attn"] = fused  # modules running rtdetr::ms_deform_attn
    if device == "cuda":
        index = torch.device(device).index or torch.cuda.current_device()
        info["gpu_name"] = torch.cuda.get_device_name(index)
        info["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(index))
    write_sidecar(output, info)
    if cache:
        _to_cache(output, cached)
    return output


def folded_body(deploy: DeployModel, fold: bool) -> tuple[DeployModel, Any]:
    """A copy of ``deploy`` to compile, folded when ``fold``, and what the sidecar records about it."""
    if not fold:
        return copy.deepcopy(deploy), "off"
    try:
        folded, report = fold_model(deploy)
    except FoldError as e:
        raise BuildError(f"folding the model for the build failed: {e}") from None
    return folded, report.to_dict()


def _from_cache(cached: Path, output: Path, source: dict[str, Any] | None = None) -> bool:
    """Copy a cached build and its sidecar to ``output``; False when there is none. ``source``: this build's
    :func:`source_record` (the same weights may have come from another checkpoint or config before)."""
    if not (cached.is_file() and sidecar_path(cached).is_file()):
        return False
    _copy(cached, output)
    _copy(sidecar_path(cached), sidecar_path(output))
    if source is not None:
        from ..runtime.sidecar import read_sidecar

        write_sidecar(output, {**read_sidecar(output), "model_source": source})
    return True


def source_record(model: Any, config: str | None, deploy: DeployModel) -> dict[str, Any]:
    """What a model-compiled package records about the model it was compiled from: the checkpoint path or config
    name (as an ONNX export records them; nothing for an in-memory module, unless it was rebuilt from a file's record)
    and the weights' sha256, so ``bench`` can rebuild its peers from the same weights and check they are the same."""
    from ..export.onnx import _source_metadata

    if isinstance(model, nn.Module):
        origin = dict(getattr(deploy, "source_metadata", None) or {})
    else:
        origin = _source_metadata(model, config)
    return {**origin, "weights_sha256": weights_sha256(deploy)}


def _to_cache(output: Path, cached: Path) -> None:
    cached.parent.mkdir(parents=True, exist_ok=True)
    _copy(output, cached)
    _copy(sidecar_path(output), sidecar_path(cached))


def _example_inputs(deploy: DeployModel, lo: int, opt: int, hi: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Export's example batch: never 1 when the batch is dynamic (export would specialize it)."""
    h, w = deploy.preprocess.size
    n = min(max(opt, 2), hi) if lo < hi else lo
    images = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    return images, torch.tensor([[w, h]] * n, dtype=torch.int64, device=device)


def _sidecar_info(deploy: DeployModel, backend: str, device: str, precision: str, batch: tuple[int, int, int],
                  source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every model-compiled artifact's sidecar records (the backend adds its library and GPU facts);
    ``source``: :func:`source_record`."""
    from .. import __version__

    lo, opt, hi = batch
    return {"backend": backend, "toolkit_version": __version__, "torch_version": torch.__version__,
            "contract_version": CONTRACT_VERSION, "device": device, "precision": precision,
            "batch": {"min": lo, "opt": opt, "max": hi}, "dynamic_batch": lo < hi, "config_name": deploy.name,
            "signature": deploy.signature().with_bounds(N=(lo, hi)).to_dict(), "class_names": deploy.class_names,
            "random_weights": getattr(deploy, "random_weights", None),  # set when the weights are generated, untrained
            "model_source": source or {"weights_sha256": weights_sha256(deploy)}}


def _cache_key(deploy: DeployModel, precision: str, batch: tuple[int, int, int], device: str, inductor: dict[str, Any]) -> str:
    """Weights, contract, options, torch/toolkit versions and GPU: what makes a package different."""
    import hashlib
    import json

    from .. import __version__

    h = hashlib.sha256(weights_sha256(deploy).encode())
    gpu = "{}.{}".format(*torch.cuda.get_device_capability()) if device == "cuda" and torch.cuda.is_available() else ""
    h.update(json.dumps([deploy.signature().to_dict(), deploy.class_names, precision, batch, device, gpu, inductor,
                         torch.__version__, __version__], sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]
