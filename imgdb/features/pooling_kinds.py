"""Which poolings a CNN spec can name and what options each takes, known without torch.

Parsing a spec, and searching through ONNX Runtime, must not load torch. The maths lives in
:mod:`imgdb.features.pooling` (torch: training and the PyTorch runtime) and, for the poolings an
exported graph cannot hold, in :mod:`imgdb.features.pooling_numpy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolingKind:
    """A pooling as a spec names it.

    Each option is passed to the pooling function as the keyword of the same name; the type of its
    default (int or float) is the type the spec parser expects. ``classifier``: the pooling also
    takes the backbone's ImageNet classifier, so it pools the last map only. ``shape_dependent``: its
    arithmetic is laid out from the map's height and width in Python (SPoC's prior, R-MAC's region
    grid), so a graph traced once cannot hold it for every image size; under ONNX Runtime the graph
    stops at the map and numpy pools it.
    """

    label: str
    params: dict[str, int | float] = field(default_factory=dict)
    classifier: bool = False
    shape_dependent: bool = False


#: Pooling name in a spec → what it is.
KINDS: dict[str, PoolingKind] = {
    "gem": PoolingKind("GeM (generalised mean, p=3)", {"p": 3.0}),
    "max": PoolingKind("MAC (max)"),
    "avg": PoolingKind("average"),
    "spoc": PoolingKind("SPoC (sum with a centre prior)", shape_dependent=True),
    "rmac": PoolingKind("R-MAC (regional max, 3 scales)", {"levels": 3}, shape_dependent=True),
    "crow": PoolingKind("CroW (cross-dimensional weighting)", {"a": 2.0, "b": 2.0}),
    "cam": PoolingKind("class-weighted (CAMs of the 5 likeliest ImageNet classes)", {"classes": 5}, classifier=True),
}
