"""A calibrated score: how likely a hit is to be *the same picture* as the query, in [0, 1].

A raw distance means nothing to a user: its scale differs per descriptor and per collection, and no
one threshold serves every index. Each index therefore learns (:mod:`imgdb.jobs.calibrate`), from
edited copies of its own images, how distances of the same picture compare with distances of the
different pictures nearest it, and keeps a logistic model of the evidence: the distance, and where
a hit was verified (``--rerank verify``), the number of inliers too. The score is that model's
probability that the hit is the same picture (at even prior odds: 0.5 is where the evidence is as
typical of an edited copy as of a different picture).

The models are two or three numbers each, kept with the index's learned state under ``score.``
and read with its registry row, so that scoring costs a query nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: The namespace of the score's learned state in ``index_state``.
STATE_OWNER = "score."
#: The models: on the distance alone, and on the distance and the inliers of a verified hit.
DISTANCE, VERIFIED = "distance", "verified"
KEYS = (STATE_OWNER + DISTANCE, STATE_OWNER + VERIFIED)


def evidence(distances: np.ndarray, inliers: np.ndarray | None = None) -> np.ndarray:
    """The models' inputs: the distance, and ``log(1 + inliers)`` where inliers count."""
    columns = [np.asarray(distances, np.float64)]
    if inliers is not None:
        columns.append(np.log1p(np.asarray(inliers, np.float64)))
    return np.stack(columns, axis=1)


@dataclass(frozen=True)
class Calibration:
    """An index's score models: intercept first, then a weight per input of :func:`evidence`."""

    distance: np.ndarray
    verified: np.ndarray | None = None

    @classmethod
    def of(cls, state: dict[str, np.ndarray]) -> Calibration | None:
        """The models in an index's ``score.`` state (keys without the prefix); None before it learned any."""
        if DISTANCE not in state:
            return None
        return cls(np.asarray(state[DISTANCE], np.float64), None if VERIFIED not in state else
                   np.asarray(state[VERIFIED], np.float64))

    def scores(self, distances: np.ndarray, inliers: np.ndarray | None = None) -> np.ndarray:
        """The probability that each pair is the same picture; with ``inliers``, by the verified model
        (the distance one where the index has none)."""
        model = self.verified if inliers is not None and self.verified is not None else self.distance
        x = evidence(distances, inliers if model is self.verified else None)
        return 1.0 / (1.0 + np.exp(-(model[0] + x @ model[1:])))

    def score(self, distance: float, notes: dict[str, Any]) -> float:
        """One hit's score, by what a re-rank noted about it (``inliers``, where it verified)."""
        inliers = np.array([notes["inliers"]]) if "inliers" in notes else None
        return round(float(self.scores(np.array([distance]), inliers)[0]), 4)

    def distance_at(self, score: float) -> float:
        """The distance the distance model scores ``score`` (what a cut-off means in distances)."""
        b, w = self.distance
        return float((np.log(score / (1 - score)) - b) / w)
