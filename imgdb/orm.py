"""imgdb's tables for applications that speak SQLAlchemy's ORM: the models and the mappers of an
index's vectors and view (defined in the database layer, :mod:`imgdb.db.models`, where imgdb's own
SQL uses them too)::

    from sqlalchemy import select
    from imgdb.orm import Image, vectors_model

    V = vectors_model(session, "default")
    hits = session.scalars(select(Image).join(V, V.image_id == Image.id)
                           .order_by(V.embedding.l2_distance(query_vector)).limit(10))
"""

from imgdb.db.models import (VIEW_PREFIX, Base, DuplicateChecked, DuplicateMember, DuplicatePair, FailedRow, Image,
                             ImagePath, IndexState, LocalFeatures, Network, Ref, SearchIndex, Source, index_model, vectors_model)

__all__ = ["VIEW_PREFIX", "Base", "DuplicateChecked", "DuplicateMember", "DuplicatePair", "FailedRow", "Image",
           "ImagePath", "IndexState", "LocalFeatures", "Network", "Ref", "SearchIndex", "Source", "index_model", "vectors_model"]
