"""The blocking Kafka reads (``streams/kafka_io.py``): what they need to be fast enough at scale."""

from __future__ import annotations

import os

from kafka.record import util
from kafka.record._crc32c import crc as pure_python_crc


def test_fetched_batches_are_checked_with_the_c_crc32c() -> None:
    """kafka-python checks every fetched batch's CRC-32C. Its pure-Python fallback reads about
    8 MB/s, which made a restart at 100k products spend minutes reading the list topics; the
    ``crc32c`` dependency is what it uses instead, with the same checksums."""
    assert util.calc_crc32c.__defaults__ is not None
    used = util.calc_crc32c.__defaults__[0]
    assert used is not pure_python_crc, "install crc32c (pyproject.toml): kafka-python fell back to Python"
    data = os.urandom(4096)
    assert used(memoryview(data)) == pure_python_crc(memoryview(data))
