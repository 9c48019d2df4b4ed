"""`ultrafuser data build | import | generate`: thin entry points over the data library.

    ultrafuser data build CONFIG [--plan-only] [key.path=value ...]
    ultrafuser data import --format alpaca|mathinstruct|sharegpt IN --out OUT [--domain D]
    ultrafuser data generate math|code --n N --seed S --out FILE [--split train|heldout] [--held-out A,B]

Exit codes: 0 done; 1 build incomplete (some requests failed or were not sent: run it again); 2 user error.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _build(args: argparse.Namespace) -> int:
    from ultrafuser.config import load_yaml
    from ultrafuser.data.buildconfig import BuildConfig
    from ultrafuser.data.pipeline import run_build

    cfg = load_yaml(args.config, BuildConfig, args.overrides)
    report = run_build(cfg, plan_only=args.plan_only)
    return 0 if report is None or report.complete else 1


def _import(args: argparse.Namespace) -> int:
    from ultrafuser.data.importers import import_file

    rep = import_file(args.input, args.out, fmt=args.format, domain=args.domain)
    print(rep.summary())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ultrafuser.config import ConfigError
    from ultrafuser.data.records import write_records

    held = [s.strip() for s in args.held_out.split(",") if s.strip()] if args.held_out is not None else None
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: give a positive number of items")
    if args.kind == "math":
        from ultrafuser.data.generators.math_problems import generate_math

        recs = generate_math(args.n, seed=args.seed, split=args.split, held_out_templates=held)
    else:
        from ultrafuser.data.generators.code_tasks import generate_code

        recs = generate_code(args.n, seed=args.seed, split=args.split, held_out_templates=held)
    write_records(recs, Path(args.out))
    fams = sorted({r.provenance["family"] for r in recs})
    print(
        f"wrote {len(recs)} {args.kind} records ({args.split}, seed {args.seed}, {len(fams)} families) to {args.out}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="build, import or generate instruction data",
        description="Build (teacher over an OpenAI-compatible API), import or generate data.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    b = sub.add_parser("build", help="run an UltraChat-2-style construction pipeline from one YAML config")
    b.add_argument("config", help="build config YAML (see configs/data/)")
    b.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. seed=1 teacher.concurrency=4")
    b.add_argument("--plan-only", action="store_true", help="print the plan (requests per stage) and exit")
    b.set_defaults(func=_build)

    i = sub.add_parser("import", help="convert Alpaca / MathInstruct / ShareGPT files into the record format")
    i.add_argument("--format", required=True, choices=["alpaca", "mathinstruct", "sharegpt"])
    i.add_argument("input", help=".json (array) or .jsonl file")
    i.add_argument("--out", required=True, help="output .jsonl or .parquet")
    i.add_argument(
        "--domain", default=None, help="domain for every record (default: by rule, see importers.py)"
    )
    i.set_defaults(func=_import)

    g = sub.add_parser("generate", help="offline generators: math word problems or Python function tasks")
    g.add_argument("kind", choices=["math", "code"])
    g.add_argument("--n", type=int, required=True, help="number of records")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="output .jsonl or .parquet")
    g.add_argument(
        "--split",
        choices=["train", "heldout"],
        default="train",
        help="train: families not held out; heldout: only the held-out families",
    )
    g.add_argument(
        "--held-out",
        default=None,
        metavar="FAMILY,...",
        help="override the held-out template families (comma-separated; '' for none)",
    )
    g.set_defaults(func=_generate)
