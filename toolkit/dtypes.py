"""The one dtype table: canonical names and their torch, numpy, ONNX and TensorRT spellings.

Every module converts through here, so a dtype is never guessed from a tensor that happens to arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    name: str  # canonical name used in signatures and reports
    torch: torch.dtype
    onnx: int  # onnx.TensorProto.DataType value
    ort: str  # onnxruntime type string
    trt: str | None  # tensorrt.DataType member name
    itemsize: int


# onnx.TensorProto values are fixed by the ONNX spec; hard-coding them keeps ``import toolkit`` light.
_TABLE = [
    DType("float32", torch.float32, 1, "tensor(float)", "FLOAT", 4),
    DType("float16", torch.float16, 10, "tensor(float16)", "HALF", 2),
    DType("bfloat16", torch.bfloat16, 16, "tensor(bfloat16)", "BF16", 2),
    DType("float64", torch.float64, 11, "tensor(double)", None, 8),
    DType("int64", torch.int64, 7, "tensor(int64)", "INT64", 8),
    DType("int32", torch.int32, 6, "tensor(int32)", "INT32", 4),
    DType("int8", torch.int8, 3, "tensor(int8)", "INT8", 1),
    DType("uint8", torch.uint8, 2, "tensor(uint8)", "UINT8", 1),
    DType("bool", torch.bool, 9, "tensor(bool)", "BOOL", 1),
]
_BY_NAME = {d.name: d for d in _TABLE}
_BY_TORCH = {d.torch: d for d in _TABLE}
_BY_ONNX = {d.onnx: d for d in _TABLE}
_BY_ORT = {d.ort: d for d in _TABLE}
_BY_TRT = {d.trt: d for d in _TABLE if d.trt}
_ALIASES = {"float": "float32", "half": "float16", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
            "double": "float64", "long": "int64", "int": "int32"}


def get(value: "str | torch.dtype | DType") -> DType:
    """Look a dtype up by canonical name, alias, or torch dtype."""
    if isinstance(value, DType):
        return value
    if isinstance(value, torch.dtype):
        if value not in _BY_TORCH:
            raise ValueError(f"unsupported torch dtype {value}")
        return _BY_TORCH[value]
    name = _ALIASES.get(str(value).removeprefix("torch."), str(value).removeprefix("torch."))
    if name not in _BY_NAME:
        raise ValueError(f"unknown dtype {value!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def from_onnx(elem_type: int) -> DType:
    if elem_type not in _BY_ONNX:
        raise ValueError(f"unsupported ONNX element type {elem_type}")
    return _BY_ONNX[elem_type]


def from_ort(type_string: str) -> DType:
    if type_string not in _BY_ORT:
        raise ValueError(f"unsupported onnxruntime type {type_string}")
    return _BY_ORT[type_string]


def from_trt(datatype: object) -> DType:
    """From a ``tensorrt.DataType`` member (or anything whose ``name`` is a member name)."""
    name = getattr(datatype, "name", str(datatype).rsplit(".", 1)[-1])
    if name not in _BY_TRT:
        raise ValueError(f"unsupported TensorRT dtype {name}")
    return _BY_TRT[name]
