"""The ``simstream`` command line.

Each group of commands lives in its own module and registers itself on ``main``; imports of
heavy libraries (TensorFlow, hnswlib) happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import click

from streams.settings import Settings, configuration_markdown


def _settings_epilog() -> str:
    lines = ["\b", "Environment variables (prefix SIMSTREAM_), with defaults:"]
    for var, default, description in Settings.describe():
        lines.append(f"  {var} [{default}]  {description}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
             epilog=_settings_epilog())
def main() -> None:
    """simstream: real-time similar items, substitutes and feeds on Kafka."""


@main.command("settings")
@click.option("--markdown", is_flag=True, help="Print docs/configuration.md (what `make docs` writes).")
def settings_command(markdown: bool) -> None:
    """List every SIMSTREAM_* variable with its default and description."""
    if markdown:
        click.echo(configuration_markdown(), nl=False)
        return
    for var, default, description in Settings.describe():
        click.echo(f"{var}={default}\t{description}")


def _register() -> None:
    from streams.cli import (
        kafka_commands,  # noqa: F401  (registers commands on import)
        ops_commands,  # noqa: F401
    )

    for optional in ("encoder_commands", "eval_commands", "behavior_commands", "learning_commands"):
        try:
            __import__(f"streams.cli.{optional}")
        except ModuleNotFoundError as exc:  # a module that is not written yet
            if exc.name != f"streams.cli.{optional}":
                raise


def _share_epilog(group: click.Group) -> None:
    """Every command shows the environment variables, since every command reads them."""
    for command in group.commands.values():
        command.epilog = command.epilog or group.epilog
        if isinstance(command, click.Group):
            _share_epilog(command)


_register()
_share_epilog(main)
