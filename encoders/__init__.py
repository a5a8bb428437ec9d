"""Text encoders: the ``Encoder`` port and its adapters (in-process SavedModel, TF Serving gRPC, hashing twin).

Importing this package is cheap; TensorFlow loads only when an adapter needs it.
"""

from encoders.base import EMBEDDING_DIM, Embeddings, Encoder, InvalidText
from encoders.factory import create_encoder

__all__ = ["EMBEDDING_DIM", "Embeddings", "Encoder", "InvalidText", "create_encoder"]
