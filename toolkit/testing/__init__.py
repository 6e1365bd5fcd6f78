"""Test helpers for users' CPU tests: a faithful TensorRT test double (:func:`make_fake_tensorrt`), and seeded
official-format RT-DETR weights (:mod:`toolkit.testing.official_weights`, imported on its own).

Importing this package is light; the double imports ``onnx``/``onnxruntime`` only when it parses or runs.
"""

from __future__ import annotations

from .fake_tensorrt import make_fake_tensorrt

__all__ = ["make_fake_tensorrt"]
