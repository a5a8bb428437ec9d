"""The ``simstream`` click group and its ``settings`` command; every other command module
registers itself on ``main`` (``streams/cli/__init__.py`` imports them all)."""

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
