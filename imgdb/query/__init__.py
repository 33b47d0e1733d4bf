"""The query path: a first stage, then re-rankers, then the ``images`` join (:mod:`imgdb.query.plan`).

The parts are registered by name (:mod:`imgdb.query.registry`), as extractors are: a first stage per
ANN method (:mod:`imgdb.query.first_stages`), and re-rankers (:mod:`imgdb.query.rerankers`) that each
take a ranking and return one. A new first stage or re-rank is a new class, not an edit here.
"""
