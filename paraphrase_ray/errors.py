"""The one error hierarchy: every problem a user can cause (and fix) derives from ``ParaphraseRayError``.

The CLI turns exactly these into one ``error: ...`` line and exit 2; anything else is a bug in this package
or below it and keeps its traceback (exit 1). Each class also derives from the builtin it replaced, so code
that catches ``ValueError`` / ``RuntimeError`` around our calls keeps working.
"""

from __future__ import annotations


class ParaphraseRayError(Exception):
    """Base of every project error; its message names the problem and, where one exists, the fix."""


class ConfigError(ParaphraseRayError, ValueError):
    """A user-facing configuration problem (bad key, bad value, contradictory options)."""


class InputError(ParaphraseRayError, ValueError):
    """Texts or arguments handed to the library that cannot be used (empty text, wrong type, lengths that differ)."""


class DataError(ParaphraseRayError, ValueError):
    """A data source cannot be used; the message names it and the problem."""


class PromptFileError(ParaphraseRayError, ValueError):
    """A prompt directory is missing, corrupt, or does not fit the model."""


class HubError(ParaphraseRayError, ValueError):
    """The Hub cannot be reached, the token is missing, or the repo id is malformed: the message says the fix."""


class ModelLoadError(ParaphraseRayError, RuntimeError):
    """A model (base LM or embedder) could not be loaded; the message says what was tried and how to fix it."""


class GenerationStopped(ParaphraseRayError, RuntimeError):
    """Generation stopped on purpose: every row of the pass belongs to a request that timed out or was abandoned
    (Serve's ``admission.StopHook``); never a failure of the model."""
