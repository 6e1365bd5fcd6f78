"""Accuracy-driven fp32 islands: when a reduced-precision graph (fp16, INT8) still disagrees with fp32 as a detector,
find a small set of nodes that must stay fp32 for the compare to agree.

Overflow (:mod:`toolkit.export.islands`) is only one way fp16 fails; rounding is the other (a large offset added
and subtracted again, a difference of two nearly equal values), and INT8 fails where one layer's range is too wide
for 256 levels. Neither shows as a magnitude, only as a wrong result. The search:

1. compares the graph with its fp32 reference (the detection-aware :func:`toolkit.checks.compare.compare`); if it
   agrees there is nothing to do;
2. orders the search by :func:`toolkit.checks.bisect.bisect_onnx`: the first tensor (in topological order) that
   diverges from fp32 names where the trouble starts;
3. **layer groups** (nodes sharing a module path, e.g. ``/model/backbone/.../layer.1``) around that tensor: a
   window of groups that grows (1, 3, 5, 9, ... groups) until keeping it fp32 makes the compare agree, then its
   left and right edges are pulled in by binary search;
4. **nodes** of the groups found, the same two binary searches: a contiguous run of nodes (topological order).

Each evaluation rewrites the graph (``apply``) and runs the compare; the count is bounded by ``max_evals`` and
each one prints a progress line with the elapsed time. The result is the last set that made the compare agree
(never one that was not evaluated), or no islands and the reason when none was found within the budget.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

DEFAULT_MAX_EVALS = 24


@dataclass
class IslandSearch:
    """Outcome of the compare-driven search. ``islands``: nodes to keep fp32 (empty when none were needed or found)."""

    needed: bool  # the graph disagreed with fp32 before the search
    islands: list[str] = field(default_factory=list)
    agrees: bool = False  # the compare agrees with the islands applied (or without, when not needed)
    first_divergence: str | None = None  # node of the first tensor that diverges from fp32 (orders the search)
    evaluations: int = 0
    seconds: float = 0.0
    reason: str = ""

    def summary(self, kind: str = "fp16") -> str:
        if not self.needed and not self.agrees:
            return f"{kind} accuracy islands: not searched ({self.reason})"
        if not self.needed:
            return f"{kind} accuracy islands: none needed ({self.reason})"
        if self.agrees:
            return (f"{kind} accuracy islands: {len(self.islands)} node(s) kept fp32 ({', '.join(self.islands[:6])}"
                    f"{'...' if len(self.islands) > 6 else ''}); compare agrees; first divergence at {self.first_divergence}; "
                    f"{self.evaluations} evaluations in {self.seconds:.0f} s")
        return f"{kind} accuracy islands: NOT found ({self.reason}); {self.evaluations} evaluations in {self.seconds:.0f} s"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Budget(Exception):
    pass


def layer_of(node_name: str) -> str:
    """The layer group of a node: its module path (the exporter names nodes ``/module/path/OpType_n``)."""
    return node_name.rsplit("/", 1)[0] if "/" in node_name.strip("/") else node_name


def search(order: Sequence[str], start: str | None, agrees: Callable[[list[str]], bool], *, max_evals: int = DEFAULT_MAX_EVALS,
           say: Callable[[str], None] | None = None, group: Callable[[str], str] = layer_of) -> tuple[list[str] | None, int, str]:
    """The bounded group-then-node search over ``order`` (candidate nodes, topological order) around ``start``.
    ``agrees(nodes)`` says whether keeping ``nodes`` fp32 makes the compare agree. Returns (nodes or None, evaluations,
    reason)."""
    say = say or (lambda line: None)
    t0 = time.perf_counter()
    cache: dict[frozenset, bool] = {}
    count = [0]

    def ok(nodes: list[str], what: str) -> bool:
        key = frozenset(nodes)
        if key in cache:
            return cache[key]
        if count[0] >= max_evals:
            raise _Budget
        count[0] += 1
        cache[key] = bool(nodes) and agrees(list(nodes))
        say(f"  island search {count[0]}/{max_evals} ({time.perf_counter() - t0:.0f} s): {what}, {len(nodes)} node(s): "
            f"{'agrees' if cache[key] else 'still disagrees'}")
        return cache[key]

    groups: list[tuple[str, list[str]]] = []
    index: dict[str, int] = {}
    for name in order:
        g = group(name)
        if g not in index:
            index[g] = len(groups)
            groups.append((g, []))
        groups[index[g]][1].append(name)
    if not groups:
        return None, 0, "no candidate nodes"
    g0 = index.get(group(start), 0) if start in set(order) else 0
    flat = lambda lo, hi: [n for _, ns in groups[lo:hi + 1] for n in ns]  # noqa: E731
    try:
        r = 0
        while True:  # 1. grow a window of layer groups around the first divergence
            lo, hi = max(0, g0 - r), min(len(groups) - 1, g0 + r)
            if ok(flat(lo, hi), f"layer groups {groups[lo][0]} .. {groups[hi][0]}"):
                break
            if lo == 0 and hi == len(groups) - 1:
                return None, count[0], "the compare disagrees even with every candidate node in fp32"
            r = 1 if r == 0 else 2 * r
        lo, hi = _shrink(lo, hi, lambda a, b: ok(flat(a, b), f"layer groups {groups[a][0]} .. {groups[b][0]}"))
        nodes = flat(lo, hi)
        a, b = _shrink(0, len(nodes) - 1, lambda a, b: ok(nodes[a:b + 1], f"nodes {nodes[a]} .. {nodes[b]}"))
        return nodes[a:b + 1], count[0], ""
    except _Budget:
        best = min((set(k) for k, v in cache.items() if v), key=len, default=None)
        if best is None:
            return None, count[0], f"stopped after {max_evals} evaluations without an agreeing set"
        return [n for n in order if n in best], count[0], f"budget of {max_evals} evaluations spent; smallest agreeing set kept"


def _shrink(lo: int, hi: int, ok: Callable[[int, int], bool]) -> tuple[int, int]:
    """Given ok(lo, hi): the largest lo' then the smallest hi' with ok(lo', hi') (binary searches, monotone assumed;
    only evaluated ranges are returned)."""
    a, b = lo, hi  # ok(a, hi) holds; find the largest a in [lo, hi]
    while a < b:
        mid = (a + b + 1) // 2
        if ok(mid, hi):
            a = mid
        else:
            b = mid - 1
    lo = a
    a, b = lo, hi  # ok(lo, b) holds; find the smallest b in [lo, hi]
    while a < b:
        mid = (a + b) // 2
        if ok(lo, mid):
            b = mid
        else:
            a = mid + 1
    return lo, b


def run_search(reference: Any, candidate: Any, order: Sequence[str], build: Callable[[list[str]], Any], images: Any,
               thresholds: Any = None, *, agree: Callable[[Any], bool] | None = None, bisect_rtol: float = 5e-2,
               max_evals: int = DEFAULT_MAX_EVALS, say: Callable[[str], None] | None = None, device: str = "cpu",
               bisect_candidate: Any = None) -> IslandSearch:
    """Compare ``candidate`` (an ONNX path) with ``reference`` (the fp32 ONNX path); when they disagree, search.
    ``build(nodes)`` writes the graph with ``nodes`` kept fp32 and returns its path. ``agree(report)`` turns a
    :class:`~toolkit.checks.report.CompareReport` into a yes/no (default: verdict ``agree``). ``device``: where
    ONNX Runtime runs the candidates (the reference always runs on the CPU, in fp32). ``bisect_candidate``: the
    graph the first-divergence bisect (CPU) runs instead of ``candidate``, when the candidate only shows its
    rounding on ``device``."""
    from ..runtime.engine import load
    from .bisect import bisect_onnx
    from .compare import compare
    from .matching import Thresholds

    say = say or (lambda line: None)
    thresholds = thresholds or Thresholds()
    agree = agree or (lambda rep: rep.verdict == "agree")
    t0 = time.perf_counter()
    ref = load(reference, backend="onnxruntime", device="cpu")

    def judge(path: Any) -> Any:
        engine = load(path, backend="onnxruntime", device=device)
        try:
            return compare(ref, engine, images, thresholds=thresholds)
        finally:
            getattr(engine, "close", lambda: None)()

    first_report = judge(candidate)
    reason = getattr(first_report, "reason", "") or first_report.verdict
    if agree(first_report):
        return IslandSearch(False, [], True, reason=f"compare agrees with fp32: {reason}", seconds=time.perf_counter() - t0)
    vacuous = _cannot_judge(first_report)
    if vacuous:  # no verdict to repair: say so instead of spending the budget (a bisect of a large model costs GBs)
        return IslandSearch(False, [], False, reason=vacuous, seconds=time.perf_counter() - t0)
    say(f"compare with fp32 disagrees ({reason}): searching for fp32 islands (at most {max_evals} evaluations)")
    first = bisect_onnx(reference, bisect_candidate or candidate, images, rtol=bisect_rtol, atol=1e-2).first
    start = first.node if first is not None else None
    if first is not None:
        say(f"  first diverging tensor: {first.tensor} (node {first.node}, {first.op})")
    nodes, evals, why = search(order, start, lambda ns: agree(judge(build(ns))), max_evals=max_evals, say=say)
    return IslandSearch(True, nodes or [], nodes is not None, start, evals, time.perf_counter() - t0,
                        why or ("" if nodes else "no agreeing set"))


def _cannot_judge(report: Any) -> str:
    """Why the first compare cannot start a search, or ''. An inconclusive compare has nothing to repair; a sentinel
    on the fp32 reference means the reference itself is wrong; scores that do not depend on the input, on weights
    generated at random, are untrained weights (their score spread lies below the reduced precision's resolution),
    not a graph to repair."""
    if report.verdict == "inconclusive":
        return f"the compare with fp32 is inconclusive ({report.reason}): nothing to repair"
    on_reference = [f for f in report.sentinels if f.backend == report.backend_a]
    if on_reference:
        return f"the fp32 reference itself fails a sentinel ({on_reference[0].message})"
    random = report.random_weights.get("a") or report.random_weights.get("b")
    if random and any(f.check == "scores_equal" for f in report.sentinels):
        return (f"the weights are random ({random}) and the scores do not depend on the input: there is no detector "
                "output to judge; search with trained weights")
    return ""


def fp16_candidates(model: Any, skip: Sequence[str] = ()) -> list[str]:
    """Nodes of an fp16 graph that compute on fp16 tensors (topological order), except ``skip`` (already fp32)."""
    from onnx import TensorProto

    from ..export.islands import _types

    types = _types(model)
    skip = set(skip)
    return [n.name for n in model.graph.node if n.name not in skip and n.op_type not in ("Constant", "ConstantOfShape")
            and any(types.get(t) == TensorProto.FLOAT16 for t in (*n.input, *n.output) if t)]


def resolve_search_device(device: str) -> str:
    """``auto`` -> ``cuda`` where ONNX Runtime has its CUDA provider and torch sees a GPU, else ``cpu``; ``cuda``
    where that is missing is a :class:`~toolkit.errors.InputError` naming the fix."""
    from ..errors import InputError

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"island search device {device!r}: expected auto, cpu or cuda")
    if device == "cpu":
        return device
    import torch

    from ..runtime.backends.onnxruntime import cuda_available

    have = torch.cuda.is_available() and cuda_available()
    if device == "cuda" and not have:
        raise InputError("island search on cuda needs a CUDA GPU and onnxruntime's CUDAExecutionProvider "
                         "(pip install 'rtdetr-deploy[gpu]'), or use --islands-device cpu")
    return "cuda" if have else "cpu"


def repair_fp16(path: Any, *, max_evals: int = DEFAULT_MAX_EVALS, images: Any = None,
                say: Callable[[str], None] | None = None, device: str = "auto") -> IslandSearch:
    """The compare-driven search on the fp16 ONNX file at ``path`` (its reference: the fp32 twin of the same graph,
    :func:`toolkit.export.islands.fp32_twin`); when islands are found the file is rewritten in place (atomically)
    with them, listed in its ``fp16_accuracy_islands`` metadata entry.

    The fp16 side: with ``device="cuda"`` the file itself on ONNX Runtime's CUDA provider, the kernels it will be
    deployed on (cuDNN and cuBLAS round and reduce differently from any emulation); with ``"cpu"``
    :func:`toolkit.export.islands.fp16_emulation` on the CPU, because ONNX Runtime CPU hides fp16 rounding (it runs
    most fp16 nodes in fp32). ``"auto"``: CUDA where ONNX Runtime has its CUDA provider and torch sees a GPU."""
    import json
    import tempfile
    from pathlib import Path

    import onnx

    from ..atomic import atomic_path
    from ..export.islands import apply_islands, fp16_emulation, fp32_twin
    from ..export.quantize import _copy_metadata, _save_sealed

    device = resolve_search_device(device)
    path = Path(path)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    done = json.loads(meta.get("fp16_islands", "[]"))
    with tempfile.TemporaryDirectory(prefix="rtdetr-islands-") as tmp:
        twin_path = Path(tmp) / "fp32_twin.onnx"
        twin = fp32_twin(model)
        _copy_metadata(model, twin, {"precision": "fp32"})
        _save_sealed(twin, twin_path)
        count = [0]

        def build(nodes: list[str], emulate: bool = device == "cpu") -> Path:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            apply_islands(m, nodes)
            if emulate:
                m = fp16_emulation(m)
                _copy_metadata(model, m, {"precision": "fp32"})
            count[0] += 1
            out = Path(tmp) / f"candidate_{count[0]}.onnx"
            _save_sealed(m, out)
            return out

        if say is not None and device == "cuda":
            say("fp16 accuracy check on ONNX Runtime CUDA (the kernels this file will run on)")
        result = run_search(twin_path, build([]), fp16_candidates(model, done), build, images, max_evals=max_evals,
                            bisect_rtol=1e-2, say=say, device=device,
                            bisect_candidate=build([], emulate=True) if device == "cuda" else None)
        if result.needed and result.agrees:
            fixed = onnx.ModelProto()
            fixed.CopyFrom(model)
            apply_islands(fixed, result.islands)
            _copy_metadata(model, fixed, {"fp16_accuracy_islands": json.dumps(result.islands)})
            with atomic_path(path) as out_tmp:
                _save_sealed(fixed, out_tmp)
    return result
