"""ONNX Runtime CUDA speed of the fixture's INT8 (TensorRT form) against fp32, batch 1, 4 and 32, for docs/precision.md.

    PYTHONPATH=$PWD python tools/int8_cuda_speed.py [--work /tmp/int8cuda] [--rounds 50]

Exports the shipped fixture, quantizes it with ``activations="int8"`` (the symmetric Q/DQ form TensorRT needs; the CPU
speed gate does not apply: ``force``), and times both files interleaved in one process with the CUDA provider
(:func:`toolkit.tasks.quantize.measure_speed`). Prints one JSON line with the GPU, versions and medians.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8cuda"))
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    import numpy as np
    import onnxruntime as ort

    from toolkit.export.onnx import export_onnx
    from toolkit.tasks.demo import fixture_path
    from toolkit.tasks.quantize import measure_speed, quantize

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(fixture_path(), args.work / "shapes.onnx", verify=False).path
    int8 = args.work / "shapes.int8.onnx"
    quantize(fp32, int8, synthetic=64, activations="int8", eval_synthetic=50, min_speedup=None, force=True, progress=False)
    rng = np.random.default_rng(0)
    feeds = {b: {"images": rng.random((b, 3, 320, 320), dtype=np.float32), "orig_target_sizes": np.full((b, 2), 320, np.int64)}
             for b in (1, 4, 32)}
    speed = measure_speed(fp32, int8, feeds, rounds=args.rounds, warmup=5, providers=["CUDAExecutionProvider"])
    import torch

    print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "onnxruntime": ort.__version__,
                      "date": time.strftime("%Y-%m-%d"), "speed": speed}))


if __name__ == "__main__":
    main()
