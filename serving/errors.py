"""The one error hierarchy of simstream.

Every error the project raises on purpose derives from ``SimstreamError`` and says, in its
message, what the caller can do next. Narrow subclasses let callers (and the dead-letter
path) tell bad input apart from an outage.
"""

from __future__ import annotations


class SimstreamError(Exception):
    """Root of every error simstream raises on purpose."""


class InvalidInput(SimstreamError):  # noqa: N818 (public name)
    """An event or argument is malformed. Retrying the same input will fail again."""


class InvalidChange(InvalidInput):
    """A product change that is well-formed JSON but breaks a catalog rule."""


class InvalidVector(InvalidInput):
    """A vector of the wrong dimension, with NaN or Inf, or with zero norm."""


class SnapshotError(SimstreamError):
    """A snapshot could not be written, or a snapshot file is corrupt or truncated."""


class ListsDiffer(SnapshotError):  # noqa: N818 (public name)
    """Saved lists differ from a recomputation of their buffers: rebuild instead of loading them."""


class EncoderError(SimstreamError):
    """The encoder failed."""


class EncoderUnavailable(EncoderError):  # noqa: N818 (public name)
    """The encoder could not be reached within its deadline and retries. Try again later."""


class ModelMismatch(EncoderError):  # noqa: N818 (public name)
    """The served model's signature, dimension or version is not what simstream expects."""


class ConfigurationError(SimstreamError):
    """A setting is missing or inconsistent; the message names the variable to fix."""


class MissingVector(InvalidInput):
    """A new product, or a product whose text changed, arrived without its embedding.

    Call ``Recommender.needs_embedding(change)`` first and pass the encoder's vector.
    """
