"""``bench --precision int8``: the quantizer's file on ONNX Runtime CPU, reported only through its gates."""

from __future__ import annotations

import re

import pytest

from toolkit.tasks.bench import bench


@pytest.mark.slow
def test_int8_rows_come_with_their_gates_and_fp32_of_the_same_run(tiny_model, tmp_path):
    report = bench(tiny_model, backends=("onnxruntime", "torch"), batches=(1, 2), precisions=("fp32", "int8"), warmup=1, iters=3,
                   device="cpu", workdir=tmp_path, check_images=4, progress=False)
    int8 = [r for r in report.rows if r.precision == "int8"]
    assert {(r.backend, r.batch) for r in int8} == {("onnxruntime", 1), ("onnxruntime", 2), ("torch", 1), ("torch", 2)}
    assert all(r.status == "skipped" and "onnxruntime backend only" in r.reason for r in int8 if r.backend == "torch")
    fp32 = {r.batch: r for r in report.rows if r.precision == "fp32" and r.backend == "onnxruntime"}
    assert all(r.status == "ok" for r in fp32.values())
    for r in (r for r in int8 if r.backend == "onnxruntime"):
        m = re.match(r"int8 ([\d.]+) ms vs fp32 ([\d.]+) ms in the same run \(([\d.]+)x\); (.*)", r.check)
        assert m, r.check
        gates = dict(re.findall(r"(compare|mAP|speed) (pass|FAIL|not judged)", m.group(4)))
        assert set(gates) == {"compare", "mAP", "speed"}
        # the random-weight tiny model: its mAP says nothing, so at best "not judged"; a row is ok only if no gate failed
        if "FAIL" in gates.values():
            assert r.status == "refused" and r.median_ms is None
            assert all(g in r.reason for g, v in gates.items() if v == "FAIL"), r.reason
        else:
            assert r.status == "ok" and r.median_ms == float(m.group(1)) and "pass" in gates.values()
        assert float(m.group(3)) == pytest.approx(float(m.group(2)) / float(m.group(1)), rel=0.02)
