"""The one base class of the errors a user can cause or fix.

`mighty` prints a `MightyError` as one line (`error: ...`) and exits 2; so it does for the operating
system's errors a user can fix (permission denied, no space left, not a directory). Anything else
is a bug and keeps its traceback. `mighty --debug VERB ...` shows the traceback of ours too.

Each module's error derives from `MightyError` and from the built-in class it was before
(`ValueError` for bad input, `RuntimeError` for a run that cannot go on), so `except ValueError`
in callers still works. This module imports nothing, so every layer can use it.
"""


class MightyError(Exception):
    """A user or environment error whose message says what is wrong and what to do."""


class UsageError(MightyError, ValueError):
    """An option or argument out of its range, or options that do not go together."""


class OutputError(MightyError, ValueError):
    """An output path that cannot be written as asked (it holds something else, or is an input)."""


class CheckpointError(MightyError, ValueError):
    """A checkpoint we cannot load or write; the message names the file and what is wrong."""
