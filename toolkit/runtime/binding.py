"""The binder: every tensor is checked against the engine's signature before anything is bound.

One piece shared by every backend, so the zero-coordinate bug (an int64 ``orig_target_sizes`` read as
int32 by the engine) cannot happen anywhere: a tensor is either converted losslessly to exactly what
the engine declares, or refused with a :class:`~toolkit.errors.BindingError` that names the tensor,
what the engine expects, what came, and the fix.

Cast policies:
  * ``"safe"`` (default): lossless conversions only. Integer -> integer after checking every value fits;
    integer -> float when every value is exactly representable; float widening (fp16/bf16 -> fp32).
  * ``"none"``: any dtype mismatch is refused.
  * ``"unsafe"``: any conversion ``Tensor.to`` performs (e.g. fp32 -> fp16 for an fp16-I/O engine).

Value checks (``check_values=True``, the default) refuse NaN/Inf in float inputs, ``images`` far
outside the model's declared value range (0-255 pixels fed to a [0,1] model) and ``orig_target_sizes``
that are not positive (they would give negative boxes). ``orig_target_sizes`` in uint8/int8/bool are
always refused: image sizes do not fit them, so the values came wrapped. They read the tensor's
min/max, which synchronizes a CUDA stream; pass ``check_values=False`` on latency-critical paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .. import dtypes
from ..errors import BindingError
from ..signature import INPUT_IMAGES, INPUT_SIZES, Signature, TensorSpec

CAST_POLICIES = ("safe", "none", "unsafe")
_FLOAT_WIDENING = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                   (torch.bfloat16, torch.float64), (torch.float32, torch.float64)}
_EXACT_INT_IN_FLOAT = {torch.float16: 2**11, torch.bfloat16: 2**8, torch.float32: 2**24, torch.float64: 2**53}


def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(str(d) for d in t.shape) + "]"


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@dataclass
class BoundInputs:
    """Inputs ready to bind (exact dtype, device, contiguous) and the value of each symbolic dim."""

    tensors: dict[str, torch.Tensor]
    dims: dict[str, int]
    outputs: dict[str, torch.Tensor] | None = None  # caller-provided output buffers, already checked


class Binder:
    """Checks and converts user tensors for one engine signature on one device."""

    def __init__(
        self,
        signature: Signature,
        device: torch.device | str,
        *,
        cast: str = "safe",
        copy_to_device: bool = False,
        check_values: bool = True,
    ) -> None:
        if cast not in CAST_POLICIES:
            raise ValueError(f"cast must be one of {CAST_POLICIES}, got {cast!r}")
        self.signature = signature
        self.device = torch.device(device)
        self.cast = cast
        self.copy_to_device = copy_to_device
        self.check_values = check_values

    def bind(self, feeds: Mapping[str, Any]) -> BoundInputs:
        names = set(self.signature.input_names)
        missing = [n for n in self.signature.input_names if n not in feeds]
        extra = sorted(set(feeds) - names)
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(f"{n} ({self.signature.input(n).describe()})" for n in missing))
            if extra:
                parts.append("unexpected " + ", ".join(extra))
            raise BindingError(f"inputs do not match the engine: {'; '.join(parts)}. The engine's inputs are "
                               + ", ".join(f"{t.name} {t.describe()}" for t in self.signature.inputs))
        dims: dict[str, int] = {}
        tensors = {spec.name: self._bind_one(spec, feeds[spec.name], dims) for spec in self.signature.inputs}
        return BoundInputs(tensors, dims)

    def check_outputs(self, outputs: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Caller-provided output buffers must be exactly what the engine writes: no conversion is possible."""
        if set(outputs) != set(self.signature.output_names):
            raise BindingError(f"outputs= must name exactly {', '.join(self.signature.output_names)}; got {', '.join(sorted(outputs))}")
        for spec in self.signature.outputs:
            t = outputs[spec.name]
            shape = resolve_shape(spec, dims)
            want = dtypes.get(spec.dtype).torch
            if t.dtype != want or (shape is not None and tuple(t.shape) != shape) or not self._on_device(t.device) or not t.is_contiguous():
                raise BindingError(f"output {spec.name}: engine writes {spec.dtype} {list(shape) if shape else spec.shape} on {self.device} "
                                   f"(contiguous), got {_dt(t.dtype)} {_shape(t)} on {t.device}"
                                   + ("" if t.is_contiguous() else " (not contiguous)") + "; allocate it with torch.empty(shape, dtype=..., device=...)")
        return dict(outputs)

    def _expect(self, spec: TensorSpec, t: torch.Tensor) -> str:
        return f"{spec.name}: engine expects {spec.describe()} on {self.device}, got {_dt(t.dtype)} {_shape(t)} on {t.device}"

    def _bind_one(self, spec: TensorSpec, value: Any, dims: dict[str, int]) -> torch.Tensor:
        t = self._as_tensor(spec, value)
        self._check_shape(spec, t, dims)
        if spec.name == INPUT_SIZES:
            self._check_sizes_dtype(spec, t)
        t = self._check_device(spec, t)
        t = self._convert_dtype(spec, t)
        if self.check_values and t.is_floating_point() and t.numel():
            self._check_values(spec, t)
        if self.check_values and spec.name == INPUT_SIZES and t.numel():
            low = t.min().item()
            if low <= 0:
                raise BindingError(f"{spec.name}: image sizes must be positive (w, h) in pixels, got a value of {low}; "
                                   "pass the original image sizes (toolkit.preprocess returns them)")
        return t.contiguous()

    def _check_sizes_dtype(self, spec: TensorSpec, t: torch.Tensor) -> None:
        """Image sizes in a type too narrow for them were already wrapped by the caller (640 as uint8 is 128):
        converting them would hide that, so they are refused whatever the engine declares."""
        if t.dtype in (torch.uint8, torch.int8, torch.bool):
            raise BindingError(f"{self._expect(spec, t)}: {_dt(t.dtype)} cannot hold image sizes (640 as uint8 is 128), so "
                               f"these values may already be wrapped; build them with torch.tensor([[w, h]], dtype=torch.{spec.dtype})")

    def _as_tensor(self, spec: TensorSpec, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
            return torch.from_numpy(value)
        raise BindingError(f"{spec.name}: engine expects a torch tensor {spec.describe()}, got {type(value).__name__}; "
                           f"pass torch.tensor(..., dtype=torch.{spec.dtype})")

    def _check_shape(self, spec: TensorSpec, t: torch.Tensor, dims: dict[str, int]) -> None:
        if t.ndim != len(spec.shape):
            hint = "; add the batch dim with .unsqueeze(0)" if t.ndim == len(spec.shape) - 1 else ""
            raise BindingError(f"{self._expect(spec, t)}: rank {t.ndim} instead of {len(spec.shape)}{hint}")
        for axis, (want, got) in enumerate(zip(spec.shape, t.shape)):
            if isinstance(want, int) and want >= 0:
                if got != want:
                    raise BindingError(f"{self._expect(spec, t)}: dim {axis} is {got}, the engine fixes it at {want}"
                                       + ("; resize with toolkit.preprocess" if spec.name == INPUT_IMAGES else ""))
                continue
            if want in dims and dims[want] != got:
                raise BindingError(f"{self._expect(spec, t)}: dim {axis} ({want}) is {got} but another input set {want}={dims[want]}; "
                                   "every input needs the same batch size")
            lo, hi = self.signature.bounds(str(want))
            if got < lo or (hi is not None and got > hi):
                raise BindingError(f"{self._expect(spec, t)}: dim {axis} ({want}) is {got}, outside the engine's range "
                                   f"[{lo}, {hi}]; split the batch or rebuild the engine with a larger profile")
            dims[str(want)] = got

    def _on_device(self, device: torch.device) -> bool:
        return device.type == self.device.type and (self.device.index is None or device.index in (None, self.device.index))

    def _check_device(self, spec: TensorSpec, t: torch.Tensor) -> torch.Tensor:
        if self._on_device(t.device):
            return t
        if self.copy_to_device:
            return t.to(self.device)
        raise BindingError(f"{self._expect(spec, t)}: wrong device; move it with .to('{self.device}') "
                           "or load the engine with copy_to_device=True")

    def _convert_dtype(self, spec: TensorSpec, t: torch.Tensor) -> torch.Tensor:
        want = dtypes.get(spec.dtype).torch
        if t.dtype == want:
            return t
        fix = f"pass dtype=torch.{spec.dtype}"
        if spec.name == INPUT_IMAGES and t.dtype == torch.uint8:
            raise BindingError(f"{self._expect(spec, t)}: uint8 pixels are not the model's input; "
                               "use toolkit.preprocess(images, spec) to resize and scale them to float32")
        if self.cast == "none":
            raise BindingError(f"{self._expect(spec, t)}; {fix} or use cast=\"safe\"")
        if self.cast == "unsafe" or (t.dtype, want) in _FLOAT_WIDENING:
            return t.to(want)
        if not t.is_floating_point() and t.dtype != torch.bool:
            lo, hi = (t.min().item(), t.max().item()) if t.numel() else (0, 0)
            if want.is_floating_point:
                limit = _EXACT_INT_IN_FLOAT[want]
                if -limit <= lo and hi <= limit:
                    return t.to(want)
                raise BindingError(f"{self._expect(spec, t)}: values in [{lo}, {hi}] are not exact in {spec.dtype}; {fix}")
            if want != torch.bool:
                info = torch.iinfo(want)
                if info.min <= lo and hi <= info.max:
                    return t.to(want)
                raise BindingError(f"{self._expect(spec, t)}: values in [{lo}, {hi}] do not fit {spec.dtype}; "
                                   f"{fix} after checking the values, or rebuild the engine with {_dt(t.dtype)} I/O")
        raise BindingError(f"{self._expect(spec, t)}: {_dt(t.dtype)} -> {spec.dtype} is not lossless; {fix} "
                           "(or use cast=\"unsafe\" to accept the rounding)")

    def _check_values(self, spec: TensorSpec, t: torch.Tensor) -> None:
        lo, hi = torch.aminmax(t.detach().float())
        lo, hi = lo.item(), hi.item()
        if not (torch.isfinite(torch.tensor([lo, hi])).all()) or lo != lo or hi != hi:
            raise BindingError(f"{spec.name}: contains NaN or Inf values; check the preprocessing (or pass check_values=False)")
        pre = self.signature.preprocess
        if spec.name == INPUT_IMAGES and pre is not None:
            a, b = pre.value_range
            margin = 0.5 * (b - a)
            if hi > b + margin or lo < a - margin:
                raise BindingError(f"{spec.name}: values in [{lo:.3g}, {hi:.3g}] but the model expects [{a:g}, {b:g}]"
                                   + ("; these look like 0-255 pixels: divide by 255 or use toolkit.preprocess" if hi > 2 and b <= 1 else "")
                                   + " (or pass check_values=False)")


def resolve_shape(spec: TensorSpec, dims: Mapping[str, int]) -> tuple[int, ...] | None:
    """The concrete shape of ``spec`` given symbol values; None when a symbol is unknown (data-dependent)."""
    out = []
    for d in spec.shape:
        if isinstance(d, int) and d >= 0:
            out.append(d)
        elif str(d) in dims:
            out.append(dims[str(d)])
        else:
            return None
    return tuple(out)


def allocate_outputs(signature: Signature, dims: Mapping[str, int], device: torch.device) -> dict[str, torch.Tensor] | None:
    """torch-owned output buffers with the engine's dtypes and resolved shapes (None if any shape is unknown)."""
    out = {}
    for spec in signature.outputs:
        shape = resolve_shape(spec, dims)
        if shape is None:
            return None
        out[spec.name] = torch.empty(shape, dtype=dtypes.get(spec.dtype).torch, device=device)
    return out
