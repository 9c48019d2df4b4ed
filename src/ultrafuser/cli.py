"""The `ultrafuser` command: one console script, one subcommand per job.

Each area of the package registers its own subcommands through a `register(subparsers)` function in its
`cli` module; this file only collects them. Each subcommand parses, resolves its config and calls one
`run(...)` (design.md §3.4).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

# Areas in the order they appear in `ultrafuser --help`.
_AREAS = [
    "ultrafuser.modeling.cli",  # fuse, generate
    "ultrafuser.training.cli",  # train
    "ultrafuser.data.cli",  # data build / import / generate
    "ultrafuser.eval.cli",  # eval, eval score
    "ultrafuser.serve.cli",  # serve
    "ultrafuser.plan",  # plan
    "ultrafuser.embedded",  # embedded (the main job on the embedded default)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultrafuser",
        description="Fuse specialised language models with a token-level gate (arXiv 2403.08281).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _AREAS:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ultrafuser.config import ConfigError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `ultrafuser eval MODEL --tasks ...` is shorthand for `ultrafuser eval run MODEL --tasks ...`
    if len(argv) > 1 and argv[0] == "eval" and argv[1] not in ("run", "score", "-h", "--help"):
        argv.insert(1, "run")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        if os.environ.get("ULTRAFUSER_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
