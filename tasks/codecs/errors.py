"""The codecs' error types (their own module so that packing, base and the codec modules
can all raise them without importing one another).

`CodecError` is what any codec raises when it cannot do its job: a classical or external
codec that fails or returns bad data, or input that must not be coded. The input problems
are also `ValueError`s, so callers that catch bad input as ValueError keep working.
"""
from __future__ import annotations


class CodecError(RuntimeError):
    """A codec failed or refused its input (bad output, failing command, corrupt data,
    features that cannot be coded)."""


class NonFiniteFeaturesError(CodecError, ValueError):
    """Features with NaN or Inf values: refused before anything is coded, so no NaN can
    reach a bitstream (a NaN has no place in [0, 1] and would poison the normalisation)."""
