"""ModelOpt ONNX PTQ INT8 against the toolkit's recipe on the shapes fixture (ONNX Runtime CPU), for docs/precision.md.

    pip install --target /tmp/modelopt --no-deps nvidia-modelopt==0.47.0 onnx-graphsurgeon polygraphy onnxslim \
        lief cppimport onnxscript requests pulp ml_dtypes
    PYTHONPATH=$PWD:/tmp/modelopt python tools/modelopt_compare.py --work /tmp/mo [--eval 200]

Both INT8 files start from the same prepared graph (the fp32 export after ONNX Runtime's basic optimizations,
:func:`toolkit.export.quantize.prepare_graph`) and the same 64 calibration images (the toolkit's calibration seed,
preprocessed by the model's own preprocessing). ModelOpt keeps everything it does not quantize in fp32
(``high_precision_dtype="fp32"``) so that the comparison is INT8 against INT8, not INT8+fp16. Then the same gates
as ``rtdetr-deploy quantize``: detection-aware compare and COCO mAP on evaluation images disjoint from the
calibration set, and speed with fp32 and both INT8 files interleaved in one process. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/modelopt-compare"))
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from toolkit.checks.compare import compare
    from toolkit.data.shapes import write_split
    from toolkit.export.calibration import feeds_from_batches
    from toolkit.export.onnx import export_onnx
    from toolkit.export.quantize import _copy_metadata, _save_sealed, fused_ops, prepare_graph, quantize_graph
    from toolkit.runtime.engine import load
    from toolkit.runtime.preprocessing import engine_preprocess, preprocess
    from toolkit.tasks.demo import fixture_path
    from toolkit.tasks.evaluate import SYNTHETIC_SEED, evaluate
    from toolkit.tasks.quantize import CALIBRATION_SEED, INT8_THRESHOLDS, _compare_gate

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fp32_path = work / "shapes.onnx"
    if not fp32_path.exists():
        export_onnx(fixture_path(), fp32_path, verify=False)
    fp32 = load(fp32_path, backend="onnxruntime", device="cpu")
    spec = engine_preprocess(fp32)
    write_split(work / "calib", "train", args.calib, seed=CALIBRATION_SEED, size=spec.size[0])
    paths = sorted((work / "calib" / "train").glob("*.png"))
    batches = [preprocess(paths[i:i + 4], spec, torch.int64) for i in range(0, len(paths), 4)]
    feeds = feeds_from_batches(batches)
    prepared = prepare_graph(onnx.load(str(fp32_path)))
    prepared_path = work / "shapes.prepared.onnx"
    onnx.save(prepared, str(prepared_path))

    toolkit_path = work / "shapes.int8.toolkit.onnx"
    t = time.time()
    quantize_graph(fp32_path, toolkit_path, feeds, progress=False)
    toolkit_s = time.time() - t

    import modelopt
    from modelopt.onnx.quantization import quantize as mo_quantize

    mo_path = work / "shapes.int8.modelopt.onnx"
    calib = {"images": np.concatenate([f["images"] for f in feeds]),
             "orig_target_sizes": np.concatenate([f["orig_target_sizes"] for f in feeds])}
    t = time.time()
    mo_quantize(str(prepared_path), quantize_mode="int8", calibration_data=calib, calibration_eps=["cpu"],
                output_path=str(mo_path), high_precision_dtype="fp32", log_level="WARNING")
    mo_s = time.time() - t
    mo = onnx.load(str(mo_path))  # the fp32 file's metadata (preprocessing, class names) so the toolkit can load it
    _copy_metadata(prepared, mo, {"precision": "int8", "quantization": json.dumps({"tool": f"modelopt {modelopt.__version__}"})})
    meta_keys = [p.key for p in mo.metadata_props]
    _save_sealed(mo, mo_path)

    ann = write_split(work / "eval", "val", args.eval, seed=SYNTHETIC_SEED, size=spec.size[0])
    eval_paths = sorted((work / "eval" / "val").glob("*.png"))
    engines = {"fp32": fp32, "toolkit": load(toolkit_path, backend="onnxruntime", device="cpu"),
               "modelopt": load(mo_path, backend="onnxruntime", device="cpu")}
    ev = evaluate(engines, data_dir=ann)
    rows: dict[str, dict] = {}
    for name in ("toolkit", "modelopt"):
        gate = _compare_gate(compare(fp32, engines[name], eval_paths, thresholds=INT8_THRESHOLDS))
        rows[name] = {"mAP": round(ev.row(name).mAP, 4), "compare": gate.detail, "compare_pass": gate.passed,
                      "fused": fused_ops(toolkit_path if name == "toolkit" else mo_path),
                      "qdq_pairs": sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(toolkit_path if name == "toolkit" else mo_path)).graph.node)}
    rows["toolkit"]["quantize_s"], rows["modelopt"]["quantize_s"] = round(toolkit_s, 1), round(mo_s, 1)

    def session(p: Path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    sessions = {"fp32": session(fp32_path), "toolkit": session(toolkit_path), "modelopt": session(mo_path)}
    imgs = np.concatenate([f["images"] for f in feeds])
    speed: dict[str, dict[str, float]] = {}
    for b in (1, 4):
        feed = {"images": imgs[:b], "orig_target_sizes": np.full((b, 2), spec.size[0], np.int64)}
        times = {k: [] for k in sessions}
        for _ in range(2):
            for s in sessions.values():
                s.run(None, feed)
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        med = {k: 1000 * float(np.median(v)) for k, v in times.items()}
        speed[f"b{b}"] = {**{f"{k}_ms": round(v, 1) for k, v in med.items()},
                          **{f"{k}_speedup": round(med["fp32"] / med[k], 3) for k in ("toolkit", "modelopt")}}
    print(json.dumps({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                      "onnxruntime": ort.__version__, "onnx": onnx.__version__, "modelopt": modelopt.__version__,
                      "date": time.strftime("%Y-%m-%d"), "fp32_mAP": round(ev.row("fp32").mAP, 4), "rows": rows,
                      "speed": speed, "modelopt_meta": meta_keys, "seconds": round(time.time() - t0)}, indent=1))


if __name__ == "__main__":
    main()
