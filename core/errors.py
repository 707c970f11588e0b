"""The base class of the project's expected errors.

An expected error is a failure caused by what the user gave (a path, a store, a
checkpoint, a config key, a setting) or by how a run went (a diverged loss), whose
message names the file or key and says what to do. The command line reports such
errors in one line, ``Error: <message>``, without a traceback (``--debug`` shows it).
Each layer's own error class derives from ``ExpectedError`` and keeps its builtin base
(``ValueError``, ``RuntimeError``, ...), so callers that catch the builtin still do.
Anything else raised is a bug and keeps its traceback.
"""


class ExpectedError(Exception):
    """A failure the user can act on; the message names the file or key concerned."""


class StoreError(ExpectedError, RuntimeError):
    """A store that is missing, incomplete, or does not match what the caller expects."""
