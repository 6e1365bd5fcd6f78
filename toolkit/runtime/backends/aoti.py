"""AOTInductor packages (``.pt2`` from ``rtdetr-deploy build --backend aoti``) behind the Engine protocol.

The sidecar (``MODEL.pt2.json``) gives the signature, class names and the device the package was
compiled for; a package is refused on any other device type (and a CUDA package on a GPU of another
compute capability) before it is loaded. Nothing is compiled at load time.

Streams (CUDA): the compiled model runs on the torch stream current on the engine's device at call
time, so outputs are valid in the order of the caller's stream, like any torch op.

Threads: the AOTInductor model container serializes concurrent calls on its runner; calls are safe.
``run_single_threaded=True`` (what ``toolkit.load(..., cuda_graph=True)`` asks for) drops that
synchronization, which CUDA stream capture refuses; such an engine must be called from one thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import EngineError
from ...integrity import check_zip
from ...numerics import tf32
from ...signature import OUTPUTS, Signature
from ..base import BaseEngine
from ..binding import BoundInputs
from ..sidecar import read_sidecar


def _check_device(path: Path, meta: dict[str, Any], device: torch.device) -> torch.device:
    built = meta.get("device")
    if built not in ("cpu", "cuda"):
        raise EngineError(f"{path}: its sidecar names no device it was built for (device={built!r}); rebuild the package")
    if device.type != built:
        what = f"CUDA ({meta.get('gpu_name', 'unknown GPU')}, compute capability {meta.get('compute_capability', '?')})" if built == "cuda" else "CPU"
        raise EngineError(f"{path} was compiled for {what} and cannot run on {device.type}: AOTInductor packages hold "
                          f"device code; load it with device='{built}' or rebuild it with "
                          f"'rtdetr-deploy build --backend aoti --device {device.type}'")
    if built == "cpu":
        return device
    if not torch.cuda.is_available():
        raise EngineError(f"{path} was compiled for CUDA but this torch sees no CUDA GPU; rebuild it with --device cpu")
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    here = "{}.{}".format(*torch.cuda.get_device_capability(device))
    if meta.get("compute_capability") not in (None, here):
        raise EngineError(f"{path} was compiled for compute capability {meta['compute_capability']} ({meta.get('gpu_name')}); "
                          f"{device} is {torch.cuda.get_device_name(device)} (compute capability {here}): rebuild it on this GPU")
    return device



def _share_libstdcxx() -> None:
    """Put the process's libstdc++ in the global symbol scope before a package's ``.so`` is loaded.

    torch loads libstdc++ privately (RTLD_LOCAL). The package's wrapper ``.so`` then keeps its own copies
    of libstdc++'s template statics (the locale facet ids), and its ``std::regex`` in ``parse_device_str``
    reads an unregistered facet: on the H100 (torch 2.11, g++ 13) every CUDA package load segfaulted,
    except in processes where another library (onnxruntime) had already made libstdc++ global.
    RTLD_NOLOAD promotes the copy already loaded and never loads a second one.
    """
    import ctypes
    import os

    if not hasattr(os, "RTLD_NOLOAD"):
        return
    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except OSError:  # not a glibc system, or a torch without libstdc++ (nothing to share)
        pass


class AotiEngine(BaseEngine):
    backend = "aoti"

    def __init__(self, path: str | Path, device: torch.device | None = None, *, tf32: bool = False,
                 run_single_threaded: bool = False, **options: Any) -> None:
        self.tf32 = tf32
        self.run_single_threaded = run_single_threaded
        path = Path(path)
        meta = read_sidecar(path)
        if meta.get("backend") != "aoti":
            raise EngineError(f"{path}: its sidecar is for backend {meta.get('backend')!r}, not an AOTInductor package")
        try:
            signature = Signature.from_dict(meta["signature"])
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path}: its sidecar has no valid signature ({e.__class__.__name__}: {e}); rebuild the package") from None
        device = _check_device(path, meta, device or torch.device(meta.get("device") or "cpu"))
        check_zip(path)  # a damaged entry must be an error here, not a crash inside AOTInductor
        _share_libstdcxx()
        if meta.get("fused_deform_attn"):  # built with --fused-deform-attn: the op's schema must exist to load it
            from ...models.deform_kernel import register

            register()
        try:
            self.runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=run_single_threaded,
                                                            device_index=device.index if device.type == "cuda" else -1)
        except Exception as e:
            raise EngineError(f"{path}: AOTInductor cannot load it ({e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0]}); "
                              f"it was built with torch {meta.get('torch_version', '?')}, this is torch {torch.__version__}. "
                              "A corrupted or truncated file, or a package from another torch, needs a rebuild") from None
        super().__init__(signature, device, class_names=meta.get("class_names"), **options)
        self.random_weights = meta.get("random_weights")
        self.path = path
        self.precision = meta.get("precision", "fp32")

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), tf32(self.tf32):  # exact fp32 unless asked: cuDNN reads the flag at run time
            out = self.runner(*(bound.tensors[spec.name] for spec in self.signature.inputs))
        return self._into_callers(dict(zip(OUTPUTS, out)), bound)

    def close(self) -> None:
        self.runner = None


def load(source: Any, device: torch.device | None = None, **options: Any) -> AotiEngine:
    return AotiEngine(source, device, **options)
