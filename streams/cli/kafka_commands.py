"""Kafka-facing commands: worker, topics, load-catalog, tail, produce."""

from __future__ import annotations
