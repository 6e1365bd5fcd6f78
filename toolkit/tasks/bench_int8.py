"""``bench --precision int8``: rows for the toolkit's INT8 file on ONNX Runtime, reported only through its gates.

The INT8 file is what ``rtdetr-deploy quantize`` writes from the fp32 export bench already made (synthetic
calibration, :func:`toolkit.tasks.quantize.quantize`), and its rows carry that run's figures: the speed is the
quantizer's speed gate (fp32 and INT8 interleaved in one process on ONNX Runtime CPU, medians at each of bench's
batch sizes: the fp32 figure of the same run is in the row's ``check``), the accuracy is its compare and mAP gates.
A row whose file fails a gate has status ``refused`` and says which gate; no timing is reported as a result then.
Only the onnxruntime backend gets INT8 rows, and only on the CPU (the gates are CPU gates; the ONNX Runtime CUDA
ratio: ``tools/int8_cuda_speed.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

INT8_CALIBRATION_IMAGES = 32


def int8_rows(fp32_onnx: Callable[[], Path], backends: Sequence[str], batches: Sequence[int], device: Any, workdir: Path,
              iters: int, check_images: int, row_type: Any, progress: bool = False) -> list[Any]:
    """BenchRows (``row_type``) for ``precision="int8"``; ``fp32_onnx()`` gives the fp32 export (built on first use)."""
    from ..errors import ToolkitError
    from .quantize import quantize

    def rows(status: str, reason: str, backend: str = "onnxruntime", **kw: Any) -> list[Any]:
        return [row_type(backend, "int8", False, b, str(device), status=status, reason=reason, **kw) for b in batches]

    out = []
    for backend in backends:
        if backend != "onnxruntime":
            out += rows("skipped", "int8 rows come from the toolkit's quantizer (Q/DQ ONNX) on the onnxruntime backend only", backend)
    if "onnxruntime" not in backends:
        return out
    if getattr(device, "type", str(device)) != "cpu":
        return out + rows("skipped", "int8 rows are measured on ONNX Runtime CPU, where the quantizer's gates run "
                                     "(ONNX Runtime CUDA: python tools/int8_cuda_speed.py)")
    target = Path(workdir) / "model.int8.onnx"
    try:
        report = quantize(fp32_onnx(), target, synthetic=INT8_CALIBRATION_IMAGES, eval_synthetic=max(check_images, 8),
                          min_speedup=1.0, speed_batches=tuple(batches), speed_rounds=max(iters, 3), force=True,
                          progress=progress, auto_islands=False)
    except ToolkitError as e:
        return out + rows("failed", f"quantize failed: {str(e).splitlines()[0]}")
    gates = "; ".join(f"{g.name} {'pass' if g.passed else 'FAIL' if g.passed is False else 'not judged'} ({g.detail})"
                      for g in report.gates)
    failed = [g.name for g in report.failed()] or ([] if report.ok else ["no gate could be judged"])
    for b in batches:
        s = report.speed.get(str(b), {})
        check = f"int8 {s.get('int8_ms')} ms vs fp32 {s.get('fp32_ms')} ms in the same run ({s.get('speedup')}x); {gates}"
        if failed:
            out.append(row_type("onnxruntime", "int8", False, b, str(device), status="refused",
                                reason=f"INT8 file failed its gates: {', '.join(failed)}", check=check))
            continue
        ms = s["int8_ms"]
        out.append(row_type("onnxruntime", "int8", False, b, str(device), median_ms=ms, images_per_s=round(1000.0 * b / ms, 2),
                            check=check))
    return out
