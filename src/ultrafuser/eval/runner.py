"""`ultrafuser eval run MODEL --tasks … --out DIR`: the fused model and its baselines side by side.

Plan, then execute: every (model variant, task) pair is a unit of work whose per-sample results are appended
to `DIR/generations/<variant>/<task>.jsonl` as they finish, so an interrupted run resumes where it stopped
and a finished one recomputes its report from the cache without generating anything. Variants come from one
loaded fused model through the same code path (`FusedModel.gate_mode`): each specialist alone
(`specialist:DOMAIN`, a one-hot gate), uniform logit averaging (`uniform`), and the trained gate (`fused`).

The report (`report.py`) is computed only from the cached files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ultrafuser.config import ConfigError
from ultrafuser.eval.tasks import Sample, Task, get_tasks

log = logging.getLogger(__name__)


def variant_gate(variant: str) -> str:
    if variant == "fused":
        return "learned"
    if variant == "uniform":
        return "uniform"
    if variant.startswith("specialist:"):
        return "onehot:" + variant.split(":", 1)[1]
    raise ConfigError(f"unknown model variant {variant!r}: use fused, uniform or specialist:DOMAIN")


def default_variants(model) -> list[str]:
    out = [f"specialist:{d}" for d in model.domains] + ["uniform"]
    if model.gate is not None:
        out.append("fused")
    return out


def _read_cache(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.is_file():
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line after a crash: that sample is redone
                    continue
                done[row["id"]] = row
    return done


def _append(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
    with open(path, "a") as f:
        if torn:  # a crash mid-line: end that (ignored) line so new rows start on their own
            f.write("\n")
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())


def _tf_rows(z: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: list[Sample]) -> list[dict]:
    """Per-sample token accuracy, summed NLL and mean gate weights from fused logits z (B, J, V) and weights w."""
    labels = labels.to(z.device)
    mask = labels != -100
    pred = z.argmax(-1)
    nll = torch.nn.functional.cross_entropy(z.transpose(1, 2), labels.clamp(min=0), reduction="none")
    rows = []
    for b, s in enumerate(chunk):
        m = mask[b]
        rows.append({
            "id": s.id,
            "correct": int((pred[b][m] == labels[b][m]).sum()),
            "tokens": int(m.sum()),
            "nll_sum": float(nll[b][m].sum()),
            "gate_mean": w[b][m].mean(0).tolist(),
        })
    return rows


@torch.no_grad()
def _teacher_forced(model, samples: list[Sample], batch_size: int) -> list[dict]:
    rows = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = model.collate([model.align(s.messages) for s in chunk])
        out = model(batch)
        rows += _tf_rows(out.logits, out.gate_weights, batch.labels, chunk)
    return rows


def _length_batches(samples: list[Sample], lens: dict[str, int], batch_size: int,
                    waste: float = 1.25) -> list[list[Sample]]:
    """Batches of at most `batch_size` samples of similar length `lens[id]` (sorted), each closed early when
    padding would make it cost more than `waste` x its real tokens: a teacher-forced pass costs padded tokens (the
    embedded code set's conversations run from 290 to 630 tokens). Rows are cached by id: order does not matter."""
    out: list[list[Sample]] = []
    for s in sorted(samples, key=lambda s: lens[s.id]):
        cur = out[-1] if out else None
        if cur and len(cur) < batch_size and lens[s.id] * (len(cur) + 1) <= waste * sum(lens[x.id] for x in cur + [s]):
            cur.append(s)
        else:
            out.append([s])
    return out


@torch.no_grad()
def _teacher_forced_all_variants(model, variants: list[str], task: Task, samples: list[Sample], out_dir: Path,
                                 batch_size: int, progress=None) -> None:
    """Fill every variant's cache of a teacher-forced task from ONE forward pass of all specialists per batch:
    each variant only mixes the same specialist outputs with its own gate (one-hot, uniform, learned), so the
    rows equal what separate per-variant passes give, at a third of the cost or less."""
    paths = {v: out_dir / "generations" / v.replace(":", "_") / f"{task.name}.jsonl" for v in variants}
    done = {v: _read_cache(p) for v, p in paths.items()}
    todo = [s for s in samples if any(s.id not in done[v] for v in variants)]
    aligned = {s.id: model.align(s.messages) for s in todo}
    for chunk in _length_batches(todo, {i: max(a.lengths) for i, a in aligned.items()}, batch_size):
        batch = model.collate([aligned[s.id] for s in chunk]).to([sp.device for sp in model.specialists])
        with model.gate_mode("uniform"):  # every specialist runs (a one-hot gate would skip the others)
            hiddens, logits = model.run_specialists(batch)
        for v in variants:
            with model.gate_mode(variant_gate(v)):
                z, w = model.mix(hiddens, logits)
            _append(paths[v], [r for r in _tf_rows(z, w, batch.labels, chunk) if r["id"] not in done[v]])
            if progress is not None:
                progress(sum(s.id not in done[v] for s in chunk))


def _generate(model, task: Task, samples: list[Sample], batch_size: int) -> list[dict]:
    from ultrafuser.modeling.generation import SamplingParams, generate

    prompts = [model.encode_prompt(s.messages) for s in samples]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=task.max_new_tokens))
    return [{"id": s.id, "answer": o.text, "finish_reason": o.finish_reason, "tokens": len(o.token_ids)}
            for s, o in zip(samples, outs)]


def _run_whole_task(model, variant: str, task: Task, samples: list[Sample], out_dir: Path, batch_size: int,
                    judge=None, progress=None) -> Path:
    """Tasks with their own `evaluate` (TruthfulQA-MC2, MT-Bench, AlpacaEval): one result file per unit,
    written atomically when the unit finishes; the answers and scored judgements inside it are cached per
    sample (eval/unitcache.py), so a unit interrupted midway resumes and redoes only what it had not done."""
    from ultrafuser.eval.text_tasks import EvalContext

    path = out_dir / "generations" / variant.replace(":", "_") / f"{task.name}.result.json"
    if path.is_file():
        return path
    from ultrafuser.eval.judge import Judge, JudgeConfig
    from ultrafuser.eval.text_tasks import model_answerer
    from ultrafuser.eval.unitcache import CachingJudge, caching_answerer

    # answers and scored verdicts are cached per sample, so an interrupted unit resumes (eval/unitcache.py)
    stem = path.parent / task.name
    answerer = caching_answerer(model_answerer(model, batch_size), stem.with_suffix(".answers.jsonl"), batch_size)
    if isinstance(judge, JudgeConfig):
        judge = Judge(judge)
    if judge is not None:
        judge = CachingJudge(judge, stem.with_suffix(".judge.jsonl"))
    with model.gate_mode(variant_gate(variant)):
        res = task.evaluate(samples, EvalContext(model=model, answerer=answerer, judge=judge, batch_size=batch_size,
                                                 max_new_tokens=task.max_new_tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"summary": res.summary, "records": res.records}, default=str) + "\n")
    tmp.replace(path)
    if progress is not None:
        progress(len(samples))
    return path


def run_unit(model, variant: str, task: Task, samples: list[Sample], out_dir: Path, batch_size: int,
             progress=None, judge=None) -> Path:
    """Fill the cache of one (variant, task) pair; return its path."""
    if task.evaluate is not None:
        return _run_whole_task(model, variant, task, samples, out_dir, batch_size, judge, progress)
    path = out_dir / "generations" / variant.replace(":", "_") / f"{task.name}.jsonl"
    done = _read_cache(path)
    todo = [s for s in samples if s.id not in done]
    with model.gate_mode(variant_gate(variant)):
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            if task.kind == "teacher_forced":
                rows = _teacher_forced(model, chunk, batch_size)
            else:
                rows = _generate(model, task, chunk, batch_size)
            _append(path, rows)
            if progress is not None:
                progress(len(chunk))
    return path


def gate_profile(model, samples_by_domain: dict[str, list[Sample]], out_dir: Path, batch_size: int) -> Path:
    """Teacher-forced gate weights of the trained gate on each domain's reference conversations (Table 6)."""
    path = out_dir / "generations" / "gate" / "profile.jsonl"
    done = _read_cache(path)
    with model.gate_mode("learned"):
        for domain, samples in samples_by_domain.items():
            todo = [s for s in samples if f"{domain}/{s.id}" not in done]
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                rows = _teacher_forced(model, chunk, batch_size)
                for r in rows:
                    r["id"] = f"{domain}/{r['id']}"
                    r["domain"] = domain
                _append(path, rows)
    return path


def _reuse_for_gate_profile(out: Path, tasks, samples, by_domain: dict[str, list[Sample]]) -> None:
    """Copy the fused variant's teacher-forced rows (same conversation, learned gate) into the gate profile."""
    path = out / "generations" / "gate" / "profile.jsonl"
    done = _read_cache(path)
    rows = []
    for t in tasks:
        if t.kind != "teacher_forced" or t.evaluate is not None or t.domain not in by_domain:
            continue
        fused_rows = _read_cache(out / "generations" / "fused" / f"{t.name}.jsonl")
        same = {s.id: s.messages for s in samples[t.name]}
        for conv in by_domain[t.domain]:
            key = f"{t.domain}/{conv.id}"
            if key in done or conv.id not in fused_rows or same.get(conv.id) != conv.messages:
                continue
            rows.append({**fused_rows[conv.id], "id": key, "domain": t.domain})
            done[key] = rows[-1]
    if rows:
        _append(path, rows)


def reference_conversation(sample: Sample) -> list[dict] | None:
    """The full conversation (prompt + reference answer) of a sample, when the task has one."""
    if sample.messages and sample.messages[-1]["role"] == "assistant":
        return sample.messages
    ref = sample.reference.get("reference")
    if isinstance(ref, str) and ref:
        return sample.messages + [{"role": "assistant", "content": ref}]
    return None


def evaluate(model, task_names: list[str], out_dir: str, *, variants: list[str] | None = None,
             data_dir: str = "data/benchmarks", batch_size: int = 16, limit: int | dict[str, int] | None = None,
             progress: bool = True, judge=None, tf_batch_size: int | None = None) -> dict[str, Any]:
    """Run every (variant, task) pair (resuming from the cache), then write and return the report."""
    from tqdm import tqdm

    from ultrafuser.eval.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = get_tasks(task_names)
    variants = variants or default_variants(model)
    for v in variants:
        variant_gate(v)
    def cap(t):  # `limit`: one number for every task, or {task name: number}
        n = limit.get(t.name) if isinstance(limit, dict) else limit
        return t.load(data_dir)[:n] if n else t.load(data_dir)

    samples = {t.name: cap(t) for t in tasks}
    plan = {"variants": variants, "tasks": {t.name: len(samples[t.name]) for t in tasks},
            "units": len(variants) * len(tasks), "domains": model.domains}
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    log.info("evaluation plan: %s", plan)
    total = sum(len(samples[t.name]) for t in tasks) * len(variants)
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not progress)
    for t in tasks:
        if t.kind == "teacher_forced" and t.evaluate is None:
            bar.set_postfix_str(f"all models / {t.name}")
            _teacher_forced_all_variants(model, variants, t, samples[t.name], out, tf_batch_size or batch_size)
        for v in variants:
            bar.set_postfix_str(f"{v} / {t.name}")
            before = len(_read_cache(out / "generations" / v.replace(":", "_") / f"{t.name}.jsonl"))
            bar.update(min(before, len(samples[t.name])))
            bs = (tf_batch_size or batch_size) if t.kind == "teacher_forced" else batch_size
            run_unit(model, v, t, samples[t.name], out, bs, progress=bar.update, judge=judge)
    bar.close()
    if model.gate is not None and "fused" in variants:  # the gate's profile belongs to the fused variant's run
        by_domain: dict[str, list[Sample]] = {}
        for t in tasks:
            if t.aux:  # the same conversations as its domain's main task
                continue
            convs = [Sample(s.id, c, {}) for s in samples[t.name] if (c := reference_conversation(s))]
            if convs:
                by_domain.setdefault(t.domain, []).extend(convs[:100])  # the paper: 100 samples per domain
        _reuse_for_gate_profile(out, tasks, samples, by_domain)  # the fused rows cover the same conversations
        gate_profile(model, by_domain, out, tf_batch_size or batch_size)
    return write_report(out, tasks, samples, variants, model.domains, model=model)


def register_run(eval_sub) -> None:
    """`ultrafuser eval run MODEL --tasks … --out DIR` (also reachable as `ultrafuser eval MODEL …`)."""
    from ultrafuser.eval.tasks import TASKS

    r = eval_sub.add_parser("run", help="evaluate a fused model and its baselines on tasks; writes a report")
    r.add_argument("model_dir")
    r.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(TASKS)}")
    r.add_argument("--out", required=True, help="output dir (cached generations, report.json, report.md, plots)")
    r.add_argument("--variants", help="comma-separated: fused, uniform, specialist:DOMAIN (default: all)")
    r.add_argument("--data-dir", default="data/benchmarks", help="local benchmark files (DIR/<task>/test.jsonl)")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--limit", type=int, help="first N samples of each task (quick runs)")
    r.add_argument("--device", help="move the model to this device")
    r.add_argument("--judge-base-url", help="OpenAI-compatible judge endpoint (mt-bench, alpacaeval)")
    r.add_argument("--judge-model", help="the judge's model name")
    r.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env var holding the judge's key")
    r.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from ultrafuser.modeling.cli import _quiet_transformers
    from ultrafuser.modeling.fused import FusedModel

    _quiet_transformers()
    model = FusedModel.from_pretrained(args.model_dir)
    if args.device:
        model.to(args.device)
    judge = None
    if args.judge_base_url:
        from ultrafuser.eval.judge import JudgeConfig

        judge = JudgeConfig(base_url=args.judge_base_url, model=args.judge_model or "judge",
                            api_key_env=args.judge_api_key_env)
    report = evaluate(model, [t.strip() for t in args.tasks.split(",") if t.strip()], args.out, judge=judge,
                      variants=args.variants.split(",") if args.variants else None, data_dir=args.data_dir,
                      batch_size=args.batch_size, limit=args.limit)
    print((Path(args.out) / "report.md").read_text())
    return 0 if report["models"] else 1
