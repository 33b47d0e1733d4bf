"""``kdtree``: exact nearest neighbours by a KD-tree over the stored vectors (scipy's cKDTree), built in
this process when loaded. It has no codes and learns nothing; it only helps low-dimensional
descriptors (``benchmarks/ann.py`` shows where it stops helping)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from imgdb.ann.codes import CodesMethod
from imgdb.ann.method import CodeIndex, Searcher
from imgdb.ann.spec import AnnSpec

if TYPE_CHECKING:
    from scipy.spatial import cKDTree


class KdTree(CodesMethod):
    name = "kdtree"
    summary = "exact KD-tree over the vectors in imgdb, for low dimensions"
    defaults = {"leafsize": 16}
    approximate = False

    def check(self, params: Mapping[str, int], dim: int | None, storage: str | None) -> None:
        self.require(params["leafsize"] >= 1, f"{self.name}: leafsize must be at least 1")

    def code_index(self, ann: AnnSpec, dim: int, state: Mapping[str, np.ndarray]) -> CodeIndex | None:
        return TreeIndex(ann.params["leafsize"])


class TreeIndex(CodeIndex):
    def __init__(self, leafsize: int) -> None:
        self.leafsize = leafsize

    def searcher(self, ids: np.ndarray, data: np.ndarray) -> Searcher:
        from scipy.spatial import cKDTree

        return TreeSearcher(cKDTree(data, leafsize=self.leafsize), ids)


class TreeSearcher(Searcher):
    def __init__(self, tree: cKDTree, ids: np.ndarray) -> None:
        super().__init__(ids)
        self.tree = tree

    def _search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        distances, positions = self.tree.query(query, k=n)
        return np.atleast_1d(positions).astype(np.int64), np.atleast_1d(distances).astype(np.float32)
