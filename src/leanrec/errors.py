"""The one error type a user's own mistake raises, whichever stage finds it.

A path that does not exist, a folder that is not a warehouse, a file that is not a checkpoint, a
server that does not answer, a flag out of range: each stage raises its own subclass of
:class:`InputError` (``WarehouseError``, ``CheckpointError``, ``ConfigError`` …) where it finds the
problem, with a message that says what was wrong and what to do. The ``leanrec`` command catches
InputError alone and prints that message as one line with exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """A user's input (a path, a file, a URL, a setting) that cannot be used; the message says why."""
