"""What a run reports: one log line per step, `metrics.jsonl`, `samples.jsonl`, a progress bar, TensorBoard.

metrics.jsonl, one JSON object per optimizer step:
    step, stage, stage_step, loss (token mean over the step's reply tokens, all processes),
    loss_by_domain {domain: token mean}, gate {domain: {specialist: mean weight over that domain's reply
    tokens}}, lr, grad_norm (before clipping), tokens (reply tokens), seq_tokens (tokens over every
    specialist's sequence), tok_per_s (reply tokens per second), seconds, rewalked [domains].
samples.jsonl: step, stage and the example ids of the step, per domain (resume tests check that the
    order has no duplicate and no skip).

On resume both files are cut back to the checkpoint's step (lines written after it, before the run
stopped, belong to steps that are trained again).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("ultrafuser.training")

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"


def _truncate(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    os.replace(tmp, path)


def format_step(rec: dict, total: int, specialists: list[str]) -> str:
    doms = " ".join(f"{d} {v:.4f}" for d, v in rec["loss_by_domain"].items())
    gate = " ".join(f"{d}:" + "/".join(f"{rec['gate'][d][s]:.2f}" for s in specialists) for d in rec["gate"])
    line = (f"step {rec['step']}/{total} s{rec['stage']} loss {rec['loss']:.4f} | {doms} | gate {gate} | "
            f"lr {rec['lr']:.2e} | {rec['tok_per_s']:.0f} tok/s")
    if rec.get("rewalked"):
        line += f" | re-walked {','.join(rec['rewalked'])}"
    return line


class Metrics:
    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, resume_step: int, tensorboard: bool,
                 log_every: int, specialists: list[str]):
        self.enabled = enabled
        self.total = total_steps
        self.log_every = log_every
        self.specialists = specialists
        self.tb = None
        self.bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, SAMPLES):
            _truncate(out_dir / name, resume_step)
        self.metrics = open(out_dir / METRICS, "a", encoding="utf-8")
        self.samples = open(out_dir / SAMPLES, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed; skipping TensorBoard logging (pip install tensorboard)")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def step(self, rec: dict, ids: dict[str, list[str]]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        self.samples.write(json.dumps({"step": rec["step"], "stage": rec["stage"], "ids": ids}) + "\n")
        self.samples.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", rec["loss"], rec["step"])
            self.tb.add_scalar("lr", rec["lr"], rec["step"])
            for d, v in rec["loss_by_domain"].items():
                self.tb.add_scalar(f"loss/{d}", v, rec["step"])
            for d, ws in rec["gate"].items():
                for s, w in ws.items():
                    self.tb.add_scalar(f"gate/{d}/{s}", w, rec["step"])
        if rec["step"] % self.log_every == 0 or rec["step"] == self.total:
            self.say(format_step(rec, self.total, self.specialists))
        elif rec["rewalked"]:
            self.say(f"step {rec['step']}: sampler re-walks {', '.join(rec['rewalked'])} (exhausted) in a new order")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", stage=rec["stage"])

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            log.info(line)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        self.samples.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
