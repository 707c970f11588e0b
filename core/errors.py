"""Expected errors: failures caused by what the user gave or by how a run went, whose message
names the file or key and says what to do; the command line prints them in one line, without a
traceback. Each layer's error class derives from ``ExpectedError`` and keeps its builtin base
(``ValueError``, ``RuntimeError``, ...), so callers that catch the builtin still do. Anything else
raised is a bug and keeps its traceback."""


class ExpectedError(Exception):
    """A failure the user can act on; the message names the file or key concerned."""


class StoreError(ExpectedError, RuntimeError):
    """A store that is missing, incomplete, or does not match what the caller expects."""
