"""How commands speak: one JSON document on stdout with ``--json``, tables otherwise; progress and
errors on stderr; a one-line reason and a non-zero exit on failure (a traceback only with ``--debug``)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from imgdb.errors import ImgdbError

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True)
T = TypeVar("T")


def emit_json(document: Any) -> None:
    """Write exactly one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def say(line: str) -> None:
    """One line on stderr, never wrapped (rich would fold long paths and reasons onto two lines)."""
    print(line, file=sys.stderr, flush=True)


class _OneLine(logging.Handler):
    """The library's warnings (``logging.getLogger("imgdb")``) as ``warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        say(f"{record.levelname.lower()}: {record.getMessage()}")


def _show_library_warnings() -> None:
    log = logging.getLogger("imgdb")
    if not any(isinstance(h, _OneLine) for h in log.handlers):
        log.addHandler(_OneLine(logging.WARNING))
        log.propagate = False


def guarded(debug: bool, action: Callable[[], T]) -> T:
    """Run a command body, turning expected failures into one line on stderr and exit status 1."""
    _show_library_warnings()
    if debug:
        return action()
    try:
        return action()
    except ImgdbError as exc:
        say(f"error: {exc}")

    except KeyboardInterrupt:
        say("interrupted: work committed so far is kept")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the contract wants one line, not a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        known = _database_failure(exc)
        say(f"error: {known}" if known else
            f"internal error: {type(exc).__name__}: {message} (rerun with --debug for details)")
    raise typer.Exit(1)


def _database_failure(exc: Exception) -> str | None:
    """The reason of a failure that is the database's (unreachable) or the input's (a value
    PostgreSQL refused), not imgdb's; None for anything else. The drivers are only looked at
    when they are loaded already (``imgdb --help`` does not pay for them)."""
    import sys

    if "sqlalchemy" not in sys.modules:
        return None
    import psycopg
    import sqlalchemy as sa

    from imgdb.db.schema import first_line

    cause = getattr(exc, "orig", None) or exc
    if isinstance(exc, (sa.exc.OperationalError, psycopg.OperationalError)):
        return f"database unavailable: {first_line(cause)}"
    if isinstance(exc, (sa.exc.DataError, psycopg.DataError)):
        return f"refused by PostgreSQL: {first_line(cause)}"
    return None


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (only on a terminal), handed out as a ``(done, total)`` callback."""
    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=stderr, transient=False, disable=not stderr.is_terminal)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update
