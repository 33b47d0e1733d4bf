"""The ``imgdb`` executable: the CLI, started quickly.

A command loads some thousands of modules' worth of objects (SQLAlchemy, psycopg, numpy, typer)
before it does any work, and CPython's cyclic collector would scan that growing heap again and
again while they load, then once more at exit: about a third of a cold ``imgdb search``. The
collector is therefore off while the CLI is imported, and what the imports made is frozen out of
its reach (``gc.freeze``); objects the command itself makes are collected as usual.
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    gc.disable()
    try:
        from imgdb_cli.main import app, spell_out_ray_address
    finally:
        gc.freeze()
        gc.enable()
    app(args=spell_out_ray_address(sys.argv[1:]))
