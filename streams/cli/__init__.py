"""The ``simstream`` command line.

Each group of commands lives in its own module and registers itself on ``main``
(``streams/cli/group.py``); imports of heavy libraries (TensorFlow, hnswlib) happen inside the
commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import click

from streams.cli import (  # noqa: F401  (each registers its commands on import)
    behavior_commands,
    duplicates_commands,
    encoder_commands,
    eval_commands,
    kafka_commands,
    learning_commands,
    offers_commands,
    ops_commands,
)
from streams.cli.group import main

__all__ = ["main"]


def share_epilog(group: click.Group) -> None:
    """Every command shows the environment variables, since every command reads them."""
    for command in group.commands.values():
        command.epilog = command.epilog or group.epilog
        if isinstance(command, click.Group):
            share_epilog(command)


share_epilog(main)
