"""Serving on NVIDIA Triton Inference Server: ``toolkit.serve(model)``, ``export_triton``, and the served-model bench.

May import: every stage package (it sits after :mod:`toolkit.tasks`) and the top-level helpers. ``serve`` writes a
python-backend model repository and runs Triton's own ``tritonserver`` on it; ``export_triton`` writes
repositories for users' servers (onnxruntime, tensorrt, python); remote engines (``toolkit.load("grpc://...")``)
live in :mod:`toolkit.runtime.backends.triton`. Needs the ``serve`` extra (nvidia-pytriton, tritonclient).

The package is callable, so ``toolkit.serve(model, ...)`` is :func:`toolkit.serve.serve.serve` whether or not the
package has been imported already (a package attribute named like the package would be shadowed by it).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .repository import export_triton
from .serve import Server, serve

__all__ = ["serve", "Server", "export_triton"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Server:
        return serve(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
