"""Compare-driven fp32 islands: the bounded search finds a planted precision failure that is not an overflow."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from toolkit.checks.island_search import repair_fp16, search
from toolkit.export.islands import fp16_emulation


def test_search_finds_the_needed_nodes_and_respects_its_budget():
    """A stand-in compare that agrees exactly when both culprits are kept fp32 (the reference: set inclusion)."""
    order = [f"/m/layer{i // 4}/op{i % 4}" for i in range(40)]
    culprits = {"/m/layer5/op2", "/m/layer5/op3"}
    calls = []

    def agrees(nodes):
        calls.append(list(nodes))
        return culprits <= set(nodes)

    found, evals, reason = search(order, "/m/layer5/op3", agrees, max_evals=24)
    assert set(found) == culprits and not reason and evals == len(calls) <= 24
    # the divergence reported downstream of the culprits: the window grows until it covers them
    found, evals, _ = search(order, "/m/layer7/op0", agrees, max_evals=24)
    assert set(found) == culprits
    # a budget too small to finish: no set that was not seen to agree is ever returned
    found, evals, reason = search(order, "/m/layer9/op0", agrees, max_evals=2)
    assert found is None and evals == 2 and "2 evaluations" in reason
    # nothing helps: said so, not a silent empty list
    found, _, reason = search(order, order[0], lambda nodes: False, max_evals=24)
    assert found is None and "every candidate" in reason


def _planted_rounding_fixture():
    """The shipped fixture with (x + 4096) - 4096 after its stem: the identity in fp32, but fp16 spaces its values 4
    apart near 4096, so every activation of the stem becomes 0 or a multiple of 4: an fp16 rounding failure, no
    tensor anywhere near fp16's overflow limit."""
    from toolkit.models.loading import load_model
    from toolkit.tasks.demo import fixture_path

    class Offset(torch.nn.Module):
        def forward(self, x):
            return (x + 4096.0) - 4096.0

    model = load_model(fixture_path())
    stem = model.model.model.backbone.model.embedder.embedder[0]
    stem.activation = torch.nn.Sequential(stem.activation, Offset())
    return model


@pytest.mark.slow
def test_fp16_accuracy_islands_find_a_planted_rounding_failure(tmp_path):
    from toolkit.export.onnx import export_onnx

    result = export_onnx(_planted_rounding_fixture(), tmp_path / "planted.fp16.onnx", precision="fp16", verify=False)
    assert not result.islands.nodes, result.islands.summary()  # no overflow: the overflow pass cannot see it
    model = onnx.load(str(result.path))
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    feeds = {"images": x, "orig_target_sizes": np.array([[320, 320]], np.int64)}
    # independent reference: the emulated fp16 graph shows the rounding at the planted Sub (values 0 or multiples of 4)
    probe = fp16_emulation(model)
    sub = next(n.output[0] for n in model.graph.node if n.name.endswith("activation.1/Sub"))
    probe.graph.output.add(name=sub)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.all(np.asarray(sess.run([sub], feeds)[0]) % 4 == 0)

    lines: list[str] = []
    found = repair_fp16(result.path, say=lines.append)
    assert found.needed and found.agrees, found.summary()
    assert {n.rsplit("/", 1)[1] for n in found.islands} == {"Add", "Sub"}, found.islands
    assert all("embedder.0/activation/activation.1/" in n for n in found.islands)
    assert found.evaluations <= 24 and any(" s): " in line for line in lines)  # bounded, with progress and time
    assert json.loads({p.key: p.value for p in onnx.load(str(result.path)).metadata_props}["fp16_accuracy_islands"]) == found.islands
    # the repaired file: the Sub's input is fp32 now, and run again the search finds nothing left to do
    again = repair_fp16(result.path)
    assert not again.needed and again.agrees, again.summary()


def _plant_int8_outlier(src, dst, k=2000.0):
    """The fixture's fp32 graph with one channel of a Conv -> Relu -> Conv chain scaled by ``k`` before the Relu and
    by 1/k after it: the same fp32 function (Relu is positively homogeneous), but the second Conv's input now has one
    channel ``k`` times wider than the rest, so per-tensor INT8 activations round every other channel to zero."""
    from onnx import numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in g.initializer}
    for b in g.node:
        r = producer.get(b.input[0]) if b.op_type == "Conv" and "/backbone/" in b.name else None
        a = producer.get(r.input[0]) if r is not None and r.op_type == "Relu" else None
        if a is None or a.op_type != "Conv" or len(a.input) < 3 or len(consumers[r.output[0]]) != 1 or b.input[1] not in inits:
            continue
        wa, ba, wb = (numpy_helper.to_array(inits[x]).copy() for x in (a.input[1], a.input[2], b.input[1]))
        wa[0] *= k
        ba[0] *= k
        wb[:, 0] /= k
        for x, v in ((a.input[1], wa), (a.input[2], ba), (b.input[1], wb)):
            inits[x].CopyFrom(numpy_helper.from_array(v, x))
        del m.metadata_props[:]  # an edited graph: no integrity record, no claim to be the export
        onnx.save(m, str(dst))
        return b.name
    raise AssertionError("no Conv -> Relu -> Conv chain in the fixture's backbone")


@pytest.mark.slow
def test_int8_accuracy_islands_find_a_planted_activation_outlier(tmp_path):
    """The planted outlier makes the INT8 graph disagree with fp32; the search keeps that Conv fp32 and the result
    passes the compare gate. Reference: the same quantization without the search is refused."""
    from toolkit.export.onnx import export_onnx
    from toolkit.tasks.demo import fixture_path
    from toolkit.tasks.quantize import QuantizationRefused, quantize

    src = export_onnx(fixture_path(), tmp_path / "shapes.onnx", verify=False).path
    m = onnx.load(str(src))
    planted = tmp_path / "planted.onnx"
    conv = _plant_int8_outlier(src, planted)
    pm = onnx.load(str(planted))  # keep preprocessing and class names (the file says it is fp32), drop the seal
    pm.metadata_props.extend([p for p in m.metadata_props if p.key != "rtdetr_deploy_integrity"])
    onnx.save(pm, str(planted))
    kw = dict(synthetic=16, eval_synthetic=24, min_speedup=None, progress=False)
    with pytest.raises(QuantizationRefused) as e:
        quantize(planted, tmp_path / "plain.int8.onnx", auto_islands=False, **kw)
    assert "compare" in {g.name for g in e.value.report.failed()}, e.value.report.table()
    lines: list[str] = []
    report = quantize(planted, tmp_path / "fixed.int8.onnx", say=lines.append, **kw)
    search = report.info["island_search"]
    assert search["needed"] and search["agrees"] and conv in search["islands"], (search, lines)
    assert len(search["islands"]) <= 3 and search["evaluations"] <= 16
    assert {g.name: g.passed for g in report.gates}["compare"] is True, report.table()
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "fixed.int8.onnx")).metadata_props}
    assert conv in json.loads(meta["int8_islands"])


def test_island_search_device_is_checked_before_any_work(tmp_path):
    """``auto`` falls back to the CPU emulation where ONNX Runtime CUDA is missing; asking for ``cuda`` there, or
    for a device that does not exist, is one clear error, and the CLI says it before exporting anything."""
    from tests.conftest import run_cli
    from toolkit.checks.island_search import resolve_search_device
    from toolkit.errors import InputError
    from toolkit.runtime.backends.onnxruntime import cuda_available

    with pytest.raises(InputError, match="expected auto, cpu or cuda"):
        resolve_search_device("gpu")
    assert resolve_search_device("cpu") == "cpu"
    if torch.cuda.is_available() and cuda_available():
        assert resolve_search_device("auto") == "cuda"
        return
    assert resolve_search_device("auto") == "cpu"
    with pytest.raises(InputError, match="CUDAExecutionProvider"):
        resolve_search_device("cuda")
    out = tmp_path / "h.onnx"
    r = run_cli("export", "--config", "tiny", "--precision", "fp16", "--islands-device", "cuda", "-o", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "CUDAExecutionProvider" in r.stderr, r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_random_weights_with_input_independent_scores_are_not_searched(tmp_path):
    """Untrained weights whose scores do not depend on the input (transformers' initialisation): fp16 rounds the
    tiny spread away and the compare's sentinel fires, but there is no detector output to repair. The search says
    so at once, never "none needed" and never a budget spent on bisecting (for R50 that bisect ran a 24 GB machine
    out of memory)."""
    from toolkit.export.onnx import export_onnx
    from toolkit.models.config import build_model, load_config

    path = export_onnx(build_model(load_config("tiny"), seed=0), tmp_path / "t.onnx", precision="fp16", verify=False).path
    before = path.read_bytes()
    lines: list[str] = []
    result = repair_fp16(path, say=lines.append, device="cpu")
    assert not result.needed and not result.agrees and result.evaluations == 0, result.summary()
    assert result.summary().startswith("fp16 accuracy islands: not searched (the weights are random"), result.summary()
    assert not any("island search" in line for line in lines) and path.read_bytes() == before
