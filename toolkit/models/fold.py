"""Fold every inference-time constant of the deploy model into its weights, on a copy: BatchNorm into the
convolution before it, and the encoder's position embedding into a buffer at the model's fixed input size.

Why: transformers' RT-DETR keeps its normalizations as separate ops at run time. The backbone's
``RTDetrFrozenBatchNorm2d`` computes ``weight * rsqrt(running_var + eps)`` and a multiply-add on every call,
and the encoder's ``RTDetrConvNormLayer`` (and the input projections) keep a ``BatchNorm2d``. A convolution
followed by an inference-mode BatchNorm is one convolution with scaled weights and a bias
(``W' = W * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``), so the backends that compile
the torch model (``torch.compile``, AOTInductor without freezing, Torch-TensorRT) run one kernel per layer
instead of three. Measured on the H200 (R50 640 fp16, ``torch.compile`` reduce-overhead, batch 32): 1262 img/s
with the stock model against 1642 img/s folded. The ONNX exporter already fuses ``BatchNorm2d`` nodes, but not
the frozen backbone norms (their multiply-add stays in the graph), so ONNX files get it too.

Pairs are found by running the model once with hooks: a norm whose input tensor *is* the output of a
convolution (no op in between), each module called once. The fold is then proved on real activations
(:func:`verify_fold`): every folded convolution against its convolution + norm on the same input, and the whole
model folded against unfolded, in fp32 with TF32 off; a non-finite folded weight or output is an error.

Other run-time constants of transformers' RT-DETR at a fixed input size: the anchors and valid mask are
already computed once (at ``anchor_image_size``) and stored, so nothing is left there. The encoder's 2D sine
position embedding is rebuilt from the feature-map shape on every call (an LRU cache in eager mode, but
``Range``/``Sin``/``Cos`` nodes in the ONNX graph and in exported programs); :class:`FixedPositionEmbedding`
returns it from a buffer at the model's size and computes it as before at any other size.

ONNX Runtime gains nothing measurable from either (its session optimizer fuses a convolution with a following
multiply-add and folds constants itself): interleaved A/B on a 2-core CPU, 1 thread, batch 1 (``.ci/fold-ab``,
2026-12-03), the trained fixture at 320 ran 31.7 ms unfolded, 32.2 ms BatchNorm-folded and 31.6 ms folded with
the position embedding precomputed; ``rtdetr_r18vd`` at 640 3673 / 3620 / 3583 ms, all within the noise. The
fold is for the backends that compile the torch model, and the fixed position embedding costs nothing.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import FoldError
from ..numerics import tf32
from .contract import DeployModel

# fp32 tolerances relative to the largest magnitude compared (at least 1). Per layer: a few float32 ulps of a
# reordered sum (measured: 8e-7 on the tiny model with random norm statistics). End to end, the rounding is
# amplified through the transformer (measured: 9e-5 there). A wrong fold is off by a norm's scale or shift, O(1).
FOLD_LAYER_RTOL = 1e-5
FOLD_OUTPUT_RTOL = 1e-3

__all__ = ["FOLD_LAYER_RTOL", "FOLD_OUTPUT_RTOL", "FixedPositionEmbedding", "FoldError", "FoldReport", "find_pairs",
           "fold_model", "folded_conv", "verify_fold"]


@dataclass
class FoldReport:
    """What :func:`fold_model` changed and what :func:`verify_fold` measured."""

    pairs: list[str] = field(default_factory=list)  # "conv path + norm path"
    constants: list[str] = field(default_factory=list)  # precomputed run-time constants
    layer_max_rel_diff: float | None = None  # worst folded conv vs conv + norm, relative to the output's magnitude
    output_max_rel_diff: float | None = None  # folded vs unfolded model outputs, same measure
    notes: list[str] = field(default_factory=list)

    @property
    def folded(self) -> int:
        return len(self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"folded_pairs": self.folded, "constants": list(self.constants), "layer_max_rel_diff": self.layer_max_rel_diff,
                "output_max_rel_diff": self.output_max_rel_diff}

    def summary(self) -> str:
        parts = [f"folded {self.folded} conv-norm pair(s)"]
        if self.constants:
            parts.append("precomputed " + ", ".join(self.constants))
        if self.layer_max_rel_diff is not None:
            parts.append(f"verified in fp32 (per layer {self.layer_max_rel_diff:.1e}, outputs "
                         + ("not compared" if self.output_max_rel_diff is None else f"{self.output_max_rel_diff:.1e}") + " relative)")
        return "; ".join(parts)


def _is_norm(module: nn.Module) -> bool:
    """An inference-mode per-channel affine norm: BatchNorm2d with running stats, or a frozen BatchNorm2d."""
    if isinstance(module, nn.BatchNorm2d):
        return module.track_running_stats and module.running_mean is not None and not module.training
    return type(module).__name__.endswith("FrozenBatchNorm2d") and all(
        isinstance(getattr(module, k, None), torch.Tensor) for k in ("weight", "bias", "running_mean", "running_var"))


def _norm_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with norm(x) = x * s + t per channel."""
    eps = float(getattr(norm, "eps", 1e-5))  # transformers' RTDetrFrozenBatchNorm2d hard-codes 1e-5
    mean, var = norm.running_mean.double(), norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - mean * scale


def folded_conv(conv: nn.Conv2d, norm: nn.Module, name: str = "") -> nn.Conv2d:
    """A new convolution computing ``norm(conv(x))``; raises :class:`FoldError` on a non-finite result."""
    scale, shift = _norm_scale_shift(norm)
    fused = copy.deepcopy(conv)
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    bias = (conv.bias.double() * scale if conv.bias is not None else 0) + shift
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise FoldError(f"folding {name or 'a norm'} into its convolution gives non-finite weights "
                        "(a running variance at or below -eps, or an infinite scale); export with fold=False (--no-fold)")
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return fused


def _example(model: DeployModel, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = model.preprocess.size
    device = next(model.parameters()).device
    images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    return images, torch.tensor([[w, h]] * batch, device=device)


def find_pairs(model: DeployModel) -> list[tuple[str, str]]:
    """(conv path, norm path) for every norm fed directly by a convolution, found on one forward pass."""
    return _discover(model)[0]


def _discover(model: DeployModel) -> tuple[list[tuple[str, str]], dict[str, tuple[int, int, torch.Tensor]]]:
    """One forward pass with hooks: the conv-norm pairs, and each sine position embedding's (width, height, value)."""
    names = {m: n for n, m in model.named_modules()}
    produced: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
    conv_of: dict[int, nn.Module] = {}
    calls: dict[nn.Module, int] = {}
    found: list[tuple[nn.Module, nn.Module]] = []
    embeddings: dict[str, tuple[int, int, torch.Tensor]] = {}

    def on_conv(module: nn.Module, _inputs: Any, out: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(out, torch.Tensor):
            produced[id(out)], conv_of[id(out)] = out, module

    def on_norm(module: nn.Module, inputs: Any, _out: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and produced.get(id(x)) is x:
            found.append((conv_of[id(x)], module))

    def on_embedding(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        named = dict(zip(("width", "height", "device", "dtype"), args), **kwargs)
        if names[module] not in embeddings and isinstance(out, torch.Tensor):
            embeddings[names[module]] = (int(named["width"]), int(named["height"]), out.float())

    handles = [m.register_forward_hook(on_conv) for m in model.modules() if type(m) is nn.Conv2d]
    handles += [m.register_forward_hook(on_norm) for m in model.modules() if _is_norm(m)]
    handles += [m.register_forward_hook(on_embedding, with_kwargs=True) for m in model.modules()
                if type(m).__name__ == "RTDetrSinePositionEmbedding"]
    try:
        with torch.no_grad(), tf32(False):
            model(*_example(model))
    finally:
        for h in handles:
            h.remove()
    return [(names[c], names[n]) for c, n in found if calls.get(c) == 1 and calls.get(n) == 1], embeddings


class FixedPositionEmbedding(nn.Module):
    """transformers' ``RTDetrSinePositionEmbedding`` with its value at one (width, height) stored as a buffer;
    any other size is computed by the original module."""

    def __init__(self, original: nn.Module, width: int, height: int, value: torch.Tensor) -> None:
        super().__init__()
        self.original, self.width, self.height = original, int(width), int(height)
        self.register_buffer("value", value.detach().clone(), persistent=False)

    def forward(self, width: Any, height: Any, device: Any, dtype: torch.dtype) -> torch.Tensor:
        if int(width) == self.width and int(height) == self.height:
            return self.value.to(device=device, dtype=dtype)
        return self.original(width, height, device, dtype)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fold_model(model: DeployModel, *, verify: bool = True, constants: bool = True) -> tuple[DeployModel, FoldReport]:
    """A folded copy of ``model`` (the caller's module is never changed) and what was folded.

    ``verify``: prove the fold on real activations with :func:`verify_fold` (raises :class:`FoldError`).
    ``constants``: also precompute the position embedding at the model's input size.
    """
    if model.training:
        raise FoldError("fold_model needs a model in eval mode (training BatchNorm uses batch statistics); call .eval() first")
    folded = copy.deepcopy(model).eval()
    pairs, embeddings = _discover(folded)
    convs: dict[str, nn.Conv2d] = {c: folded_conv(folded.get_submodule(c), folded.get_submodule(n), n) for c, n in pairs}
    report = FoldReport(pairs=[f"{c} + {n}" for c, n in pairs])
    if verify:
        report.layer_max_rel_diff = _verify_layers(folded, pairs, convs)
    for (c, n) in pairs:
        _set_module(folded, c, convs[c])
        _set_module(folded, n, nn.Identity())
    if constants:  # at the model's fixed input size; other sizes still go through the original module
        for path, (w, h, value) in embeddings.items():
            _set_module(folded, path, FixedPositionEmbedding(folded.get_submodule(path), w, h, value))
            report.constants.append(f"position embedding {w}x{h}")
    if verify:
        report.output_max_rel_diff, notes = verify_fold(model, folded)
        report.notes += notes
    return folded, report


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def _verify_layers(model: DeployModel, pairs: list[tuple[str, str]], convs: dict[str, nn.Conv2d]) -> float:
    """Run the unfolded model once; at each pair compare the folded conv on the conv's input with the norm's output."""
    pending: dict[str, torch.Tensor] = {}
    worst = 0.0
    handles = []
    for c, n in pairs:
        def on_conv(_m: nn.Module, inputs: Any, _out: Any, c: str = c) -> None:
            pending[c] = convs[c](inputs[0])

        def on_norm(_m: nn.Module, _inputs: Any, out: torch.Tensor, c: str = c, n: str = n) -> None:
            nonlocal worst
            got = pending.pop(c)
            if not torch.isfinite(got).all() and torch.isfinite(out).all():
                raise FoldError(f"the folded convolution {c} gives non-finite values where {n} does not; export with --no-fold")
            diff = _rel(got, out)
            if diff > FOLD_LAYER_RTOL:
                raise FoldError(f"the folded convolution {c} differs from {c} + {n} by {diff:.2e} (relative, > {FOLD_LAYER_RTOL}); "
                                "export with --no-fold")
            worst = max(worst, diff)

        handles += [model.get_submodule(c).register_forward_hook(on_conv), model.get_submodule(n).register_forward_hook(on_norm)]
    try:
        with torch.no_grad(), tf32(False):
            model(*_example(model, seed=1))
    finally:
        for h in handles:
            h.remove()
    return worst


def verify_fold(original: DeployModel, folded: DeployModel, *, batch: int = 2, tie_gap: float = 1e-4) -> tuple[float | None, list[str]]:
    """Worst relative difference of the raw predictions (logits, boxes) of ``folded`` against ``original`` in fp32.

    Raises :class:`FoldError` when they differ by more than :data:`FOLD_OUTPUT_RTOL` or ``folded`` gives non-finite values
    where ``original`` does not. When the encoder's query selection is tied at its top-K boundary (untrained weights),
    the two may legitimately pick different queries: the decoder outputs are then not compared (returns None and a
    note) and the per-layer check stands alone. Inside the selection, near-equal scores may come out of the top-K in
    another order (a float32 rounding of the fold is enough): the same queries, so the decoder outputs are compared
    query by query, each matched by its encoder position. Models that implement the contract themselves are compared
    on their final outputs."""
    images, sizes = _example(original, batch, seed=2)
    selections: dict[str, list[tuple[float | None, torch.Tensor | None]]] = {"original": [], "folded": []}
    handles = []
    for side, model in (("original", original), ("folded", folded)):
        head = getattr(getattr(getattr(model.model, "model", None), "enc_score_head", None), "register_forward_hook", None)
        if head is not None:
            handles.append(head(lambda _m, _i, out, side=side, model=model: selections[side].append(_selection(model, out))))
    try:
        with torch.no_grad(), tf32(False):
            ref = original.raw(images) if not original.contract else original(images, sizes)
            got = folded.raw(images) if not folded.contract else folded(images, sizes)
    finally:
        for handle in handles:
            handle.remove()
    for a, b in zip(got, ref):
        if a.is_floating_point() and not torch.isfinite(a).all() and torch.isfinite(b).all():
            raise FoldError("the folded model gives non-finite outputs where the original does not; export with --no-fold")
    gap, ref_index = selections["original"][0] if selections["original"] else (None, None)
    if gap is not None and gap < tie_gap:
        return None, [f"folded model outputs not compared: the query selection is tied (gap {gap:.1e}; untrained weights); "
                      "every folded layer was checked on its own"]
    notes: list[str] = []
    got_index = selections["folded"][0][1] if selections["folded"] else None
    if ref_index is not None and got_index is not None and not torch.equal(ref_index, got_index) and not original.contract:
        if not torch.equal(ref_index.sort(dim=1).values, got_index.sort(dim=1).values):
            raise FoldError("the folded model's encoder selects other queries than the original's (selection not tied at its "
                            + (f"top-K boundary, gap {gap:.1e}" if gap is not None else "top-K boundary") + "); export with --no-fold")
        if getattr(getattr(original.model, "config", None), "learn_initial_query", False):  # decoder not order-equivariant
            return None, ["folded model outputs not compared: near-equal selection scores come out of the top-K in another "
                          "order and the decoder's learned initial queries depend on that order; every folded layer was checked on its own"]
        # position of each of the original's selected queries in the folded model's selection
        order = (got_index[:, None, :] == ref_index[:, :, None]).int().argmax(-1)
        got = tuple(t.gather(1, order[..., None].expand(-1, -1, t.shape[-1]).to(t.device)) if t.dim() == 3 and t.shape[1] == order.shape[1]
                    else t for t in got)
        notes.append("near-equal selection scores came out of the top-K in another order: folded outputs compared query by query, "
                     "matched by encoder position")
    worst = max(_rel(a, b) for a, b in zip(got, ref) if a.is_floating_point())
    if worst > FOLD_OUTPUT_RTOL:
        raise FoldError(f"the folded model's outputs differ from the original's by {worst:.2e} (relative, > {FOLD_OUTPUT_RTOL}); "
                        "export with --no-fold")
    return worst, notes


def _selection(model: DeployModel, scores: torch.Tensor) -> tuple[float | None, torch.Tensor | None]:
    """(boundary gap, selected encoder positions [N,K] in the model's order) from the encoder's class scores, as
    transformers selects them (``topk(scores.max(-1).values, num_queries, dim=1)``)."""
    k = getattr(getattr(model.model, "config", None), "num_queries", None)
    if not k or scores.shape[1] < k:
        return None, None
    index = torch.topk(scores.max(-1).values, k, dim=1).indices.cpu()
    return _boundary_gap(model, scores), index


def _boundary_gap(model: DeployModel, scores: torch.Tensor) -> float | None:
    k = getattr(getattr(model.model, "config", None), "num_queries", None)
    sel = scores.float().max(-1).values
    if not k or sel.shape[1] <= k:
        return None
    ordered = sel.sort(dim=1, descending=True).values
    return (ordered[:, k - 1] - ordered[:, k]).min().item()
