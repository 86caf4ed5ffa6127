"""The ``privgrad`` command line.

Each subcommand lives in its own module with two functions, ``add_arguments(parser)`` and
``run(args) -> int`` (a module serving several subcommands may define ``add_arguments_for(name,
parser)`` and ``run_for(name, args)`` instead); the table below is the whole list. Subcommand
modules import torch inside ``run`` only, so ``privgrad epsilon`` never imports torch. A
[`PrivgradError`][privgrad.errors.PrivgradError] raised by any subcommand (bad input) is printed as
one line and exits with status 2. ``privgrad --version`` prints the installed version.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from privgrad import __version__
from privgrad.errors import PrivgradError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("privgrad.cli.demo", "train a small model privately on bundled real data"),
    "epsilon": ("privgrad.cli.accounting", "epsilon of a training run (PLD or RDP accountant)"),
    "noise": ("privgrad.cli.accounting", "noise multiplier that reaches a target epsilon"),
    "audit": ("privgrad.cli.audit", "audit privgrad's privacy empirically on a built-in model (one run)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privgrad", description="Differentially private training for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"privgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        module = importlib.import_module(module_name)
        add = getattr(module, "add_arguments_for", None)
        if add is not None:
            add(name, sp)
        else:
            module.add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    run = getattr(module, "run_for", None)
    try:
        if run is not None:
            return int(run(args.command, args) or 0)
        return int(module.run(args) or 0)
    except (PrivgradError, ImportError) as e:  # bad input or a missing extra: one line, exit 2
        print(f"privgrad {args.command}: error: {e}", file=sys.stderr)
        return 2
