"""The ``synapse-msc3916`` console script.

Each command group lives next to the code it drives and adds its own sub-commands
through ``register(subparsers)``; this file only dispatches and turns a ``ToolError``
into one line on stderr and exit code 1 (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from synapse_msc3916.homeserver_config import ToolError, connection_errors

COMMAND_MODULES = (
    "synapse_msc3916.freeze_report",
    "synapse_msc3916.storage.tools",
    "synapse_msc3916.storage.scrub",
    "synapse_msc3916.storage.cors",
    "synapse_msc3916.keys_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synapse-msc3916",
        description="Tools for the synapse-msc3916 Synapse module.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # command group not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ToolError as e:
        message = " ".join(str(e).split())  # one line, even for multi-line causes (YAML)
        print(f"synapse-msc3916 {args.command}: error: {message}", file=sys.stderr)
        return 1
    except connection_errors() as e:
        # A database restart or failover mid-run: the run's checkpoints are committed,
        # so the answer is to run it again, not a traceback.
        message = " ".join(str(e).split()) or type(e).__name__
        print(
            f"synapse-msc3916 {args.command}: error: lost the database connection ({message});"
            " progress up to the last checkpoint is kept: run the command again to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"synapse-msc3916 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
