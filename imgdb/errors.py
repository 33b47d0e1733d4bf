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


class ImageNotFound(ImgdbError):
    """No stored image has that id."""


class IndexExists(ImgdbError):
    """An index of that name exists already."""


class ExtractorSpecError(ImgdbError):
    """An extractor spec string does not parse or names an unknown extractor or option."""


class ConcurrentChange(ImgdbError):
    """What a statement read changed under it (an index dropped or rebuilt while it was searched):
    the same request, made again, sees the new state."""


class DatabaseError(ImgdbError):
    """The database cannot be reached, started or upgraded."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message: psycopg adds hints on further lines, and imgdb's
    failures are one line (the contract in ``../shared/CONVENTIONS.md``)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def driver_failure(exc: BaseException) -> tuple[str, str] | None:
    """A database driver's failure that is not imgdb's own: ``("unavailable", reason)`` where the
    server cannot be reached or went away, ``("refused", reason)`` where PostgreSQL refused a value
    of the input; None for anything else. The drivers are looked at only where they are loaded
    (a command that never reached the database does not pay for importing them)."""
    import sys

    psycopg, sa_exc = sys.modules.get("psycopg"), sys.modules.get("sqlalchemy.exc")
    cause = getattr(exc, "orig", None) or exc
    if (psycopg and isinstance(exc, psycopg.OperationalError)) or \
            (sa_exc and isinstance(exc, sa_exc.OperationalError)):
        return "unavailable", f"database unavailable: {first_line(cause)}"
    if (psycopg and isinstance(exc, psycopg.DataError)) or (sa_exc and isinstance(exc, sa_exc.DataError)):
        return "refused", f"refused by PostgreSQL: {first_line(cause)}"
    return None
