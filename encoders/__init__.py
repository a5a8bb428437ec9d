"""Text encoders: the ``Encoder`` port and its adapters (in-process SavedModel, TF Serving gRPC)."""
