"""The jobs: what imgdb does with a catalog (:mod:`imgdb.catalog`), one module each."""
