"""The UltraChat 2 construction pipeline (paper §3.1): plan, then execute against a teacher, then filter.

Per domain, stage by stage (each stage waits for the one before; inside a stage requests run concurrently):

  meta_topics      one request per domain (skipped when the config lists the meta-topics)
  sub_topics       one per meta-topic: name + relevance + example use; optionally a seeded sample is kept
  instructions     one per sub-topic
  related_strong   one per instruction: strongly related instructions   } in-context expansion; the pool is
  related_weak     one per instruction: weakly related instructions     } each instruction + its related ones
  complicate       a seeded `complicate_share` of the pool is rewritten to be harder (paper: 30 %)
  respond          the teacher answers every conversation (turn 1)
  simulate_user    a seeded `multi_turn_share` of conversations is continued by a simulated user, each
  respond          user turn answered by the teacher, for 1..max_extra_turns more turns

Determinism: every random choice is a function of (seed, choice name, domain, content) hashed with sha256 —
never of completion order, concurrency or time. Every request's result is stored (`store.RequestStore`)
under a key that hashes (stage, messages, prompt version, model, sampling) before it is used, so a run
killed at any moment and started again sends only what is missing and ends with the same output, byte for
byte; failures are recorded with their reason and sent again on the next run. The records are assembled
from the stored results in plan order, then validated, decontaminated and deduplicated (`quality`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultrafuser.config import ConfigError
from ultrafuser.data import quality
from ultrafuser.data.buildconfig import BuildConfig, DomainSpec
from ultrafuser.data.executor import Executor, Req, make_request
from ultrafuser.data.prompting import PromptTemplate, load_template
from ultrafuser.data.records import Record, atomic_write_bytes, make_record, record_id, write_records
from ultrafuser.data.store import RequestStore, canonical_json, sha256_text
from ultrafuser.data.teacher import Teacher, resolve_api_key, safe_url

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1
SOURCE = "ultrachat2-pipeline"
TEMPLATE_STAGES = (
    "meta_topics",
    "sub_topics",
    "instructions",
    "related_strong",
    "related_weak",
    "complicate",
    "simulate_user",
    "respond_system",
)
ORIGINS = ("seed", "strongly_related", "weakly_related")
# fills {batch_note} when one sub-topic's instructions are asked for in several requests
BATCH_NOTE = (
    " This is request {b} of {n} for this sub-topic: avoid the most obvious instructions and vary the"
    " angle, so that the requests do not repeat each other."
)


@dataclass
class Item:
    """One instruction of the pool."""

    domain: DomainSpec
    meta_topic: str
    sub_topic: str
    pos: tuple  # (domain, meta, sub, instruction, origin, k) indices: the plan order
    text: str
    origin: str
    complicated: bool = False


@dataclass
class Turn:
    user: str
    user_key: str | None = None
    answer: dict | None = None  # stored entry of the answer
    rejection: quality.Rejection | None = None


@dataclass
class Conv:
    item: Item
    extra_turns: int
    turns: list[Turn] = field(default_factory=list)

    @property
    def open(self) -> bool:
        last = self.turns[-1]
        return last.answer is not None and last.rejection is None


@dataclass
class BuildReport:
    complete: bool
    records: int
    stats: dict[str, Any]
    sent: int = 0


class Builder:
    """`Builder(cfg).plan()` (no network) and `Builder(cfg).run()` (needs the teacher)."""

    def __init__(self, cfg: BuildConfig, *, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.echo = echo
        self.templates: dict[tuple[str, str], PromptTemplate] = {
            (d.name, s): load_template(s, d.name, cfg.prompts_dir)
            for d in cfg.domains
            for s in TEMPLATE_STAGES
        }
        self.refusals = quality._compile_refusals(cfg.quality.extra_refusal_patterns)
        for f in cfg.quality.decontaminate.files:
            if not Path(f.path).is_file():
                raise ConfigError(f"quality.decontaminate.files: {f.path!r} does not exist")
        for name in cfg.quality.decontaminate.eval_sets:
            if name not in quality.EVAL_SET_LOADERS:
                raise ConfigError(
                    f"quality.decontaminate.eval_sets: unknown set {name!r}; known: "
                    f"{sorted(quality.EVAL_SET_LOADERS)}"
                )
        self.store: RequestStore | None = None
        self.ex: Executor | None = None  # set while running

    # ------------------------------------------------------------------------------------------- plan

    def plan(self) -> dict[str, dict[str, float]]:
        """Expected requests per stage and domain, if the teacher returns the counts asked for
        (complicate / multi-turn counts are expectations of seeded coin flips)."""
        rows: dict[str, dict[str, float]] = {}
        for d in self.cfg.domains:
            meta_req = 0 if isinstance(d.meta_topics, list) else 1
            n_sub_req = d.n_meta
            n_instr_req = d.n_meta * d.n_sub_used * len(d.instruction_batches)
            n_seed = d.n_meta * d.n_sub_used * d.instructions_per_sub_topic
            pool = n_seed * (1 + d.strong_related + d.weak_related)
            extra = pool * d.multi_turn_share * (1 + d.max_extra_turns) / 2
            counts = {
                "meta_topics": meta_req,
                "sub_topics": n_sub_req,
                "instructions": n_instr_req,
                "related_strong": n_seed if d.strong_related else 0,
                "related_weak": n_seed if d.weak_related else 0,
                "complicate": pool * d.complicate_share,
                "respond": pool + extra,
                "simulate_user": extra,
            }
            for stage, n in counts.items():
                rows.setdefault(stage, {})[d.name] = n
        return rows

    def format_plan(self, rows: dict[str, dict[str, float]], stored: dict[str, int] | None = None) -> str:
        doms = [d.name for d in self.cfg.domains]
        approx = {"complicate", "respond", "simulate_user"}

        def fmt(v: float, stage: str) -> str:  # seeded coin flips: expected counts
            return f"{'~' if stage in approx and v else ''}{round(v)}"

        t = self.cfg.teacher
        lines = [
            f"plan: {self.cfg.output} (seed {self.cfg.seed}; teacher {t.model!r} at {safe_url(t.base_url)}; "
            f"store {self.cfg.store_path})",
            f"{'stage':<16}" + "".join(f"{d[:10]:>11}" for d in doms) + f"{'total':>11}{'stored':>9}",
        ]
        totals = {d: 0.0 for d in doms}
        for stage, per in rows.items():
            for d in doms:
                totals[d] += per.get(d, 0)
            lines.append(
                f"{stage:<16}"
                + "".join(f"{fmt(per.get(d, 0), stage):>11}" for d in doms)
                + f"{fmt(sum(per.values()), stage):>11}{(stored or {}).get(stage, 0):>9}"
            )
        lines.append(
            f"{'total':<16}"
            + "".join(f"{'~' + str(round(v)):>11}" for v in totals.values())
            + f"{'~' + str(round(sum(totals.values()))):>11}{sum((stored or {}).values()):>9}"
        )
        return "\n".join(lines)

    def print_plan(self) -> None:
        stored = {}
        if self.cfg.store_path.exists():
            stored = RequestStore(self.cfg.store_path, readonly=True).ok_count_by_stage()
        self.echo(self.format_plan(self.plan(), stored))

    # ------------------------------------------------------------------------------------------- requests

    def _u(self, *parts: Any) -> float:
        """A seeded uniform number in [0, 1) from the content it decides about."""
        h = sha256_text(canonical_json([self.cfg.seed, *parts]))
        return int(h[:16], 16) / 2**64

    def _make_req(
        self, stage: str, domain: str, messages: list[dict[str, str]], version: str, variant: int = 0
    ) -> Req:
        return make_request(
            stage, domain, messages, version, self.cfg.teacher.model, self.cfg.sampling_for(stage), variant
        )

    def _prompt_req(self, stage: str, d: DomainSpec, variant: int = 0, **slots: Any) -> Req:
        tpl = self.templates[(d.name, stage)]
        text = tpl.render(domain=d.name, domain_description=d.domain_description, **slots)
        return self._make_req(stage, d.name, [{"role": "user", "content": text}], tpl.version, variant)

    def _respond_req(self, d: DomainSpec, conv: list[dict[str, str]]) -> Req:
        tpl = self.templates[(d.name, "respond_system")]
        system = tpl.render(domain=d.name, domain_description=d.domain_description).strip()
        msgs = ([{"role": "system", "content": system}] if system else []) + conv
        return self._make_req("respond", d.name, msgs, tpl.version)

    # ------------------------------------------------------------------------------------------- stages

    async def _collect(self) -> list[Conv]:
        cfg = self.cfg
        doms = cfg.domains

        # 1. meta-topics
        topics: dict[str, list[str]] = {}
        reqs: dict[str, Req] = {}
        for d in doms:
            if isinstance(d.meta_topics, list):
                topics[d.name] = [t.strip() for t in d.meta_topics]
            else:
                reqs[d.name] = self._prompt_req("meta_topics", d, count=d.meta_topics)
        res = await self.ex.resolve("meta_topics", list(reqs.values()))
        for d in doms:
            if d.name in reqs and reqs[d.name].key in res:
                topics[d.name] = res[reqs[d.name].key].value[: d.n_meta]

        # 2. sub-topics (name, relevance, example use); optionally a seeded sample of them
        sub_reqs = [
            (
                di,
                d,
                mi,
                mt,
                self._prompt_req("sub_topics", d, meta_topic=mt, count=d.sub_topics_per_meta_topic),
            )
            for di, d in enumerate(doms)
            for mi, mt in enumerate(topics.get(d.name, []))
        ]
        res = await self.ex.resolve("sub_topics", [r for *_, r in sub_reqs])
        subs = []
        for di, d, mi, mt, r in sub_reqs:
            if r.key not in res:
                continue
            lst = res[r.key].value[: d.sub_topics_per_meta_topic]
            if d.sub_topics_used is not None and len(lst) > d.sub_topics_used:
                ranked = sorted(
                    range(len(lst)), key=lambda i: self._u("sub_topic", d.name, mt, lst[i]["name"])
                )
                lst = [lst[i] for i in sorted(ranked[: d.sub_topics_used])]
            subs.extend((di, d, mi, mt, si, s) for si, s in enumerate(lst))

        # 3. instructions per sub-topic (in batches of at most instructions_per_request per request)
        ins_reqs = []
        for di, d, mi, mt, si, s in subs:
            batches = d.instruction_batches
            reqs_b = [
                self._prompt_req(
                    "instructions",
                    d,
                    variant=b if len(batches) > 1 else 0,
                    meta_topic=mt,
                    sub_topic=s["name"],
                    sub_topic_relevance=s["relevance"] or "-",
                    sub_topic_example=s["example_use"] or "-",
                    count=count,
                    batch_note=BATCH_NOTE.format(b=b + 1, n=len(batches)) if len(batches) > 1 else "",
                )
                for b, count in enumerate(batches)
            ]
            ins_reqs.append((di, d, mi, mt, si, s, reqs_b))
        res = await self.ex.resolve("instructions", [r for x in ins_reqs for r in x[-1]])
        seeds: list[Item] = []
        for di, d, mi, mt, si, s, reqs_b in ins_reqs:
            if not all(r.key in res for r in reqs_b):
                continue  # all batches of a sub-topic or none, so positions never shift between runs
            texts, seen = [], set()
            for r, count in zip(reqs_b, d.instruction_batches):
                for t in res[r.key].value[:count]:
                    if " ".join(t.lower().split()) not in seen:
                        seen.add(" ".join(t.lower().split()))
                        texts.append(t)
            for ii, text in enumerate(texts[: d.instructions_per_sub_topic]):
                seeds.append(Item(d, mt, s["name"], (di, mi, si, ii, 0, 0), text, "seed"))

        # 4. in-context expansion: strongly and weakly related instructions
        rel_reqs = []
        for it in seeds:
            d = it.domain
            for kind, stage, n in (
                (1, "related_strong", d.strong_related),
                (2, "related_weak", d.weak_related),
            ):
                if n:
                    rel_reqs.append(
                        (
                            it,
                            kind,
                            n,
                            self._prompt_req(
                                stage,
                                d,
                                meta_topic=it.meta_topic,
                                sub_topic=it.sub_topic,
                                instruction=it.text,
                                count=n,
                            ),
                        )
                    )
        res = await self.ex.resolve("related", [x[-1] for x in rel_reqs])
        pool: list[Item] = list(seeds)
        for it, kind, n, r in rel_reqs:
            if r.key in res:
                for k, text in enumerate(res[r.key].value[:n]):
                    pool.append(
                        Item(
                            it.domain,
                            it.meta_topic,
                            it.sub_topic,
                            it.pos[:4] + (kind, k),
                            text,
                            ORIGINS[kind],
                        )
                    )
        pool.sort(key=lambda it: it.pos)

        # 5. complication of a seeded share of the pool
        chosen = [
            it for it in pool if self._u("complicate", it.domain.name, it.text) < it.domain.complicate_share
        ]
        comp_reqs = [
            (
                it,
                self._prompt_req(
                    "complicate",
                    it.domain,
                    meta_topic=it.meta_topic,
                    sub_topic=it.sub_topic,
                    instruction=it.text,
                ),
            )
            for it in chosen
        ]
        res = await self.ex.resolve("complicate", [r for _, r in comp_reqs])
        pending = set()
        for it, r in comp_reqs:
            if r.key in res:
                it.text, it.complicated = res[r.key].value, True
            else:
                pending.add(id(it))
        convs = []
        for it in pool:
            if id(it) in pending:
                continue
            d = it.domain
            extra = 0
            if self._u("multi_turn", d.name, it.text) < d.multi_turn_share:
                extra = 1 + min(
                    d.max_extra_turns - 1, int(self._u("extra_turns", d.name, it.text) * d.max_extra_turns)
                )
            convs.append(Conv(it, extra, [Turn(user=it.text)]))

        # 6. answers, and continuation by a simulated user
        max_extra = max((c.extra_turns for c in convs), default=0)
        for t in range(0, max_extra + 1):
            if t > 0:
                cont = [c for c in convs if c.extra_turns >= t and c.open]
                sim = [
                    (c, self._prompt_req("simulate_user", c.item.domain, conversation=self._transcript(c)))
                    for c in cont
                ]
                res = await self.ex.resolve(f"simulate_user (turn {t + 1})", [r for _, r in sim])
                for c, r in sim:
                    if r.key in res:
                        c.turns.append(Turn(user=res[r.key].value, user_key=r.key))
            need = [c for c in convs if len(c.turns) == t + 1 and c.turns[t].answer is None]
            ans = [(c, self._respond_req(c.item.domain, self._messages(c))) for c in need]
            res = await self.ex.resolve(f"respond (turn {t + 1})", [r for _, r in ans])
            for c, r in ans:
                if r.key in res:
                    turn = c.turns[t]
                    turn.answer = res[r.key].entry
                    turn.rejection = quality.validate_response(
                        turn.answer["content"],
                        turn.answer.get("finish_reason"),
                        c.item.domain.answer_checks,
                        self.refusals,
                    )
        return convs

    @staticmethod
    def _messages(c: Conv) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        for t in c.turns:
            msgs.append({"role": "user", "content": t.user})
            if t.answer is not None:
                msgs.append({"role": "assistant", "content": t.answer["content"]})
        return msgs

    @staticmethod
    def _transcript(c: Conv) -> str:
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in Builder._messages(c))

    # ------------------------------------------------------------------------------------------- records

    def _attempts(self, entry: dict) -> int:
        assert self.store is not None
        return int(entry.get("attempts", 1)) + self.store.failed_attempts(entry["key"])

    def _assemble(self, convs: list[Conv]) -> tuple[list[Record], list[dict], Counter]:
        records, rejected, notes = [], [], Counter()
        for c in sorted(convs, key=lambda c: c.item.pos):
            it, d = c.item, c.item.domain
            first = c.turns[0]
            if first.answer is None:
                notes["pending_answer"] += 1
                continue
            if first.rejection is not None:
                msgs = self._messages(Conv(it, 0, [first]))
                rejected.append(
                    {
                        "stage": "validation",
                        "reason": first.rejection.reason,
                        "detail": first.rejection.detail,
                        "id": record_id(d.name, msgs),
                        "domain": d.name,
                        "instruction": it.text[:300],
                    }
                )
                continue
            keep = []
            for t in c.turns:
                if t.answer is None:
                    notes["pending_answer"] += 1
                    break
                if t.rejection is not None:
                    notes[f"later_turn_dropped:{t.rejection.reason}"] += 1
                    break
                keep.append(t)
            if c.extra_turns and len(keep) < 1 + c.extra_turns and not any(t.rejection for t in c.turns):
                notes["multi_turn_incomplete"] += 1
            messages = []
            for t in keep:
                messages += [
                    {"role": "user", "content": t.user},
                    {"role": "assistant", "content": t.answer["content"]},
                ]
            dn = d.name
            prov = {
                "pipeline": "ultrachat2",
                "pipeline_version": PIPELINE_VERSION,
                "seed": self.cfg.seed,
                "teacher": {"model": self.cfg.teacher.model},
                "sampling": self.cfg.sampling_for("respond").model_dump(),
                "prompt_versions": {
                    st: self.templates[(dn, st)].version for st in self._stages_used(it, len(keep))
                },
                "origin": it.origin,
                "complicated": it.complicated,
                "answers": [
                    {
                        "attempts": self._attempts(t.answer),
                        "finish_reason": t.answer.get("finish_reason"),
                        "sha256": t.answer["content_sha256"],
                        "request": t.answer["key"][:16],
                    }
                    for t in keep
                ],
                "simulated_user_turns": len(keep) - 1,
            }
            records.append(
                make_record(
                    domain=dn,
                    meta_topic=it.meta_topic,
                    sub_topic=it.sub_topic,
                    messages=messages,
                    source=SOURCE,
                    provenance=prov,
                )
            )
        return records, rejected, notes

    @staticmethod
    def _stages_used(it: Item, turns: int) -> list[str]:
        used = [] if isinstance(it.domain.meta_topics, list) else ["meta_topics"]
        used += ["sub_topics", "instructions"]
        used += {"seed": [], "strongly_related": ["related_strong"], "weakly_related": ["related_weak"]}[
            it.origin
        ]
        used += ["complicate"] if it.complicated else []
        used += ["simulate_user"] if turns > 1 else []
        return used + ["respond_system"]

    def _filter(self, records: list[Record]) -> tuple[list[Record], list[dict]]:
        q = self.cfg.quality
        removed: list[dict] = []

        def note(pairs: list, stage: str) -> None:
            for r, why in pairs:
                first_user = next(m.content for m in r.messages if m.role == "user")
                removed.append(
                    {
                        "stage": stage,
                        "reason": why.reason,
                        "detail": why.detail,
                        "id": r.id,
                        "domain": r.domain,
                        "instruction": first_user[:300],
                    }
                )

        if q.decontaminate.enabled and (q.decontaminate.eval_sets or q.decontaminate.files):
            texts = quality.load_eval_texts(q.decontaminate.eval_sets, q.decontaminate.files)
            records, gone = quality.Decontaminator(texts, q.decontaminate.ngram).filter(records)
            note(gone, "decontamination")
        if q.dedup.enabled:
            records, gone = quality.dedup_records(
                records, field=q.dedup.field, threshold=q.dedup.threshold, num_perm=q.dedup.num_perm
            )
            note(gone, "dedup")
        return records, removed

    # ------------------------------------------------------------------------------------------- run

    async def _execute(self) -> list[Conv]:
        assert self.store is not None
        async with Teacher(self.cfg.teacher) as teacher:
            self.ex = Executor(
                self.store, teacher, self.cfg.teacher.model, self.cfg.teacher.concurrency, self.echo
            )
            return await self._collect()

    def run(self) -> BuildReport:
        cfg = self.cfg
        resolve_api_key(cfg.teacher)  # fail before anything else if the key is missing
        self.print_plan()
        with RequestStore(cfg.store_path) as store:
            self.store = store
            # temp files of an earlier run killed while writing its outputs (we hold the store's lock)
            for p in (cfg.output_path, cfg.stats_path, cfg.rejected_path):
                for stale in p.parent.glob(f".{p.name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            convs = asyncio.run(self._execute())
            records, rejected, notes = self._assemble(convs)
            records, removed = self._filter(records)
            rejected += removed
            write_records(records, cfg.output_path)
            atomic_write_bytes(
                cfg.rejected_path,
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected).encode("utf-8"),
            )
        ex = self.ex
        assert ex is not None
        # every result this plan needs and did not have was asked for in this run: complete iff nothing failed
        complete = not ex.failures and not ex.stopped and ex.not_sent == 0
        stats = {
            "output": str(cfg.output_path),
            "complete": complete,
            "records": len(records),
            "domains": quality.domain_stats(records),
            "removed": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "removed_by_stage": dict(sorted(Counter(r["stage"] for r in rejected).items())),
            "notes": dict(sorted(notes.items())),
            "run": {
                "levels": ex.levels,
                "http_attempts": ex.teacher.stats.requests,
                "new_results": ex.sent_ok,
                "failed": dict(sorted(ex.failures.items())),
                "not_sent": ex.not_sent,
                "stopped": ex.stopped,
                "tokens": ex.teacher.stats.tokens,
            },
            "config": cfg.model_dump(mode="json"),
        }
        atomic_write_bytes(
            cfg.stats_path, (json.dumps(stats, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        )
        self.echo(quality.format_stats(stats["domains"]) if records else "no records")
        self.echo(
            f"wrote {len(records)} records to {cfg.output_path}; removed {len(rejected)} "
            f"({', '.join(f'{k}: {v}' for k, v in stats['removed'].items()) or 'none'}); "
            f"stats: {cfg.stats_path}; removed records: {cfg.rejected_path}"
        )
        if not complete:
            why = ex.stopped or (
                f"{sum(ex.failures.values())} request(s) failed "
                f"({', '.join(f'{k}: {v}' for k, v in sorted(ex.failures.items()))})"
            )
            self.echo(f"INCOMPLETE: {why}; run the same command again to retry what is missing")
        return BuildReport(complete, len(records), stats, ex.sent_ok)


def run_build(
    cfg: BuildConfig, *, plan_only: bool = False, echo: Callable[[str], None] = print
) -> BuildReport | None:
    """Plan (and unless plan_only, execute) a build; see the module docstring."""
    b = Builder(cfg, echo=echo)
    if plan_only:
        b.print_plan()
        return None
    return b.run()
