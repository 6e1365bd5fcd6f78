"""BatchNorm folding and precomputed constants, against the unfolded torch model and ONNX Runtime on the unfolded export."""

from __future__ import annotations

import collections
import copy
import json

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from toolkit.errors import ExportError
from toolkit.export.onnx import export_onnx
from toolkit.export.permutation import match_permutation
from toolkit.export.verify import verification_images
from toolkit.models.config import build_model, make_tie_free_
from toolkit.models.fold import FoldError, fold_model
from toolkit.models.loading import load_model, wrap_module
from toolkit.models.weights import weights_sha256
from toolkit.signature import PreprocessSpec

from .conftest import run_cli

FIXTURE = "toolkit/fixtures/shapes"


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) or type(m).__name__.endswith("FrozenBatchNorm2d") for m in model.modules())


@pytest.fixture(scope="module")
def tiny_stats():
    """The tie-free tiny model with random running statistics in every norm (the defaults make a fold an identity)."""
    model = make_tie_free_(build_model("tiny", seed=0), seed=0).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
    return model


def _ort(path, images, sizes):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(["labels", "boxes", "scores"], sess.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})))


def test_fold_is_a_verified_copy_with_every_norm_folded(tiny_stats):
    before = weights_sha256(tiny_stats)
    norms = _norms(tiny_stats)
    folded, report = fold_model(tiny_stats)
    assert norms == 57 and report.folded == norms  # the backbone's frozen norms and the encoder's BatchNorm2d
    assert _norms(folded) == 0 and _norms(tiny_stats) == norms and weights_sha256(tiny_stats) == before  # caller's module untouched
    assert report.constants == ["position embedding 4x4"]
    assert report.layer_max_rel_diff < 1e-5 and report.output_max_rel_diff is not None
    images = verification_images(3, (128, 128), seed=21)  # not the images the fold verified on
    with torch.no_grad():
        for a, b in zip(folded.raw(images), tiny_stats.raw(images)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_folded_onnx_matches_ort_on_the_unfolded_export(tiny_stats, tmp_path):
    plain = export_onnx(tiny_stats, tmp_path / "plain.onnx", fold=False)
    folded = export_onnx(tiny_stats, tmp_path / "folded.onnx")
    assert plain.fold is None and folded.fold.folded == 57 and folded.verify.ok  # verify ran against the unfolded torch model
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "folded.onnx")).metadata_props}
    assert json.loads(meta["fold"])["folded_pairs"] == 57
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "plain.onnx")).metadata_props}["fold"] == "off"
    ops = [collections.Counter(n.op_type for n in onnx.load(str(p)).graph.node) for p in (plain.path, folded.path)]
    assert ops[1]["Conv"] == ops[0]["Conv"] == 57
    assert ops[1]["Mul"] <= ops[0]["Mul"] - 15 and ops[1]["Add"] <= ops[0]["Add"] - 15  # the frozen norms' multiply-adds
    assert ops[0]["Sin"] and not ops[1]["Sin"] and not ops[1]["Range"]  # the position embedding is a constant
    images = verification_images(3, (128, 128), seed=22)
    sizes = torch.tensor([[640, 480], [128, 128], [1000, 90]])
    ref, got = _ort(plain.path, images, sizes), _ort(folded.path, images, sizes)
    for i in range(3):
        m = match_permutation({k: torch.from_numpy(v[i]) for k, v in ref.items()}, {k: torch.from_numpy(v[i]) for k, v in got.items()})
        assert m.compared > 50 and m.label_mismatches == 0 and m.max_box_diff < 0.05 and m.max_score_diff < 1e-4


@pytest.mark.slow
def test_fixture_folded_equals_unfolded_in_torch_and_ort(tmp_path):
    model = load_model(FIXTURE).eval()
    folded, report = fold_model(model)
    assert report.folded == _norms(model) > 0 and report.output_max_rel_diff is not None  # trained: no ties, outputs compared
    images = verification_images(4, model.preprocess.size, seed=3)
    sizes = torch.tensor([[640, 480]] * 4)
    with torch.no_grad():
        ref = dict(zip(["labels", "boxes", "scores"], model(images, sizes)))
        got = dict(zip(["labels", "boxes", "scores"], folded(images, sizes)))
    assert torch.equal(ref["labels"], got["labels"])
    torch.testing.assert_close(got["boxes"], ref["boxes"], rtol=0, atol=0.01)  # px at 640x480
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=0, atol=1e-5)
    plain = export_onnx(FIXTURE, tmp_path / "plain.onnx", fold=False, verify=False)
    export_onnx(FIXTURE, tmp_path / "folded.onnx")
    a, b = _ort(plain.path, images, sizes), _ort(tmp_path / "folded.onnx", images, sizes)
    assert (a["labels"] == b["labels"]).all()
    assert abs(a["boxes"] - b["boxes"]).max() < 0.01 and abs(a["scores"] - b["scores"]).max() < 1e-5


def test_non_finite_fold_is_refused(tiny_stats, tmp_path):
    broken = copy.deepcopy(tiny_stats)
    norm = next(m for m in broken.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        norm.running_var[0] = -1.0  # var + eps < 0: sqrt is NaN
    with pytest.raises(FoldError, match="non-finite"):
        fold_model(broken)
    with pytest.raises(ExportError, match="--no-fold"):
        export_onnx(broken, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


class _SharedConv(nn.Module):
    """A convolution whose output feeds a norm *and* a residual: folding the norm into it would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.norm.running_var.uniform_(0.2, 3.0)
            self.norm.running_mean.uniform_(-1, 1)

    def forward(self, images):
        y = self.conv(images)
        z = (self.norm(y) + y).mean((2, 3))  # [N,8]
        logits = self.head(z)[:, None, :].expand(-1, 4, -1) + torch.arange(4.0)[None, :, None]
        boxes = torch.sigmoid(z[:, :4])[:, None, :].expand(-1, 4, -1)
        return {"logits": logits, "pred_boxes": boxes}


def test_a_fold_that_would_change_the_model_is_caught():
    model = wrap_module(_SharedConv().eval(), class_names=list("abcde"), preprocess=PreprocessSpec(size=(32, 32)), top_k=10).eval()
    with pytest.raises(FoldError, match="differ"):
        fold_model(model)


@pytest.mark.slow
def test_cli_export_reports_the_fold_and_no_fold_turns_it_off(tmp_path):
    r = run_cli("export", "--config", "tiny", "-o", str(tmp_path / "t.onnx"), "--no-verify")
    assert r.returncode == 0, r.stderr
    assert "folded 57 conv-norm pair(s)" in r.stdout
    r = run_cli("export", "--config", "tiny", "-o", str(tmp_path / "u.onnx"), "--no-verify", "--no-fold")
    assert r.returncode == 0 and "folded" not in r.stdout
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "u.onnx")).metadata_props}["fold"] == "off"


class _Selecting(nn.Module):
    """A minimal RT-DETR-shaped model: ``model.enc_score_head`` scores 6 positions, the top 3 are selected and a
    per-query decoder turns each selected feature into its logits and box. ``swap`` nudges two selected positions'
    scores past each other (as a float32 rounding of a fold can), ``shift`` changes the decoder's output."""

    def __init__(self, swap: float = 0.0, shift: float = 0.0) -> None:
        super().__init__()
        self.config = type("Config", (), {"num_queries": 3, "learn_initial_query": False})()
        self.model = nn.Module()
        self.model.enc_score_head = nn.Identity()
        self.swap, self.shift = swap, shift
        self.unused = nn.Parameter(torch.zeros(1))  # the checks read the model's device from its parameters

    def forward(self, images):
        feats = images.mean((2, 3))[:, :1] * torch.arange(1.0, 7.0)  # [N,6] distinct per-position features
        base = torch.tensor([5.0, 1.0, 4.0, 0.0, 4.0 + 1e-6, 0.5])  # positions 2 and 4 near-equal inside the top 3
        scores = self.model.enc_score_head((base + torch.tensor([0, 0, self.swap, 0, 0, 0]))[None, :, None].expand(len(images), -1, 2))
        index = torch.topk(scores.max(-1).values, 3, dim=1).indices
        selected = feats.gather(1, index)[..., None]  # [N,3,1]
        return {"logits": torch.cat([selected, -selected], -1) + self.shift, "pred_boxes": torch.sigmoid(selected).expand(-1, -1, 4)}


def test_fold_check_matches_queries_that_leave_the_selection_in_another_order():
    from toolkit.models.fold import verify_fold

    wrap = lambda m: wrap_module(m.eval(), class_names=["a", "b"], preprocess=PreprocessSpec(size=(8, 8)), top_k=3).eval()
    original = wrap(_Selecting())
    diff, notes = verify_fold(original, wrap(_Selecting(swap=2e-6)))  # same queries, positions 2 and 4 swapped in order
    assert diff is not None and diff < 1e-6 and any("another order" in n for n in notes)
    with pytest.raises(FoldError, match="differ"):  # matched query by query, a real difference is still caught
        verify_fold(original, wrap(_Selecting(swap=2e-6, shift=0.1)))
    with pytest.raises(FoldError, match="other queries"):  # a clear margin at the boundary: a different selection is an error
        verify_fold(original, wrap(_Selecting(swap=-4.5)))
