"""Baselines on tiny random specialists: weight-averaged merge (dense and LoRA) and sequence-level selection,
each checked against an independent computation with plain Hugging Face models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig
from ultrafuser.eval.baselines import MergeError, SequenceSelector, average_merge, select_answers
from ultrafuser.eval.judge import Judgement
from ultrafuser.eval.tasks import TASKS, Sample
from ultrafuser.eval.text_tasks import EvalContext, answer_mtbench, encode_generation_prompt, load_mtbench
from ultrafuser.modeling.fused import FusedModel

DOMAINS = ("text", "code", "math")
CONVS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "user", "content": "Tom has 3 apples and buys 4 more."}],
    [{"role": "user", "content": "Explain photosynthesis"}, {"role": "assistant", "content": "It is light."},
     {"role": "user", "content": "More?"}],
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fuse(paths, adapters=None, domains=DOMAINS):
    specs = [SpecialistConfig(domain=d, path=p, adapter=(adapters or {}).get(d)) for d, p in zip(domains, paths)]
    return FusedModel.from_config(FuseConfig(specialists=specs, gate=GateConfig(mode="uniform")))


@pytest.fixture(scope="module")
def fused(tiny_dir):
    return fuse([tiny_dir[d] for d in DOMAINS])


def hf_last_logits(model, tok, conv):
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def averaged_hf_model(path, states):
    model = AutoModelForCausalLM.from_pretrained(path)
    avg = {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}
    model.load_state_dict({k: v.float() for k, v in avg.items()}, strict=False)
    return model, avg


def check_merged(merged, ref_model, avg, convs):
    tok = merged.response_tokenizer
    sd = merged.specialists[0].model.state_dict()
    for k, v in avg.items():
        assert torch.allclose(sd[k].double(), v, atol=1e-6), k
    state = merged.start_decoding([encode_generation_prompt(merged, c) for c in convs])
    for b, c in enumerate(convs):
        want = hf_last_logits(ref_model, tok, c)
        assert torch.allclose(state.logits[b], want, atol=1e-4), (state.logits[b] - want).abs().max()


# ------------------------------------------------------------------------------------------- averaging


def test_average_merge_equals_manual_average(fused, tiny_dir, tmp_path):
    before = fused.specialists[1].model.model.embed_tokens.weight.clone()
    merged = average_merge(fused)
    assert merged.domains == ["merged"] and merged.merged_from == list(DOMAINS) and len(merged.specialists) == 1
    states = [load_file(f"{tiny_dir[d]}/model.safetensors") for d in DOMAINS]
    ref, avg = averaged_hf_model(tiny_dir["text"], states)
    check_merged(merged, ref, avg, CONVS)
    assert torch.equal(fused.specialists[1].model.model.embed_tokens.weight, before)  # originals untouched
    # a subset merges too; the merged model runs through generation like any fused model
    two = average_merge(fused, domains=["text", "math"], template_of="math")
    ref2, avg2 = averaged_hf_model(tiny_dir["math"], [states[0], states[2]])
    check_merged(two, ref2, avg2, CONVS[:2])
    from ultrafuser.modeling.generation import SamplingParams, generate

    assert len(generate(two, [two.encode_prompt(CONVS[0])], SamplingParams(max_new_tokens=3))[0].token_ids) <= 3
    # and a task runs on it: TruthfulQA-MC2 from the merged model's own Yes/No probabilities
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "test.jsonl").write_text(json.dumps(
        {"question": "Is the sky green?", "mc2_targets": {"choices": ["No", "Yes"], "labels": [1, 0]}}) + "\n")
    res = TASKS["truthfulqa-mc2"].evaluate(TASKS["truthfulqa-mc2"].load(str(tmp_path)), EvalContext(model=merged))
    assert res.summary["n_scored"] == 1 and 0 <= res.summary["score"] <= 1


def test_average_merge_of_lora_specialists_averages_merged_adapters(tiny_dir):
    from peft import PeftModel

    model = fuse([tiny_dir["text"]] * 3, adapters={"code": tiny_dir["lora_code"], "math": tiny_dir["lora_math"]})
    merged = average_merge(model)
    base = load_file(f"{tiny_dir['text']}/model.safetensors")
    states = [base]
    for name in ("lora_code", "lora_math"):  # merge each adapter into a fresh base with PEFT itself
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir["text"]), tiny_dir[name])
        states.append({k: v for k, v in m.merge_and_unload().state_dict().items() if k in base})
    assert not torch.allclose(states[1]["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    ref, avg = averaged_hf_model(tiny_dir["text"], states)
    check_merged(merged, ref, avg, CONVS)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the LoRA specialists still run with their adapters afterwards
    with model.gate_mode("onehot:code"):
        got = model.start_decoding([model.encode_prompt(CONVS[0])]).logits[0]
    code = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir["text"]), tiny_dir["lora_code"])
    assert torch.allclose(got, hf_last_logits(code.merge_and_unload(), model.response_tokenizer, CONVS[0]), atol=1e-4)


def test_average_merge_refuses_different_shapes_and_rope(tiny_dir, tmp_path):
    import sys

    wide = fuse([tiny_dir["text"], tiny_dir["wide"]], domains=("text", "code"))
    with pytest.raises(MergeError, match=r"shape \(300, 32\) in 'text' but \(300, 48\) in 'code'"):
        average_merge(wide)
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from tinymodels import make_llama

    extra_rows = make_llama(tmp_path / "rows", fuse([tiny_dir["text"]], domains=("text",)).response_tokenizer,
                            seed=9, vocab_rows=316)  # like CodeLlama's 16 extra rows
    with pytest.raises(MergeError, match="316"):
        average_merge(fuse([tiny_dir["text"], extra_rows], domains=("text", "code")))
    rope = tmp_path / "rope"
    shutil.copytree(tiny_dir["code"], rope)
    cfg = json.loads((rope / "config.json").read_text())
    cfg.setdefault("rope_parameters", {"rope_type": "default"})["rope_theta"] = 1e6
    cfg.pop("rope_theta", None)
    (rope / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="positional encoding differs"):
        average_merge(fuse([tiny_dir["text"], str(rope)], domains=("text", "code")))
    with pytest.raises(MergeError, match="at least two"):
        average_merge(fuse([tiny_dir["text"], tiny_dir["code"]], domains=("text", "code")), domains=["text"])


# ------------------------------------------------------------------------------------------- selection


def independent_nll(models, tok, conv, answer):
    """Mean NLL of the answer's tokens after the chat-template prompt, under the mean of `models`' logits."""
    prompt = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    ans = tok(answer, add_special_tokens=False)["input_ids"]
    if not ans:
        return float("inf")
    ids = torch.tensor([prompt + ans])
    with torch.no_grad():
        z = torch.stack([m(ids).logits[0] for m in models]).mean(0).double()  # (T, V)
    logp = torch.log_softmax(z[len(prompt) - 1 : len(prompt) - 1 + len(ans)], -1)
    return float(-logp[torch.arange(len(ans)), torch.tensor(ans)].mean())


def test_sequence_selection_picks_lowest_perplexity(fused, tiny_dir):
    tok = fused.response_tokenizer
    hf = {d: AutoModelForCausalLM.from_pretrained(tiny_dir[d]) for d in DOMAINS}
    for score_under in ("uniform", "self"):
        sel = SequenceSelector(fused, score_under=score_under, batch_size=3)
        answers = sel(CONVS, 6)
        assert len(sel.log) == len(CONVS)
        for conv, ans, e in zip(CONVS, answers, sel.log):
            # candidates = each specialist's own greedy answer (plain HF generation)
            ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
            for d in DOMAINS:
                out = hf[d].generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
                out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
                assert e["candidates"][d] == tok.decode(out), (d, conv)
            want = {d: independent_nll(list(hf.values()) if score_under == "uniform" else [hf[d]], tok, conv,
                                       e["candidates"][d]) for d in DOMAINS}
            assert e["nll"] == pytest.approx(want, rel=1e-4, abs=1e-4)
            best = min(DOMAINS, key=lambda d: want[d])
            assert e["chosen"] == best and ans == e["candidates"][best]
    assert len({round(v, 3) for e in sel.log for v in e["nll"].values()}) > 3  # the choice is not vacuous


def test_selection_answers_feed_tasks(fused):
    samples = [Sample(f"s{i}", c[:1], {}) for i, c in enumerate(CONVS[:2])]
    answers, logs = select_answers(fused, samples, 4)
    assert answers == [e["candidates"][e["chosen"]] for e in logs]
    # multi-turn: turn 2 is selected on top of the answer chosen for turn 1
    qs = [s for s in load_mtbench() if s.reference["question_id"] in (116, 120)]
    sel = SequenceSelector(fused)
    both = answer_mtbench(qs, sel, 3)
    assert len(sel.log) == 4
    assert [b[0] for b in both] == [e["candidates"][e["chosen"]] for e in sel.log[:2]]
    ctx = EvalContext(answerer=sel)
    assert ctx.get_answerer("x") is sel


class ScriptedJudge:
    """Stands in for `Judge` (the HTTP path is tested in test_judge_tasks): answers every request with `reply`
    through the request's own parser, or fails like the real one does."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def grade(self, requests):
        self.requests += requests
        out = []
        for r in requests:
            try:
                out.append(Judgement("scored", value=r.parse(self.reply, False), attempts=1))
            except ValueError as e:
                out.append(Judgement("judge_error", reason="unparseable_output", detail=str(e), attempts=3))
        return out


def test_selection_by_judge_maps_shuffled_positions_back(fused):
    judge = ScriptedJudge("Response 1 is best. [[1]]")
    sel = SequenceSelector(fused, by="judge", judge=judge, seed=3)
    convs = CONVS * 3
    answers = sel(convs, 4)
    orders = [tuple(e["order"]) for e in sel.log]
    assert len(set(orders)) > 1  # shuffled per prompt
    for e, ans, req in zip(sel.log, answers, judge.requests):
        assert e["chosen"] == e["order"][0] and ans == e["candidates"][e["order"][0]]
        assert "[The Start of Response 3]" in req.messages[1]["content"]
    bad = SequenceSelector(fused, by="judge", judge=ScriptedJudge("no idea"))
    answers = bad(CONVS[:2], 4)
    for e, ans in zip(bad.log, answers):
        assert e["judge"]["status"] == "judge_error" and e["judge"]["fallback"] == "perplexity"
        assert e["chosen"] == min(DOMAINS, key=lambda d: e["nll"][d])
