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
