"""`ultrafuser train CONFIG [key=value ...] [--resume | --resume-from CHECKPOINT] [--force]`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a fused model: stage 1 (gate) then stage 2 (gate + specialists)",
        description="Train a fused model from one YAML config (see configs/train/). Overrides use dotted keys, "
        "e.g. stage1.steps=10 data.max_length=512. Exit codes: 0 done, 2 config/data/checkpoint error, "
        "3 non-finite loss or gradient, 75 stopped by SIGTERM after saving (continue with --resume).",
    )
    p.add_argument("config", help="the run's YAML config (a TrainConfig)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. stage2.steps=100")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints (error if none)")
    p.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint directory")
    p.add_argument("--force", action="store_true",
                   help="resume even though the data, model or hyperparameters differ from the checkpoint's run")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from ultrafuser.config import TrainConfig, load_yaml

    cfg = load_yaml(args.config, TrainConfig, args.overrides)
    from ultrafuser.training.loop import run

    return run(cfg, resume=args.resume, resume_from=args.resume_from, force=args.force)
