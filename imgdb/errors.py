"""Errors that reach the user as one line.

Everything imgdb raises on purpose derives from :class:`ImgdbError`; the CLI prints its message
alone (no traceback) and exits non-zero, the HTTP layer maps it to a 4xx answer. Anything else is a
bug and keeps its traceback.
"""


class ImgdbError(Exception):
    """A failure with a reason the user can act on."""


class ImageReadError(ImgdbError):
    """A file or download is not an image imgdb will decode (corrupt, truncated, too large...)."""


class FetchError(ImgdbError):
    """A URL could not be fetched, or was refused (scheme, address, size, time-out)."""


class FilterError(ImgdbError):
    """A ``--filter`` expression does not parse or names an unknown field."""


class IndexNotFound(ImgdbError):
    """A named index does not exist."""


class IndexExists(ImgdbError):
    """An index of that name exists already."""


class ExtractorSpecError(ImgdbError):
    """An extractor spec string does not parse or names an unknown extractor or option."""


class DatabaseError(ImgdbError):
    """The database cannot be reached, started or upgraded."""
