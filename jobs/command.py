"""The shape every command's parser shares: a help line, a description and examples (kept as written)."""

from __future__ import annotations

import argparse

RUN_HELP = "the run: output folder or s3://bucket/prefix"


def add_command(
    commands: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """The parser of command ``name``: ``help`` is its line in ``cdam --help``, ``epilog`` (the examples) is
    printed as written."""
    return commands.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_run_command(
    commands: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """``add_command`` for a command that reads a run: its first argument is the run (DEST, as ``args.output``)."""
    parser = add_command(commands, name, help, description, epilog)
    parser.add_argument("output", metavar="DEST", help=RUN_HELP)
    return parser
