"""Verify an exported ONNX file in ONNX Runtime (CPU) against the torch model it came from.

RT-DETR's encoder picks its decoder queries with a top-K over per-position class scores. Where those
scores tie at the selection boundary (transformers' default initialisation gives only a handful of
distinct values), ORT and torch legitimately pick different queries and the final outputs differ by
hundreds of pixels without any export bug. So the check is layered:

1. the selection scores (everything that precedes the query selection) must agree tightly;
2. ties at the selection boundary are detected and reported;
3. the final outputs are compared, up to a permutation of equal scores, only when the selection is
   unambiguous; otherwise the report says why they were not compared;
4. NaN/Inf in any output (ORT or torch, selection scores included) fails, naming the first graph node
   whose output is not finite.

Verdict: ``disagree`` (a problem: the export is refused), ``inconclusive`` (tied selection, or nothing
compared: the file is written, but nothing says it is right) or ``agree``; ``ok`` only for ``agree``.

Every check runs at two batch sizes through the same dynamic-batch file (a batch baked into a
constant deep in the graph shows up there).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..models.contract import PRECISIONS, DeployModel, ReducedPrecision
from ..numerics import tf32
from ..signature import INPUT_IMAGES, INPUT_SIZES
from .finite import first_non_finite_node, non_finite_names
from .discrete import flip_spread, is_discrete
from .permutation import match_permutation

# Tolerances per precision of the graph body (torch and ORT both run the body in that precision).
# fp32: reorderings of float32 sums stay far below these. fp16/bf16: a few units in the last place of a
# 10-bit (7-bit) mantissa, accumulated through the network.
TOLERANCES = {
    # precision: (selection logits atol, tie gap, box atol as a fraction of the image size, score atol)
    "fp32": (1e-3, 1e-4, 1e-4, 1e-4),
    "fp16": (0.05, 5e-3, 2e-3, 5e-3),
    "bf16": (0.3, 3e-2, 1e-2, 3e-2),
}


@dataclass
class BatchCheck:
    batch: int
    selection_max_diff: float | None = None  # None when the model's selection scores are not reachable
    boundary_gap: float | None = None
    order_gap: float | None = None  # closest pair of selection scores inside the top-K (slot-bound families only)
    tied: bool = False
    final_compared: int = 0
    final_max_box_diff: float | None = None
    final_max_score_diff: float | None = None
    final_label_mismatches: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    checks: list[BatchCheck]
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if any(c.problems for c in self.checks):
            return "disagree"
        return "agree" if self.checks and all(c.final_compared for c in self.checks) else "inconclusive"

    @property
    def ok(self) -> bool:
        return self.verdict == "agree"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "verdict": self.verdict, **asdict(self)}

    def summary(self) -> str:
        head = {"agree": f"PASS: agree on {sum(c.final_compared for c in self.checks)} detections over "
                         f"{sum(c.batch for c in self.checks)} images",
                "disagree": "FAIL", "inconclusive": "INCONCLUSIVE: final outputs not compared"}[self.verdict]
        lines = [f"verify: {head}"]
        for c in self.checks:
            sel = "n/a" if c.selection_max_diff is None else f"{c.selection_max_diff:.2e}"
            fin = ("not compared (tied selection)" if c.tied else "not compared (earlier problem)" if c.final_max_box_diff is None else
                   f"{c.final_compared} detections, max box diff {c.final_max_box_diff:.3g} px, "
                   f"max score diff {c.final_max_score_diff:.2e}, label mismatches {c.final_label_mismatches}")
            lines.append(f"  batch {c.batch}: selection scores max diff {sel}; final outputs: {fin}")
            lines += [f"    problem: {p}" for p in c.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verification_images(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Distinct, structured test images (smooth gradients plus rectangles), deterministic by seed."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    images = []
    for _ in range(batch):
        base = torch.stack([xx, yy, (xx + yy) / 2]) * torch.rand(3, 1, 1, generator=gen)
        for _ in range(4):
            x0, y0 = (torch.rand(2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])).int().tolist()
            bw, bh = (torch.rand(2, generator=gen) * torch.tensor([w * 0.3, h * 0.3]) + 4).int().tolist()
            base[:, y0:y0 + bh, x0:x0 + bw] = torch.rand(3, 1, 1, generator=gen)
        images.append(base + 0.02 * torch.rand(3, h, w, generator=gen))
    return torch.stack(images).clamp(0, 1)


def _selection_node_output(onnx_model: Any) -> str | None:
    """The input of the encoder's query-selection TopK (the first TopK fed by a ReduceMax)."""
    producers = {o: n for n in onnx_model.graph.node for o in n.output}
    for node in onnx_model.graph.node:
        if node.op_type == "TopK" and producers.get(node.input[0]) is not None and producers[node.input[0]].op_type == "ReduceMax":
            return node.input[0]
    return None


class _FirstQuerySelection(TorchFunctionMode):
    """Records the input of the first ``topk`` with ``k == num_queries``: the encoder's query selection.

    Found by what it does, not by a module's name, so it holds for every family (RT-DETR, D-FINE, DEIMv2 all
    select ``topk(enc_logits.max(-1).values, num_queries, dim=1)``) and for users' modules that do the same;
    it mirrors :func:`_selection_node_output`, the TopK fed by a ReduceMax in the graph.
    """

    def __init__(self, num_queries: int | None) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.scores: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.scores is None and self.num_queries and func in (torch.topk, torch.Tensor.topk):
            k = args[1] if len(args) > 1 else kwargs.get("k")
            if k == self.num_queries and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
                self.scores = args[0].detach().float()
        return func(*args, **kwargs)


def _slot_bound(model: DeployModel) -> bool:
    from ..models.families import family_of

    return any(getattr(family_of(m), "slot_bound_queries", False) for m in model.modules() if family_of(m) is not None)


def _torch_selection_scores(model: DeployModel, images: torch.Tensor, sizes: torch.Tensor, precision: str = "fp32"):
    """Torch outputs plus the encoder's per-position max class logits (None where no query selection ran)."""
    forward = model if precision == "fp32" else ReducedPrecision(copy.deepcopy(model), PRECISIONS[precision])
    num_queries = getattr(getattr(model.model, "config", None), "num_queries", None)
    capture = _FirstQuerySelection(num_queries)
    with torch.inference_mode(), tf32(False), capture:
        outputs = forward(images, sizes)
    return outputs, capture.scores


def verify_onnx(path: str | Path, model: DeployModel, *, sizes_dtype: torch.dtype = torch.int64,
                batches: tuple[int, ...] = (2, 3), seed: int = 0, precision: str = "fp32") -> VerifyReport:
    """Run ``path`` in ORT (CPU) and the torch model on the same images; see the module docstring.

    ``precision``: the body precision of the graph; torch then runs its body in that precision too."""
    selection_atol, tie_gap, box_fraction, score_atol = TOLERANCES[precision]
    import onnx
    import onnxruntime as ort

    onnx_model = onnx.load(str(path))
    sel_name = _selection_node_output(onnx_model)
    notes = []
    if sel_name is not None:
        body_type = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
        onnx_model.graph.output.append(onnx.helper.make_tensor_value_info(sel_name, body_type, None))
    else:
        notes.append("no encoder query selection found in the graph: only final outputs are compared")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    num_queries = getattr(getattr(model.model, "config", None), "num_queries", None)
    slot_bound = _slot_bound(model)
    checks = []
    h, w = model.preprocess.size
    discrete = precision == "fp32" and is_discrete(model)
    if discrete:
        notes.append("discrete sampling: final outputs compared with the fp32 tolerance widened by what rounding flips of "
                     "the sampling locations can change (measured in float64, toolkit.export.discrete)")
    for i, batch in enumerate(batches):
        images = verification_images(batch, (h, w), seed + i)
        sizes = torch.tensor([[w + 37 * j, h - 11 * j] for j in range(batch)], dtype=sizes_dtype)
        outs = session.run(None, {INPUT_IMAGES: images.numpy(), INPUT_SIZES: sizes.numpy()})
        ort_out = dict(zip([o.name for o in session.get_outputs()], outs))
        (labels, boxes, scores), sel = _torch_selection_scores(model, images.to(device), sizes.to(device), precision)
        ref = {"labels": labels.cpu(), "boxes": boxes.cpu(), "scores": scores.cpu()}
        check = BatchCheck(batch=batch)
        bad = non_finite_names({**{f"ORT output {k!r}" if k in ref else "ORT selection scores": v for k, v in ort_out.items()},
                                **{f"torch output {k!r}": v for k, v in ref.items()},
                                **({"torch selection scores": sel} if sel is not None else {})})
        if bad:
            feeds = {INPUT_IMAGES: images.numpy(), INPUT_SIZES: sizes.numpy()}
            where = first_non_finite_node(onnx_model, feeds) if any(b.startswith("ORT") for b in bad) else None
            check.problems.append(f"NaN/Inf in {', '.join(bad)}; first non-finite "
                                  + (f"tensor in the graph: {where}" if where else "values come from torch (the graph's are finite)"))
            checks.append(check)
            continue
        for name in ("labels", "boxes", "scores"):
            if tuple(ort_out[name].shape) != tuple(ref[name].shape):
                check.problems.append(f"{name}: ORT shape {list(ort_out[name].shape)} != torch {list(ref[name].shape)}")
        if sel is not None and sel_name is not None:
            ort_sel = torch.from_numpy(ort_out[sel_name].astype('float32'))
            if ort_sel.shape != sel.shape:
                check.problems.append(f"selection scores: ORT shape {list(ort_sel.shape)} != torch {list(sel.shape)}")
            else:
                check.selection_max_diff = (ort_sel - sel.cpu()).abs().max().item()
                if not check.selection_max_diff <= selection_atol:
                    check.problems.append(f"selection scores differ by {check.selection_max_diff:.3g} (> {selection_atol}): "
                                          "the graph before the query selection does not match torch")
                if num_queries and sel.shape[1] > num_queries:
                    ordered = sel.sort(dim=1, descending=True).values
                    check.boundary_gap = (ordered[:, num_queries - 1] - ordered[:, num_queries]).min().item()
                    if slot_bound:  # the order inside the top-K decides which learned query each proposal gets
                        check.order_gap = (ordered[:, :num_queries - 1] - ordered[:, 1:num_queries]).min().item()
                    check.tied = check.boundary_gap < tie_gap or (check.order_gap is not None and check.order_gap < tie_gap)
        if not check.tied and not check.problems:
            size_scale = float(max(h, w, sizes.max().item()))
            box_tol, score_tol, labels_tol = box_fraction * size_scale + 0.01, score_atol, 0
            if discrete:  # rounding flips move detections legitimately: widen by twice what flips can do (export/discrete.py)
                spread_box, spread_score, spread_labels = flip_spread(model, images.to(device), sizes.to(device))
                box_tol, score_tol, labels_tol = box_tol + 2 * spread_box, score_tol + 2 * spread_score, 2 * spread_labels
            for j in range(batch):
                m = match_permutation({k: v[j] for k, v in ref.items()}, {k: torch.from_numpy(ort_out[k][j]) for k in ref},
                                      score_band=score_tol)
                check.final_compared += m.compared
                check.final_max_box_diff = max(check.final_max_box_diff or 0.0, m.max_box_diff)
                check.final_max_score_diff = max(check.final_max_score_diff or 0.0, m.max_score_diff)
                check.final_label_mismatches += m.label_mismatches
            if check.final_max_box_diff > box_tol or check.final_max_score_diff > score_tol or check.final_label_mismatches > labels_tol:
                check.problems.append(f"final outputs differ: box {check.final_max_box_diff:.3g} px (tol {box_tol:.3g}), "
                                      f"score {check.final_max_score_diff:.3g} (tol {score_tol:.3g}), {check.final_label_mismatches} label mismatches")
        checks.append(check)
    if any(c.tied and c.order_gap is not None and c.order_gap < tie_gap for c in checks):
        gap = min(c.order_gap for c in checks if c.order_gap is not None)
        notes.append(f"the encoder's selection scores are tied INSIDE the top-K (closest pair {gap:.2g} < {tie_gap:g}): this family "
                     "binds each selected proposal to its slot's learned query, so a swap of two near-equal scores moves "
                     "detections legitimately; final outputs were not compared elementwise")
    if any(c.boundary_gap is not None and c.boundary_gap < tie_gap for c in checks):
        why = ("flat scores, typical of untrained weights" if precision == "fp32" else
               f"scores closer than {precision} rounding can separate")
        notes.append(f"the encoder's query selection is tied at its top-K boundary ({why}): torch and ORT may pick "
                     "different queries, so final outputs were not compared elementwise; "
                     + ("use trained weights (or toolkit.models.config.make_tie_free_) for an end-to-end check" if precision == "fp32"
                        else "compare it detection by detection with toolkit.compare (rtdetr-deploy compare)"))
    return VerifyReport(checks=checks, notes=notes)
