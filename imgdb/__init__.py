"""imgdb: content-based image retrieval inside PostgreSQL + pgvector.

Search images with an image; similarity is plain SQL (``ORDER BY embedding <-> :q``) next to your
own tables. Start with :func:`connect`.
"""

from imgdb.client import Imgdb, connect
from imgdb.errors import ImgdbError

__version__ = "0.1.0"
__all__ = ["Imgdb", "ImgdbError", "connect", "__version__"]
