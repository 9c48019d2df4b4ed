"""Baselines the paper compares token-level fusion with (paper.md §4.2, §4.4).

**Weight-averaged merge** (`average_merge`, the paper's "Average Merging"): one model whose every parameter is
the mean of the specialists' parameters. Specialists that share a base through LoRA adapters are merged the same
way: each specialist's dense weights are the base plus its own adapter's delta (`W + B·A·scale`; a specialist
without an adapter is the base itself), so the mean is `W + mean_k ΔW_k` — merge each adapter into the base,
then average. The result is wrapped as a one-specialist `FusedModel` (domain `merged`, in the template of the
specialist named by `template_of`, default the first), so every task runs on it unchanged. Refused, naming the
parameter: different parameter names or shapes (e.g. CodeLlama's 32016-row vocabulary against Llama-2's 32000),
a different model class, or different positional encodings (`rope_*` settings, e.g. CodeLlama's rope_theta 1e6
against 1e4) — the paper's reason why merging with CodeLlama collapses. Other config differences (say
`rms_norm_eps`) are logged and the merged model takes the `template_of` specialist's config.

**Sequence-level selection** (`SequenceSelector`, paper §4.4): every specialist writes its full answer alone
(gate `onehot:DOMAIN`, greedy), then one answer per prompt is kept:

- `by="perplexity"` (default): the answer with the lowest mean token negative log-likelihood. Our choice of
  yardstick, `score_under="uniform"` (default): every candidate is scored by the *same* model — the uniform
  fused model (the plain average of the specialists' logits) — so the numbers are comparable; scoring each
  answer under the specialist that wrote it (`score_under="self"`) is also offered, but it favours whichever
  specialist is most over-confident (a greedy answer is, by construction, likely under its own writer).
  The NLL is the mean over the answer's tokens as the response tokenizer tokenises its text (the
  end-of-reply token is left out, so an answer cut at max_new_tokens is not punished for lacking an end).
  An empty answer has NLL +inf. Ties go to the earlier specialist.
- `by="judge"`: an LLM judge picks the best response, shown in a per-prompt shuffled order (seeded: the
  paper shuffled against position bias). A prompt whose judge request fails falls back to the perplexity
  choice; the fallback is recorded (`judge_error`) in `selector.log`.

The selector is an `Answerer` (`text_tasks`): call it with conversations, get the chosen answers back, so
generate-tasks and judged tasks score them like any model's answers; for a multi-turn benchmark each turn is
selected afresh, on top of the answers chosen before. `select_answers(model, samples, ...)` does this for a
list of task samples.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Sequence

from ultrafuser.config import ConfigError, FuseConfig, GateConfig

log = logging.getLogger(__name__)

MERGED_DOMAIN = "merged"
# config keys that do not change the function a set of weights computes (ids, bookkeeping, runtime flags)
_BENIGN_CONFIG_KEYS = {
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "output_attentions", "output_hidden_states", "return_dict",
    "_attn_implementation", "_attn_implementation_internal", "_commit_hash", "id2label", "label2id",
}


class MergeError(ConfigError):
    """The specialists cannot be weight-averaged; the message names the parameter or setting and the fix."""


# ------------------------------------------------------------------------------------------- weight averaging


def effective_state_dict(specialist) -> dict:
    """The dense weights specialist k computes with: its model's own weights, or base + its adapter's delta.

    Keys are the plain Hugging Face names (LoRA's `.base_layer` removed, adapter tensors dropped).
    """
    import torch

    model = specialist.model
    if not specialist._tuner_layers:
        return dict(model.state_dict())
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    adapter = specialist.adapter
    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer) and adapter is not None and adapter in getattr(mod, "lora_A", {}):
            if getattr(mod, "use_dora", {}).get(adapter):
                raise MergeError(f"adapter of {specialist.domain!r} uses DoRA; averaging DoRA adapters is not "
                                 "supported (merge it into a full model first and give that as the specialist)")
            with torch.no_grad():
                deltas[f"{name}.weight"] = mod.get_delta_weight(adapter)
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k or ".modules_to_save." in k or ".original_module." in k:
            if ".modules_to_save." in k:
                raise MergeError(f"adapter of {specialist.domain!r} has modules_to_save ({k}); not supported here")
            continue
        key = k.replace(".base_layer.", ".")
        out[key] = v + deltas[key].to(v.dtype) if key in deltas else v
    return out


def _config_dict(model) -> dict:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {k: v for k, v in cfg.to_dict().items() if k not in _BENIGN_CONFIG_KEYS}


def check_mergeable(specialists: Sequence, states: Sequence[dict]) -> None:
    """Refuse (MergeError) unless every specialist has the same class, parameter names and shapes, and rope."""
    ref, ref_sd = specialists[0], states[0]
    ref_cfg = _config_dict(ref.model)
    for s, sd in zip(specialists[1:], states[1:]):
        a, b = type(ref.model).__name__, type(s.model).__name__
        if a != b:
            raise MergeError(f"cannot average {ref.domain!r} ({a}) with {s.domain!r} ({b}): different model classes")
        missing, extra = sorted(set(ref_sd) - set(sd)), sorted(set(sd) - set(ref_sd))
        if missing or extra:
            raise MergeError(
                f"cannot average {ref.domain!r} with {s.domain!r}: parameter names differ (only in {ref.domain!r}: "
                f"{missing[:3]}; only in {s.domain!r}: {extra[:3]}); weight averaging needs identical architectures"
            )
        for k, v in ref_sd.items():
            if tuple(v.shape) != tuple(sd[k].shape):
                raise MergeError(
                    f"cannot average {ref.domain!r} with {s.domain!r}: parameter {k!r} has shape {tuple(v.shape)} in "
                    f"{ref.domain!r} but {tuple(sd[k].shape)} in {s.domain!r}. Weight averaging needs identical "
                    "shapes (paper: CodeLlama's 32016-row vocabulary and rope_theta make it unmergeable with "
                    "Llama-2 models); merge only the compatible specialists (domains=[...])"
                )
        cfg = _config_dict(s.model)
        diff = sorted(k for k in set(ref_cfg) | set(cfg) if ref_cfg.get(k) != cfg.get(k))
        rope = [k for k in diff if "rope" in k]
        if rope:
            raise MergeError(
                f"cannot average {ref.domain!r} with {s.domain!r}: positional encoding differs ("
                + ", ".join(f"{k}: {ref_cfg.get(k)!r} vs {cfg.get(k)!r}" for k in rope)
                + "); averaged weights would serve neither (paper: CodeLlama's rope_theta 1e6 vs Llama-2's 1e4)"
            )
        if diff:
            log.warning("average merge: %r and %r differ in config %s; the merged model uses %r's", ref.domain,
                        s.domain, {k: (ref_cfg.get(k), cfg.get(k)) for k in diff}, ref.domain)


def _without_lora(model):
    """A deep copy of `model` with every PEFT LoRA layer replaced by its base layer (weights to be overwritten)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = m.get_submodule(parent_name) if parent_name else m
            setattr(parent, child, mod.get_base_layer())
    return m


def average_merge(model, domains: Sequence[str] | None = None, template_of: str | None = None):
    """Average the specialists' weights (all of them, or `domains`) into one model; return it as a
    one-specialist `FusedModel` (domain `merged`). The original `model` is left untouched."""
    import torch

    from ultrafuser.modeling.fused import FusedModel
    from ultrafuser.modeling.specialists import Specialist

    domains = list(domains or model.domains)
    unknown = [d for d in domains if d not in model.domains]
    if unknown or len(domains) < 2:
        raise MergeError(f"average merge needs at least two of the specialists {model.domains}; got {domains}")
    specs = [model.specialists[model.domains.index(d)] for d in domains]
    if template_of and template_of not in domains:
        raise MergeError(f"template_of={template_of!r} is not one of the merged domains {domains}")
    lead = specs[domains.index(template_of)] if template_of else specs[0]
    states = [effective_state_dict(s) for s in specs]
    check_mergeable([lead] + [s for s in specs if s is not lead],
                    [states[specs.index(lead)]] + [st for s, st in zip(specs, states) if s is not lead])
    avg = {}
    for k, v in states[0].items():
        acc = torch.zeros(v.shape, dtype=torch.float64 if v.is_floating_point() else v.dtype)
        if not v.is_floating_point():  # integer buffers (none in Llama): must agree, kept as they are
            if any(not torch.equal(v, st[k]) for st in states[1:]):
                raise MergeError(f"non-float tensor {k!r} differs between specialists; cannot average it")
            avg[k] = v
            continue
        for st in states:
            acc += st[k].detach().to("cpu", torch.float64)
        avg[k] = acc / len(states)
    merged = _without_lora(lead.model) if lead._tuner_layers else copy.deepcopy(lead.model)
    target = merged.state_dict()
    if set(target) != set(avg):  # internal invariant: the copy has exactly the averaged tensors
        raise AssertionError(f"merged model keys differ: {sorted(set(target) ^ set(avg))[:5]}")
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(avg[k].to(t.dtype))
    merged.eval().requires_grad_(False)
    cfg = lead.config.model_copy(update={"domain": MERGED_DOMAIN, "adapter": None})
    spec = Specialist(config=cfg, model=merged, adapter=None, tokenizer=lead.tokenizer, renderer=lead.renderer)
    fused_cfg = FuseConfig(specialists=[cfg], gate=GateConfig(mode="uniform"),
                           eos_token=model.config.eos_token, response_tokenizer=0)
    out = FusedModel(fused_cfg, [spec], model.vocab_size, model.eos_token_id)
    out.merged_from = list(domains)
    log.info("average merge of %s (template of %r): %d tensors", domains, lead.domain, len(avg))
    return out


def save_merged(merged, out_dir) -> str:
    """Save the merged model as a plain Hugging Face directory (usable as a specialist anywhere)."""
    s = merged.specialists[0]
    s.model.save_pretrained(out_dir, safe_serialization=True)
    s.tokenizer.save_pretrained(out_dir)
    return str(out_dir)


# ------------------------------------------------------------------------------------------- selection


def answer_nll(model, conversations: Sequence[list[dict]], answers: Sequence[str], batch_size: int = 8) -> list[float]:
    """Mean token NLL of each answer as the reply to its conversation, under the model's current gate
    (end-of-reply token excluded; empty answer -> inf)."""
    import torch
    import torch.nn.functional as F

    out = [math.inf] * len(answers)
    todo = [i for i, a in enumerate(answers) if a]
    for b in range(0, len(todo), batch_size):
        idx = todo[b : b + batch_size]
        ex = [model.align([*conversations[i], {"role": "assistant", "content": answers[i]}]) for i in idx]
        batch = model.collate(ex)
        with torch.no_grad():
            res = model(batch)
        labels = batch.labels.to(res.logits.device)  # (B, J)
        nll = F.cross_entropy(res.logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, J)
        for r, (i, e) in enumerate(zip(idx, ex)):
            start, end = e.reply_spans[-1]  # the answer: the last reply (earlier ones are context)
            if end - 1 > start:  # its own tokens; the span's last target is the end-of-reply id
                out[i] = float(nll[r, start : end - 1].double().mean())
    return out


class SequenceSelector:
    """An `Answerer`: each specialist answers alone; one answer per prompt is kept (see the module docstring).

    After each call, `self.log` holds one dict per prompt answered so far: `chosen` (domain), `candidates`
    (domain -> answer), `nll` (domain -> mean NLL), and for `by="judge"` the shown `order` and `judge` status.
    """

    def __init__(self, model, by: str = "perplexity", score_under: str = "uniform", judge=None,
                 batch_size: int = 8, seed: int = 0):
        if by not in ("perplexity", "judge"):
            raise ConfigError(f"selection by={by!r}: use 'perplexity' or 'judge'")
        if score_under not in ("uniform", "self"):
            raise ConfigError(f"score_under={score_under!r}: use 'uniform' (one common scorer) or 'self'")
        if by == "judge" and judge is None:
            raise ConfigError("selection by='judge' needs a judge (a Judge or JudgeConfig)")
        self.model, self.by, self.score_under, self.batch_size, self.seed = model, by, score_under, batch_size, seed
        if judge is not None:
            from ultrafuser.eval.judge import Judge, JudgeConfig

            judge = Judge(judge) if isinstance(judge, JudgeConfig) else judge  # else anything with .grade()
        self.judge = judge
        self.log: list[dict] = []
        self._calls = 0

    def __call__(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str | None]:
        from ultrafuser.eval.text_tasks import model_answerer

        m, domains = self.model, self.model.domains
        cands: dict[str, list[str | None]] = {}
        for d in domains:
            with m.gate_mode(f"onehot:{d}"):
                cands[d] = model_answerer(m, self.batch_size)(conversations, max_new_tokens)
        nll: dict[str, list[float]] = {}
        for d in domains:
            idx = [i for i, a in enumerate(cands[d]) if a is not None]
            with m.gate_mode("uniform" if self.score_under == "uniform" else f"onehot:{d}"):
                vals = answer_nll(m, [conversations[i] for i in idx], [cands[d][i] for i in idx], self.batch_size)
            nll[d] = [math.inf] * len(conversations)
            for i, v in zip(idx, vals):
                nll[d][i] = v
        entries = []
        for i in range(len(conversations)):
            have = [d for d in domains if cands[d][i] is not None]
            e = {"candidates": {d: cands[d][i] for d in domains}, "nll": {d: nll[d][i] for d in domains},
                 "chosen": min(have, key=lambda d: nll[d][i]) if have else None}
            entries.append(e)
        if self.by == "judge":
            self._judge(conversations, entries)
        self.log.extend(entries)
        self._calls += 1
        return [None if e["chosen"] is None else e["candidates"][e["chosen"]] for e in entries]

    def _judge(self, conversations, entries) -> None:
        from ultrafuser.eval.judge import selection_request

        reqs, where = [], []
        for i, e in enumerate(entries):
            have = [d for d, a in e["candidates"].items() if a is not None]
            if len(have) < 2:
                continue
            order = list(have)
            random.Random(f"select:{self.seed}:{self._calls}:{i}").shuffle(order)
            e["order"] = order
            reqs.append(selection_request(conversations[i], [e["candidates"][d] for d in order]))
            where.append(i)
        for i, j in zip(where, self.judge.grade(reqs)):
            e = entries[i]
            e["judge"] = {"status": j.status, "reason": j.reason, "attempts": j.attempts}
            if j.status == "scored":
                e["chosen"] = e["order"][j.value - 1]
            else:
                e["judge"]["fallback"] = "perplexity"
                log.warning("selection: judge failed on prompt %d (%s); kept the lowest-perplexity answer", i, j.reason)


def select_answers(model, samples, max_new_tokens: int, **kwargs) -> tuple[list[str | None], list[dict]]:
    """Sequence-level selection for task samples (single-turn prompts): (chosen answers, per-sample log)."""
    sel = SequenceSelector(model, **kwargs)
    answers = sel([list(s.messages) for s in samples], max_new_tokens)
    return answers, sel.log


__all__ = [
    "MERGED_DOMAIN",
    "MergeError",
    "SequenceSelector",
    "answer_nll",
    "average_merge",
    "check_mergeable",
    "effective_state_dict",
    "save_merged",
    "select_answers",
]
