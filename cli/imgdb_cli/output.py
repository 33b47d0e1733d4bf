"""How commands speak: one JSON document on stdout with ``--json``, tables otherwise; progress and
errors on stderr; a one-line reason and a non-zero exit on failure (a traceback only with ``--debug``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

import imgdb

# No console markup: paths and metadata are the user's, and `x[/bogus]y.jpg` is a file name.
stdout = Console(soft_wrap=True, markup=False)
stderr = Console(stderr=True, markup=False)
T = TypeVar("T")


def emit_json(document: Any) -> None:
    """Write exactly one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def shorten(path: str, width: int) -> str:
    """A path cut to ``width`` characters from its folders, never its file name (what a person
    looks for): ``…/museum/images/bbdd_00001.jpg``."""
    if len(path) <= width:
        return path
    folder, sep, name = path.rpartition("/")
    room = width - len(name) - 2
    return f"…{folder[-room:]}{sep}{name}" if room > 0 and sep else f"…{name[-(width - 1):]}"


def say(line: str) -> None:
    """One line on stderr, never wrapped (rich would fold long paths and reasons onto two lines)."""
    print(line, file=sys.stderr, flush=True)


class _OneLine(logging.Handler):
    """The library's news (``logging.getLogger("imgdb")``) as lines on stderr: what it is doing
    (INFO, such as preparing a model on first use) as it is, warnings as ``warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        say(message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}")


def _show_library_warnings() -> None:
    log = logging.getLogger("imgdb")
    if not any(isinstance(h, _OneLine) for h in log.handlers):
        log.addHandler(_OneLine(logging.INFO))
        log.setLevel(logging.INFO)
        log.propagate = False


def guarded(debug: bool, action: Callable[[], T]) -> T:
    """Run a command body, turning expected failures into one line on stderr and exit status 1."""
    _show_library_warnings()
    if debug:
        return action()
    try:
        return action()
    except imgdb.ImgdbError as exc:
        say(f"error: {exc}")

    except KeyboardInterrupt:
        say("interrupted: work committed so far is kept")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the contract wants one line, not a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        known = imgdb.driver_failure(exc)
        say(f"error: {known[1]}" if known else
            f"internal error: {type(exc).__name__}: {message} (rerun with --debug for details)")
    raise typer.Exit(1)


#: Seconds between progress lines where stderr is not a terminal (a log file, a pipe, CI).
LOG_EVERY_S = 10.0
#: A rate is given once a step has run this long (before, a count over an instant says nothing).
MIN_RATE_S = 1.0


def seconds_left(elapsed: float, done: int, total: int) -> float | None:
    """The time left at the average rate since the start. Work that comes in batches (a model's)
    makes the rate of the last seconds swing from nothing to hundreds per second, and an estimate
    made from it swings with it; the average since the start does not."""
    if done <= 0 or total <= done:
        return None
    return elapsed / done * (total - done)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """Progress on stderr, handed out as a ``(done, total)`` callback: a bar on a terminal;
    elsewhere a line every LOG_EVERY_S seconds and one at the end, so that a piped or logged run
    of many minutes says how far it is. A count that starts again (a new total, or fewer done)
    is a new step of the same job: its rate and time left are timed from then."""
    begun = time.monotonic()
    seen = {"done": 0, "total": 0, "started": begun, "said": begun, "last": begun}

    def track(done: int, total: int) -> None:
        # A new step began when the previous count was given (or the job, for the first): its first
        # count covers the work since then, not the instant it was reported in.
        now = time.monotonic()
        if total != seen["total"] or done < seen["done"]:
            seen["started"] = seen["last"]
        seen.update(done=done, total=total, last=now)

    def left(done: int, total: int) -> str:
        estimate = seconds_left(time.monotonic() - seen["started"], done, total)
        return "" if estimate is None else f"about {_duration(estimate)} left"

    if stderr.is_terminal:
        bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[left]}"),
                       console=stderr, transient=False)
        task = bar.add_task(description, total=None, left="")

        def show(done: int, total: int) -> None:
            track(done, total)
            bar.update(task, completed=done, total=total, left=left(done, total))

        with bar:
            yield show
        return

    def line(done: int, total: int) -> str:
        elapsed = time.monotonic() - seen["started"]
        share = f" ({100 * done // total}%)" if total else ""
        rate = f", {done / elapsed:.1f}/s" if elapsed >= MIN_RATE_S else ""
        rest = left(done, total)
        return f"{description}: {done}/{total}{share}{rate}" + (f", {rest}" if rest else f" in {_duration(elapsed)}")

    def update(done: int, total: int) -> None:
        track(done, total)
        if time.monotonic() - seen["said"] >= LOG_EVERY_S:
            seen["said"] = time.monotonic()
            say(line(done, total))

    yield update
    if seen["done"] and time.monotonic() - begun >= LOG_EVERY_S:
        say(line(seen["done"], seen["total"]))


@contextmanager
def training_bars() -> Iterator[tuple[Callable[[int, int], None], Callable[[int, int, float, "float | None"], None]]]:
    """Progress of a fine-tuning as two callbacks: ``(done, total)`` for reading images and making
    views, ``(epoch, epochs, loss, seconds left)`` for the epochs. On a terminal, one live display
    with two bars (two displays would redraw over each other), the second showing the loss and the
    time left;
    elsewhere the steps as :func:`progress_bar` lines and a line per epoch (epochs take minutes)."""

    def info(loss: float, left: float | None) -> str:
        return f"loss {loss:.4f}" + (f", about {_duration(left)} left" if left else "")

    if stderr.is_terminal:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), console=stderr, transient=False)
        steps = bar.add_task("preparing", total=None, info="")
        epochs = bar.add_task("training", total=None, info="", visible=False)
        with bar:
            yield (lambda done, total: bar.update(steps, completed=done, total=total),
                   lambda epoch, total, loss, left: bar.update(epochs, visible=True, completed=epoch, total=total,
                                                               info=info(loss, left)))
        return
    with progress_bar("preparing") as on_progress:
        yield on_progress, lambda epoch, total, loss, left: say(f"training: epoch {epoch}/{total}, {info(loss, left)}")
