"""``python -m streams.cli``: the ``simstream`` command (the worker starts ``learn`` this way)."""

from streams.cli import main

main()
