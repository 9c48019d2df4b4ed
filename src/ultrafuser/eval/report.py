"""The evaluation report, computed only from cached per-sample results (so it always recomputes):

- `report.json`: per model variant, per task score, per-domain averages (text / code / math = mean of that
  domain's tasks, as the paper's Fig. 1 defines them), `overall` (mean of the domain scores), the number
  of samples behind every figure, what each metric means, and the gate's average weight of each specialist
  on each domain's data (the paper's Table 6);
- `report.md`: the same as Markdown tables (the paper's Table 1 layout, then Table 6);
- `gate_heatmap.png`: per-sample average gate weights (rows: samples grouped by domain; columns: specialists);
- `routing.html` / `routing.png`: one reference answer per domain, every token coloured by the specialist
  that weighed most (the paper's token-level figures).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

PALETTE = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"]


def _rows(path: Path) -> dict[str, dict]:
    from ultrafuser.eval.runner import _read_cache

    return _read_cache(path)


def score_unit(task, samples, rows: dict[str, dict]) -> tuple[float | None, int, dict]:
    """(score, n, extra) of one (variant, task) from its cached rows."""
    if task.evaluate is not None:  # a whole-task result file (judged / log-likelihood tasks)
        res = rows.get("__result__")
        if res is None:
            return None, 0, {}
        summ = res["summary"]
        return summ.get("score"), int(summ.get("n_scored", summ.get("n", 0))), {
            k: v for k, v in summ.items() if k != "score"}
    have = [s for s in samples if s.id in rows]
    if not have:
        return None, 0, {}
    if task.kind == "teacher_forced":
        correct = sum(rows[s.id]["correct"] for s in have)
        tokens = sum(rows[s.id]["tokens"] for s in have)
        nll = sum(rows[s.id]["nll_sum"] for s in have)
        per = [rows[s.id]["correct"] / max(rows[s.id]["tokens"], 1) for s in have]
        return correct / max(tokens, 1), len(have), {"loss": nll / max(tokens, 1), "tokens": tokens,
                                                      "stderr": _stderr(per)}
    answers = [rows[s.id]["answer"] for s in have]
    if task.batch_score is not None:
        scores = task.batch_score(have, answers)
    else:
        scores = [task.score(s, a) for s, a in zip(have, answers)]
    truncated = sum(1 for s in have if rows[s.id].get("finish_reason") == "length")
    return sum(scores) / len(scores), len(have), {"truncated": truncated, "stderr": _stderr(scores)}


def _stderr(xs: list[float]) -> float:
    """Standard error of the mean of per-sample scores (sampling noise of the held-out set; for 0/1 scores the
    binomial sqrt(p(1-p)/n))."""
    n = len(xs)
    if n < 2:
        return 0.0
    m = sum(xs) / n
    return (sum((x - m) ** 2 for x in xs) / (n - 1) / n) ** 0.5 if any(x not in (0, 1) for x in xs) else (m * (1 - m) / n) ** 0.5


def write_report(out: Path, tasks, samples, variants: list[str], domains: list[str], model=None) -> dict[str, Any]:
    models: dict[str, dict] = {}
    details: dict[str, dict] = {}
    heldout_loss: dict[str, dict] = {}
    n: dict[str, int] = {}
    for v in variants:
        scores: dict[str, float] = {}
        for t in tasks:
            if t.evaluate is not None:
                f = out / "generations" / v.replace(":", "_") / f"{t.name}.result.json"
                rows = {"__result__": json.loads(f.read_text())} if f.is_file() else {}
            else:
                rows = _rows(out / "generations" / v.replace(":", "_") / f"{t.name}.jsonl")
            s, count, extra = score_unit(t, samples[t.name], rows)
            if s is None:
                continue
            scores[t.name] = s
            n[t.name] = count
            details.setdefault(v, {})[t.name] = extra
        by_domain: dict[str, list[float]] = {}
        for t in tasks:
            if t.name in scores and not t.aux:
                by_domain.setdefault(t.domain, []).append(scores[t.name])
            if t.kind == "teacher_forced" and "loss" in details.get(v, {}).get(t.name, {}):
                heldout_loss.setdefault(v, {})[t.domain] = details[v][t.name]["loss"]
        for d, xs in by_domain.items():
            scores[d] = sum(xs) / len(xs)
        dom = [scores[d] for d in ("text", "code", "math") if d in scores]
        if dom:
            scores["overall"] = sum(dom) / len(dom)
        models[v] = scores
    gate, per_sample = _gate_table(out, domains)
    report = {
        "models": models,
        "gate": gate,
        "higher_is_better": True,
        "n_samples": n,
        "metrics": {t.name: t.metric for t in tasks},
        "domains_of_tasks": {t.name: t.domain for t in tasks},
        "details": details,
        "heldout_loss": heldout_loss,
        "overall_definition": "mean of the domain scores present (text, code, math); each domain = mean of its tasks",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, tasks))
    if per_sample:
        _plots(out, per_sample, domains, model)
    return report


def _gate_table(out: Path, domains: list[str]) -> tuple[dict, list[dict]]:
    rows = list(_rows(out / "generations" / "gate" / "profile.jsonl").values())
    table: dict[str, dict[str, float]] = {}
    for d in sorted({r["domain"] for r in rows}):
        # token-weighted average over the domain's samples (the paper averages token weights)
        rs = [r for r in rows if r["domain"] == d]
        tok = sum(r["tokens"] for r in rs)
        table[d] = {spec: sum(r["gate_mean"][k] * r["tokens"] for r in rs) / max(tok, 1) for k, spec in enumerate(domains)}
    return table, rows


def markdown(report: dict, tasks) -> str:
    names = [t.name for t in tasks]
    doms = [d for d in ("text", "code", "math") if any(t.domain == d for t in tasks)]
    cols = names + [f"**{d}**" for d in doms] + ["**overall**"]
    lines = ["# Evaluation report", "", "Higher is better. " + "; ".join(
        f"`{k}`: {v} (n={report['n_samples'].get(k, 0)})" for k, v in report["metrics"].items()), "",
        "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for v, sc in report["models"].items():
        se = {k: d.get("stderr") for k, d in report.get("details", {}).get(v, {}).items()}
        cells = [_pct(sc.get(k)) + (f" ±{100 * se[k]:.1f}" if se.get(k) and sc.get(k) is not None else "")
                 for k in names] + [_pct(sc.get(k)) for k in doms + ["overall"]]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "± = standard error of the mean over the samples (the held-out set's sampling noise; it does "
              "not include run-to-run training noise)."]
    if report.get("heldout_loss"):
        ldoms = [d for d in ("text", "code", "math") if any(d in x for x in report["heldout_loss"].values())]
        lines += ["", "## Held-out loss (nats per reply token, teacher-forced; lower is better)", "",
                  "| model | " + " | ".join(ldoms) + " |", "|---" * (len(ldoms) + 1) + "|"]
        for v, ls in report["heldout_loss"].items():
            lines.append(f"| {v} | " + " | ".join(f"{ls[d]:.3f}" if d in ls else "–" for d in ldoms) + " |")
    if report["gate"]:
        specs = list(next(iter(report["gate"].values())).keys())
        lines += ["", "## Average gate weight per domain (paper Table 6)", "",
                  "| specialist | " + " | ".join(f"{d} data" for d in report["gate"]) + " |",
                  "|---" * (len(report["gate"]) + 1) + "|"]
        for s in specs:
            lines.append(f"| w_{s} | " + " | ".join(f"{report['gate'][d][s]:.2f}" for d in report["gate"]) + " |")
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _plots(out: Path, rows: list[dict], domains: list[str], model) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = sorted(rows, key=lambda r: r["domain"])
    w = np.array([r["gate_mean"] for r in rows])
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(domains), 6))
    im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(domains)), [f"w_{d}" for d in domains])
    ticks, labels, start = [], [], 0
    for d in sorted({r["domain"] for r in rows}):
        cnt = sum(1 for r in rows if r["domain"] == d)
        ticks.append(start + cnt / 2)
        labels.append(f"{d} data")
        start += cnt
        ax.axhline(start - 0.5, color="white", lw=1)
    ax.set_yticks(ticks, labels)
    fig.colorbar(im, ax=ax, label="mean gate weight")
    ax.set_title("Gate weight per sample")
    fig.tight_layout()
    fig.savefig(out / "gate_heatmap.png", dpi=120)
    plt.close(fig)
    if model is not None:
        _routing(out, rows, model)


def token_routing(model, messages: list[dict]) -> list[tuple[str, list[float]]]:
    """(token text, gate weights) for every reply token of a conversation, under the learned gate."""
    import torch

    ex = model.align(messages)
    with torch.no_grad(), model.gate_mode("learned"):
        out = model(model.collate([ex]))
    tok = model.response_tokenizer
    return [(tok.decode([t]), out.gate_weights[0, j].tolist()) for j, t in enumerate(ex.targets)]


def routing_html(items: list[tuple[str, list[tuple[str, list[float]]]]], domains: list[str]) -> str:
    legend = " ".join(f'<span style="background:{PALETTE[k % 8]};color:#fff;padding:2px 6px">{html.escape(d)}</span>'
                      for k, d in enumerate(domains))
    parts = ["<!doctype html><meta charset='utf-8'><title>Token routing</title>",
             "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}pre{white-space:pre-wrap}"
             "span.t{border-radius:2px}</style>", f"<p>Dominant specialist per token: {legend}</p>"]
    for title, toks in items:
        parts.append(f"<h3>{html.escape(title)}</h3><pre>")
        for text, w in toks:
            k = max(range(len(w)), key=w.__getitem__)
            alpha = 0.25 + 0.75 * w[k]
            tip = ", ".join(f"{d}={x:.2f}" for d, x in zip(domains, w))
            parts.append(f'<span class="t" title="{html.escape(tip)}" style="background:{PALETTE[k % 8]}'
                         f'{int(alpha * 255):02x}">{html.escape(text)}</span>')
        parts.append("</pre>")
    return "".join(parts)


def _routing(out: Path, rows: list[dict], model) -> None:
    """One reference conversation per domain, rendered token by token (HTML + PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ultrafuser.eval.runner import reference_conversation
    from ultrafuser.eval.tasks import TASKS

    picked: dict[str, list[dict]] = {}
    for t in TASKS.values():
        if t.domain in picked or t.name.startswith(("humaneval", "gsm8k", "math", "sat", "aqua")):
            continue
        try:
            s = next(iter(t.load("data/benchmarks")), None)
        except Exception:
            continue
        conv = reference_conversation(s) if s else None
        if conv:
            picked[t.domain] = conv
    items = [(f"{d} data", token_routing(model, conv)) for d, conv in picked.items()]
    if not items:
        return
    (out / "routing.html").write_text(routing_html(items, model.domains))
    fig, axes = plt.subplots(len(items), 1, figsize=(12, 2.4 * len(items)), squeeze=False)
    for ax, (title, toks) in zip(axes[:, 0], items):
        toks = toks[:60]
        for k, d in enumerate(model.domains):
            ax.plot([w[k] for _, w in toks], color=PALETTE[k % 8], label=f"w_{d}", lw=1.5)
        ax.set_xticks(range(len(toks)), [t.replace("\n", "⏎") for t, _ in toks], rotation=90, fontsize=6)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "routing.png", dpi=120)
    plt.close(fig)
