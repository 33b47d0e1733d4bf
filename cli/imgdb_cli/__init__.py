"""The ``imgdb`` command line: a thin typer shell over the :mod:`imgdb` library."""
