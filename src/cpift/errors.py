"""Every error cpift raises for bad input, in one place.

Each subclasses a builtin so callers can catch broadly (``except ValueError``); the CLI turns any
``CpiftError`` into one line on stderr and exit code 2. Messages name the file, tensor or field and
say how to fix the problem.
"""

from __future__ import annotations


class CpiftError(Exception):
    """Base of every user-facing cpift error."""


class ParameterError(CpiftError, ValueError):
    """A merge parameter (t, weights, density, lambda, p, ...) is out of range or of the wrong count."""


class ConfigError(CpiftError, ValueError):
    """A recipe / YAML config is malformed; the message names the field."""


class CheckpointError(CpiftError, OSError):
    """A model directory or shard is missing, truncated or malformed."""


class MismatchError(CpiftError, ValueError):
    """Inputs disagree on tensor names or shapes."""


class NonFiniteError(CpiftError, ValueError):
    """An input tensor holds NaN or Inf (pass allow_nonfinite=True / --allow-nonfinite to proceed)."""


class OutputError(CpiftError, OSError):
    """The output path exists (without overwrite) or cannot be written."""


class DataError(CpiftError, ValueError):
    """A training or evaluation dataset is missing, malformed or unusable; the message names file:line."""


class HubError(CpiftError, OSError):
    """A Hugging Face Hub repo or revision is missing or inaccessible, or the Hub cannot be reached
    (offline without a cached copy)."""


class TrainingError(CpiftError, ArithmeticError):
    """Training diverged: a non-finite loss, gradient or weight; the message names the step."""


class BenchError(CpiftError, RuntimeError):
    """A command that ``cpift-merge bench`` measures failed; the message names it and its last line."""


class UnsafeOutputError(OutputError):
    """The output would replace or lie inside something cpift did not write: an input, a user's
    directory, a file, FIFO or device, ``/``, the current or the home directory (merge/io/publish.py)."""


class OutputBusyError(OutputError):
    """Another cpift run is writing the same output right now (its partial directory is locked)."""
