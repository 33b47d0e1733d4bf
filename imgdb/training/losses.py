"""The losses of retrieval fine-tuning, on L2-normalised descriptors.

Each is the textbook formula on a batch, so that a test can check it against a direct computation:

* :func:`triplet` (Schroff et al. 2015; Gordo et al. 2016): an anchor must be nearer its positive
  than each of its negatives by ``margin``;
* :func:`contrastive` (Hadsell et al. 2006; Radenović et al. 2018): positives pulled together,
  negatives pushed apart until ``margin``;
* :func:`classification` (the category term of ``category``/``multitask``): cross-entropy of a
  :class:`CosineHead` over the descriptor, images without a label left out;
* :func:`distillation`: KL divergence from the teacher's softmax over in-batch similarities to the
  student's, so that the student learns the teacher's similarity *structure*, not its vectors
  (which may not even have the same dimension).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Label of an image that has no value for a head's key: ignored by the cross-entropy.
NO_LABEL = -1


def triplet(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Mean of ``max(0, ‖a - p‖ - ‖a - n‖ + margin)`` over anchors ``(B, D)``, their positives
    ``(B, D)`` and each of their negatives ``(B, N, D)``."""
    d_pos = (anchor - positive).norm(dim=-1, keepdim=True)
    d_neg = (anchor[:, None, :] - negatives).norm(dim=-1)
    return F.relu(d_pos - d_neg + margin).mean()


def contrastive(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, margin: float = 0.7) -> torch.Tensor:
    """``½‖a - p‖²`` per positive pair plus ``½·max(0, margin - ‖a - n‖)²`` per negative pair,
    averaged over all pairs (as cirtorch's ContrastiveLoss)."""
    d_pos = (anchor - positive).norm(dim=-1)
    d_neg = (anchor[:, None, :] - negatives).norm(dim=-1)
    pairs = torch.cat([0.5 * d_pos**2, (0.5 * F.relu(margin - d_neg) ** 2).flatten()])
    return pairs.mean()


LOSSES = {"triplet": triplet, "contrastive": contrastive}


class CosineHead(nn.Module):
    """A label head on a unit descriptor: ``scale · cos(descriptor, class weight)`` (NormFace, Wang
    et al. 2017). A plain linear head on a vector of norm 1 starts with logits near 0 and, at the
    small rates fine-tuning uses, stays at the chance cross-entropy ``ln(classes)`` for epochs; with
    unit class weights and a fixed scale the logits span ``±scale`` from the first step."""

    def __init__(self, dim: int, classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(classes, dim), dim=1))
        self.scale = scale

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(descriptor, dim=-1) @ F.normalize(self.weight, dim=1).T


def classification(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled rows (``NO_LABEL`` rows take no part); 0 if none is labelled."""
    known = labels != NO_LABEL
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], labels[known])


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """``KL(softmax(T Tᵀ/τ) ‖ softmax(S Sᵀ/τ))`` per row, self-similarities left out, averaged."""
    n = len(student)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)
    s = (student @ student.T / temperature)[off_diagonal].view(n, n - 1)
    t = (teacher @ teacher.T / temperature)[off_diagonal].view(n, n - 1)
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")
