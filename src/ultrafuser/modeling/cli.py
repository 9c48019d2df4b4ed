"""`ultrafuser fuse` and `ultrafuser generate` (names and flags are a contract; see README)."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("fuse", help="specialists -> a fused-model directory (gate untrained or fixed)")
    p.add_argument(
        "--specialist",
        action="append",
        default=[],
        metavar="DOMAIN=PATH[+ADAPTER]",
        help="a specialist: a model dir or hub id, or BASE+ADAPTER for a PEFT LoRA adapter (repeat)",
    )
    p.add_argument("--template", action="append", default=[], metavar="DOMAIN=TEMPLATE",
                   help="template for a specialist: a preset (ultralm, llama2-inst, alpaca), a string with "
                        "{instruction}, or a Jinja chat template; default: the tokenizer's chat template")
    p.add_argument("--gate", default="learned", help="learned | uniform | onehot:DOMAIN (default learned)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", help="a YAML fuse config (specialists, gate); flags add to it")
    p.add_argument("--seed", type=int, default=0, help="seed of the gate's initialisation")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run_fuse)

    g = sub.add_parser("generate", help="generate with a fused model (streams text)")
    g.add_argument("model_dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", help="a system message")
    g.add_argument("--no-template", action="store_true", help="feed the prompt text to every specialist as-is")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeat)")
    g.add_argument("--device", help="move every specialist to this device (e.g. cuda)")
    g.add_argument("--json", action="store_true",
                   help='one JSON object per generated token: {"id", "text", "weights"}; nothing else on stdout')
    g.add_argument("--show-gate", action="store_true", help="print each token with its specialist weights")
    g.set_defaults(func=run_generate)


def _parse_specialist(item: str) -> dict:
    if "=" not in item:
        from ultrafuser.config import ConfigError

        raise ConfigError(f"--specialist {item!r} must look like DOMAIN=PATH or DOMAIN=BASE+ADAPTER")
    domain, ref = item.split("=", 1)
    base, _, adapter = ref.partition("+")
    return {"domain": domain.strip(), "path": base, "adapter": adapter or None}


def build_fuse_config(args):
    import yaml

    from ultrafuser.config import ConfigError, FuseConfig, GateConfig, format_validation_error

    tree: dict = {}
    if args.config:
        with open(args.config) as f:
            tree = yaml.safe_load(f) or {}
    specs = list(tree.get("specialists", []))
    for item in args.specialist:
        d = _parse_specialist(item)
        d.update({"dtype": args.dtype, "device": args.device})
        specs.append(d)
    templates = {}
    for item in args.template:
        if "=" not in item:
            raise ConfigError(f"--template {item!r} must look like DOMAIN=TEMPLATE")
        k, v = item.split("=", 1)
        templates[k] = v.encode().decode("unicode_escape") if "\\n" in v else v
    domains = [s.get("domain") for s in specs]
    for k in templates:
        if k not in domains:
            raise ConfigError(f"--template {k}=...: no specialist has domain {k!r} (domains: {domains})")
    specs = [{**s, "template": templates.get(s.get("domain"), s.get("template"))} for s in specs]
    tree["specialists"] = specs
    if args.gate != "learned" or "gate" not in tree:
        tree["gate"] = GateConfig.parse(args.gate).model_dump()
    from pydantic import ValidationError

    try:
        return FuseConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, args.config or "(command line)")) from None


def run_fuse(args) -> int:
    """Check the specialists (paths, tokenizers, templates) without loading their weights, then write the
    fused directory: config + a freshly initialised gate (untrained, = uniform averaging) or a fixed gate."""
    from ultrafuser.config import ConfigError
    from ultrafuser.modeling.fused import fresh_gate_state, save_fused_dir
    from ultrafuser.modeling.specialists import (
        check_tokenizers,
        load_tokenizer,
        read_model_config,
        resolve_model_path,
    )
    from ultrafuser.modeling.templates import PromptRenderer

    config = build_fuse_config(args)
    toks, rows, hidden = [], [], []
    for s in config.specialists:
        path = resolve_model_path(s.path)
        mc = read_model_config(path, s)
        tok = load_tokenizer(path, s)
        PromptRenderer(s.template, tok, s.turn_separator).segments([{"role": "user", "content": "x"}])
        if s.adapter:
            from pathlib import Path

            if not (Path(s.adapter) / "adapter_config.json").is_file():
                raise ConfigError(f"adapter {s.adapter!r} of specialist {s.domain!r} has no adapter_config.json")
        toks.append(tok)
        rows.append(int(mc["vocab_size"]))
        hidden.append(int(mc["hidden_size"]))
    vocab = check_tokenizers(toks, config.domains, rows)
    gate = fresh_gate_state(config, hidden, args.seed)
    save_fused_dir(args.out, config, gate, extra={"vocab_size": vocab, "hidden_sizes": hidden})
    print(f"wrote {args.out}: {len(config.specialists)} specialists ({', '.join(config.domains)}), "
          f"gate {config.gate.mode}, shared vocabulary {vocab}", file=sys.stderr)
    return 0


def run_generate(args) -> int:
    from ultrafuser.modeling.fused import FusedModel
    from ultrafuser.modeling.generation import SamplingParams, stream

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    _quiet_transformers()
    model = FusedModel.from_pretrained(args.model_dir)
    if args.device:
        model.to(args.device)
    if args.no_template:
        prompt = model.encode_prompt(args.prompt, use_template=False)
    else:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = model.encode_prompt(msgs)
    tok = model.response_tokenizer
    out = sys.stdout
    for events in stream(model, [prompt], params, return_weights=True):
        for e in events:
            if args.json:
                if not e.is_eos:
                    out.write(json.dumps({"id": e.token_id, "text": tok.decode([e.token_id]), "weights": e.weights}) + "\n")
            elif args.show_gate:
                if not e.is_eos:
                    w = " ".join(f"{d}={v:.2f}" for d, v in e.weights.items())
                    out.write(f"{tok.decode([e.token_id])!r:>16}  {w}\n")
            else:
                out.write(e.text)
            out.flush()
    if not args.json and not args.show_gate:
        out.write("\n")
    return 0


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
