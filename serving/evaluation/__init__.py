"""Offline evaluation of the core's scoring: product matching (``matching``, ``matching_eval``),
related-products lists (``related_eval``) and session-based behaviour (``sessions_eval``).
Never imported by the worker."""
