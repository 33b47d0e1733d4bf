"""The query path: a first stage, then re-rankers, then the ``images`` join (:mod:`imgdb.query.plan`).

Each index's first stage comes with its ANN method (:mod:`imgdb.ann`); re-rankers
(:mod:`imgdb.query.rerankers`, :mod:`imgdb.query.verify`, :mod:`imgdb.query.expansion`) each take a
ranking and return one, and are registered by name (:mod:`imgdb.query.registry`). A new re-rank is
a new class, not an edit here.
"""
