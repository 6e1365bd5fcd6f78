"""Detection-aware matching: outputs of two backends are compared as sets of detections, never elementwise.

Top-K outputs reorder freely among equal or near-equal scores, so position i of one backend need not
be position i of the other. Matching is an optimal assignment (``scipy.optimize.linear_sum_assignment``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PermutationMatch:
    """Result of matching two full top-K outputs of one image, up to a permutation."""

    compared: int  # detections of the reference above the ambiguous boundary band
    max_box_diff: float  # pixels, over matched pairs
    max_score_diff: float
    label_mismatches: int


def match_permutation(
    ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], score_band: float = 1e-4
) -> PermutationMatch:
    """Match one image's detections (``labels`` [K], ``boxes`` [K,4], ``scores`` [K]) of two runs of the same model.

    Only reference detections scoring clearly above the K-th score (by ``score_band``) must be found in
    ``other``: at the top-K boundary, near-ties may legitimately swap a detection in or out.
    """
    from scipy.optimize import linear_sum_assignment

    rl, rb, rs = (ref[k].detach().cpu().double() for k in ("labels", "boxes", "scores"))
    ol, ob, os_ = (other[k].detach().cpu().double() for k in ("labels", "boxes", "scores"))
    keep = rs > rs.min() + score_band
    rl, rb, rs = rl[keep], rb[keep], rs[keep]
    if len(rs) == 0:
        return PermutationMatch(0, 0.0, 0.0, 0)
    scale = float(max(rb.abs().max().item(), ob.abs().max().item(), 1.0))
    cost = (torch.cdist(rb, ob, p=1) / scale + (rs[:, None] - os_[None, :]).abs()
            + 1e3 * (rl[:, None] != ol[None, :]).double())
    rows, cols = linear_sum_assignment(cost.numpy())
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    box_diff = (rb[rows] - ob[cols]).abs().max().item()
    score_diff = (rs[rows] - os_[cols]).abs().max().item()
    mismatches = int((rl[rows] != ol[cols]).sum().item())
    return PermutationMatch(len(rs), box_diff, score_diff, mismatches)

