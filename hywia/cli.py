"""`hywia` console script: dispatches each verb to its own module in `hywia.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hywia import __version__
from hywia.errors import HywiaError

VERBS = {
    "prune": "prune a model with HyWIA and export a dense checkpoint",
    "serve": "serve a (pruned) model on an OpenAI-compatible API with metrics",
    "eval": "evaluate perplexity and zero-shot accuracy of a model or export",
    "bench": "benchmark a running server (latency) or pruning methods (quality)",
}


def _load_verb(name: str):
    try:
        return importlib.import_module(f"hywia.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"hywia.commands.{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hywia", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hywia {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, help_text in VERBS.items():
        module = _load_verb(name)
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        if module is not None:
            module.add_arguments(sub)
        sub.set_defaults(_module=module, _verb=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verb is None:
        parser.print_help()
        return 2
    if args._module is None:
        print(f"hywia {args._verb}: this verb is not available in this version yet.", file=sys.stderr)
        return 2
    try:
        return int(args._module.run(args) or 0)
    except HywiaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
