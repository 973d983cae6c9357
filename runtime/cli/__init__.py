"""The ``onboard`` command. Each subcommand lives in its own module with ``register`` and ``run``.

Modules are imported only when their command runs, so ``onboard info`` on board never pays for
(or needs) what ``onboard compile`` on the ground imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TextIO

from onboard.runtime.errors import OnboardError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("onboard.runtime.cli.run", "the flight pipeline: frames in, plan, products and "
            "queue out (default: the bundled sample)"),
    "info": ("onboard.runtime.cli.info", "describe a scene, an OSCD city folder or a bundle"),
    "predict": ("onboard.runtime.cli.predict", "run one bundle over one scene, tile by tile"),
    "compile": ("onboard.runtime.cli.compile", "prune, quantise, verify a model into a bundle"),
    "replay": ("onboard.runtime.cli.replay", "ground: the flight pipeline over an archive on "
               "Dask, places in parallel, then every pass planned"),
    "ground": ("onboard.runtime.cli.ground", "the ground side of the CFDP downlink: receive, "
               "verify, store once, decode telemetry"),
    "sign": ("onboard.runtime.cli.sign", "sign bundles with an Ed25519 key, make keys, check"),
    "keys": ("onboard.runtime.cli.keys", "make and list Ed25519 bundle-signing keys"),
    "bench": ("onboard.runtime.cli.bench", "engines x precisions x threads with their peers, "
              "end to end, hardware-in-loop"),
    "serve": ("onboard.runtime.cli.serve", "score frames received over TCP (hardware-in-loop)"),
    "uplink": ("onboard.runtime.cli.uplink", "stage, verify, activate and roll back uplinked "
               "bundles and configs"),
}


def _version() -> str:
    try:
        return version("onboard")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onboard", description="Edge inference runtime for Earth-observation satellites."
    )
    parser.add_argument("--version", action="version", version=f"onboard {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        importlib.import_module(module).register(command)
    return parser


def _warning_printer(command: str, fallback: Callable[..., None]) -> Callable[..., None]:
    """Show a config warning as one line, ``onboard COMMAND: warning: ...``; any other warning
    as Python would."""
    from onboard.runtime.config import ConfigWarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if issubclass(category, ConfigWarning):
            print(f"onboard {command}: warning: {message}", file=file or sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
            return int(importlib.import_module(args._module).run(args) or 0)
    except OnboardError as error:
        print(f"onboard {args.command}: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`onboard info ... | head`): not an error of ours. Point stdout
        # at nothing so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
