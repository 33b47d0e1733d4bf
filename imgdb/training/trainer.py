"""Fine-tuning a :class:`~imgdb.features.network.RetrievalNet` on a collection's own images.

The recipe (Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation"),
shaped for a 2-core machine:

* the earlier stages stay frozen and only the last ``train_stages`` stages, the pooling and the
  whitening learn; so the frozen part's output of every view can be computed once and cached
  (:class:`ViewBank`), and an epoch runs the small trained tail only;
* each image's positives are synthetic photos of it (:mod:`imgdb.training.augment`); the anchor is a
  photo, its positive the clean image, as a query photo meets its gallery image at search time;
* its negatives are the clean images the current network puts nearest that photo, mined again at
  the start of every epoch (:mod:`imgdb.training.mining`);
* ``category``/``multitask`` add a cosine head per label key over the descriptor; ``distill`` trains
  a smaller student to reproduce a fixed teacher's in-batch similarities (:mod:`imgdb.training.losses`);
* training stops after ``epochs``, or before an epoch that would end past the time budget.

Batch normalisation keeps its ImageNet statistics (a few hundred images cannot estimate better
ones), so the network is in ``eval`` mode throughout and only gradients flow.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from imgdb.errors import ImgdbError
from imgdb.features.network import RetrievalNet
from imgdb.training import losses
from imgdb.training.augment import photo_of
from imgdb.training.mining import hard_negatives

#: Prepares an RGB uint8 array for a network: a normalised ``(3, H, W)`` float32 array.
Prepare = Callable[[np.ndarray], np.ndarray]
#: ``(epoch, epochs, mean loss, seconds left or None)`` after each epoch.
EpochCallback = Callable[[int, int, float, "float | None"], None]
#: ``(done, total)`` while views are made and cached.
ProgressCallback = Callable[[int, int], None]
#: Cached frozen maps may take this much memory (float16); beyond it, views are made afresh each epoch.
CACHE_BYTES = 2 * 2**30
#: Views cache building may take at most this share of the time budget (fewer views if needed).
CACHE_SHARE = 0.4


@dataclass(frozen=True)
class TrainOptions:
    """How to train; every field has the default ``imgdb train`` uses."""

    epochs: int = 5
    time_budget: float | None = None  # seconds
    loss: str = "triplet"
    margin: float | None = None  # None: the loss's own default
    views: int = 6  # synthetic photos per image (cached)
    negatives: int = 5
    batch: int = 16
    lr: float = 5e-5
    whitening_lr: float = 5e-4
    train_stages: int = 3
    label_weight: float = 1.0
    distill_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        counts = {"epochs": self.epochs, "views": self.views, "negatives": self.negatives, "batch": self.batch,
                  "train_stages": self.train_stages}
        for name, value in counts.items():
            if not isinstance(value, int) or not 1 <= value <= 100_000:
                raise ImgdbError(f"{name} must be a whole number from 1 to 100000, not {value!r}")
        rates = {"lr": self.lr, "whitening_lr": self.whitening_lr, "label_weight": self.label_weight,
                 "distill_weight": self.distill_weight, "time_budget": self.time_budget or 1.0,
                 "margin": self.margin or 1.0}
        for name, value in rates.items():
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ImgdbError(f"{name} must be a positive number, not {value!r}")


@dataclass
class Member:
    """One training image: its pixels (RGB uint8, the size the network sees), and per label head
    the class index of its value (``losses.NO_LABEL`` without one)."""

    pixels: np.ndarray
    labels: list[int] = field(default_factory=list)


@dataclass
class Trained:
    """What training produced: the loss after each epoch, and for how long it ran."""

    losses: list[float]
    seconds: float
    views: int


class ViewBank:
    """The frozen part's output for each image's clean view and its synthetic photos, float16 on
    the CPU; with a teacher, the teacher's descriptors of the same pixels too.

    When all views fit :data:`CACHE_BYTES` they are made once; otherwise one photo per image is
    made again every epoch (:meth:`refresh`), so memory stays bounded on large collections."""

    def __init__(self, net: RetrievalNet, prepare: Prepare, members: Sequence[Member], views: int,
                 rng: np.random.Generator, device: torch.device,
                 teacher: tuple[RetrievalNet, Prepare] | None = None) -> None:
        self.net, self.prepare, self.members, self.rng, self.device = net, prepare, members, rng, device
        if teacher is not None and device.type != "cpu":  # (the teacher is shared by the process, on the CPU)
            teacher = (copy.deepcopy(teacher[0]).to(device), teacher[1])
        self.teacher = teacher
        self.clean = [self._frozen(m.pixels) for m in members]
        self.teacher_clean = self._teach([m.pixels for m in members])
        per_view = sum(t.numel() for t in self.clean) * 2 / max(len(members), 1)  # float16 bytes
        self.cached = per_view * len(members) * views <= CACHE_BYTES
        self.views = views if self.cached else 1
        self.photos: list[list[torch.Tensor]] = [[] for _ in members]
        self.teacher_photos: list[list[torch.Tensor]] = [[] for _ in members]

    def fill(self, on_progress: ProgressCallback | None = None, deadline: float | None = None) -> None:
        """Make the views (stopping early at ``deadline``, with at least one per image)."""
        total = len(self.members) * self.views
        for k in range(self.views):
            if k and deadline is not None and time.monotonic() > deadline:
                self.views = k
                break
            for i, member in enumerate(self.members):
                self._add(i, photo_of(member.pixels, self.rng))
                if on_progress:
                    on_progress(k * len(self.members) + i + 1, total)

    def refresh(self) -> None:
        """A new photo of every image, in place of the old one (uncached mode)."""
        if self.cached:
            return
        for i, member in enumerate(self.members):
            self.photos[i].clear()
            self.teacher_photos[i].clear()
            self._add(i, photo_of(member.pixels, self.rng))

    def _add(self, i: int, photo: np.ndarray) -> None:
        self.photos[i].append(self._frozen(photo))
        if self.teacher is not None:
            self.teacher_photos[i].append(self._teach([photo])[0])

    def _frozen(self, pixels: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            x = torch.from_numpy(self.prepare(pixels))[None].to(self.device)
            return self.net.frozen(x)[0].to("cpu", torch.float16)

    def _teach(self, pixels: Sequence[np.ndarray]) -> list[torch.Tensor]:
        if self.teacher is None:
            return []
        net, prepare = self.teacher
        with torch.inference_mode():
            return [net(torch.from_numpy(prepare(p))[None].to(self.device))[0].cpu() for p in pixels]


def describe(net: RetrievalNet, frozen: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The descriptor of one cached frozen map (with gradients where the caller allows them)."""
    return net.head(net.tail(frozen[None].to(device, torch.float32)))[0]


def train(net: RetrievalNet, prepare: Prepare, members: Sequence[Member], options: TrainOptions, *,
          classes: Sequence[int] = (), device: torch.device | None = None,
          teacher: tuple[RetrievalNet, Prepare] | None = None,
          on_progress: ProgressCallback | None = None, on_epoch: EpochCallback | None = None) -> Trained:
    """Fine-tune ``net`` in place on ``members``; ``classes`` gives each label head's class count
    (``category``/``multitask``), ``teacher`` a fixed network to distil (``distill``)."""
    started = time.monotonic()
    device = device or torch.device("cpu")
    if len(members) < options.negatives + 1:
        raise ImgdbError(f"fine-tuning needs at least {options.negatives + 1} images, the index has {len(members)}")
    if options.loss not in losses.LOSSES:
        raise ImgdbError(f"unknown loss {options.loss!r}: use {' or '.join(losses.LOSSES)}")
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    net.detach_from(min(net.trained_from, len(net.stages) - options.train_stages))  # (a trained net: no less)
    if net.whiten is None:
        net.identity_whitening()
    net.to(device).eval()
    heads = nn.ModuleList(losses.CosineHead(net.dim, n) for n in classes).to(device)
    optimiser = torch.optim.Adam([
        {"params": [p for m in net.stages[net.trained_from:] for p in m.parameters()] + list(net.pool.parameters()),
         "lr": options.lr},
        {"params": [*net.whiten.parameters(), *heads.parameters()], "lr": options.whitening_lr},
    ])
    bank = ViewBank(net, prepare, members, options.views, rng, device, teacher)
    deadline = None if options.time_budget is None else started + CACHE_SHARE * options.time_budget
    bank.fill(on_progress, deadline)
    metric = losses.LOSSES[options.loss]
    margin = {} if options.margin is None else {"margin": options.margin}
    labels = torch.tensor([m.labels for m in members], dtype=torch.long).reshape(len(members), len(classes))
    epoch_losses: list[float] = []
    epoch_seconds = 0.0
    for epoch in range(options.epochs):
        epoch_start = time.monotonic()
        if options.time_budget is not None and epoch and epoch_start + epoch_seconds > started + options.time_budget:
            break
        bank.refresh()
        chosen = rng.integers(0, bank.views, len(members))
        with torch.no_grad():
            gallery = torch.stack([describe(net, f, device) for f in bank.clean]).cpu().numpy()
            photos = torch.stack([describe(net, bank.photos[i][c], device) for i, c in enumerate(chosen)]).cpu().numpy()
        negatives = hard_negatives(photos, gallery, [{i} for i in range(len(members))], options.negatives)
        total, steps = 0.0, 0
        order = rng.permutation(len(members))
        for start in range(0, len(members), options.batch):
            rows = order[start:start + options.batch]
            optimiser.zero_grad()
            needed = sorted({int(i) for i in rows} | {int(n) for i in rows for n in negatives[i]})
            clean = {i: describe(net, bank.clean[i], device) for i in needed}
            anchor = torch.stack([describe(net, bank.photos[i][chosen[i]], device) for i in rows])
            positive = torch.stack([clean[int(i)] for i in rows])
            negative = torch.stack([torch.stack([clean[int(n)] for n in negatives[i]]) for i in rows])
            loss = metric(anchor, positive, negative, **margin)
            for h, head in enumerate(heads):
                target = labels[rows, h].to(device)
                loss = loss + options.label_weight / len(heads) * (
                    losses.classification(head(anchor), target) + losses.classification(head(positive), target)) / 2
            if teacher is not None:
                student = torch.cat([anchor, torch.stack([clean[i] for i in needed])])
                taught = torch.stack([bank.teacher_photos[i][chosen[i]] for i in rows]
                                     + [bank.teacher_clean[i] for i in needed]).to(device)
                loss = loss + options.distill_weight * losses.distillation(student, taught)
            loss.backward()
            optimiser.step()
            total, steps = total + loss.item(), steps + 1
        epoch_losses.append(total / max(steps, 1))
        epoch_seconds = time.monotonic() - epoch_start
        if on_epoch:
            left = (options.epochs - epoch - 1) * epoch_seconds
            if options.time_budget is not None:
                left = min(left, max(0.0, started + options.time_budget - time.monotonic()))
            on_epoch(epoch + 1, options.epochs, epoch_losses[-1], left)
    net.to("cpu")
    return Trained(epoch_losses, time.monotonic() - started, bank.views)
