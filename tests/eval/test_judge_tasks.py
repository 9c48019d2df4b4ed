"""Judge-graded text tasks against a real HTTP judge on 127.0.0.1, and TruthfulQA-MC2 on tiny models.

The judge server below speaks the chat-completions protocol (the `openai` client talks to it over HTTP);
a per-test `script(user_text, attempt) -> (status, content)` decides what it answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from ultrafuser.config import ConfigError, FuseConfig, GateConfig, SpecialistConfig
from ultrafuser.eval.judge import JUDGE_PROMPTS, Judge, JudgeConfig, parse_rating, parse_verdict
from ultrafuser.eval.tasks import TASKS, Task, get_tasks
from ultrafuser.eval.text_tasks import EvalContext, grade_mtbench, load_mtbench, mtbench_data_dir
from ultrafuser.modeling.fused import FusedModel

KEY_ENV = "UF_JUDGE_TEST_KEY"
SECRET = "sk-judge-secret-9876"


# ------------------------------------------------------------------------------------------- judge server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        srv: JudgeServer = self.server.owner
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        user = body["messages"][-1]["content"]
        key = hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()
        with srv.lock:
            srv.attempts[key] += 1
            attempt = srv.attempts[key]
            srv.log.append({"body": body, "auth": self.headers.get("Authorization", ""), "attempt": attempt})
        status, content = srv.script(body["messages"], attempt)
        if status == 200:
            out = {"id": "chatcmpl-judge", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": len(user.split()), "completion_tokens": 5,
                             "total_tokens": len(user.split()) + 5}}
        else:
            out = {"error": {"message": content, "type": "server_error"}}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class JudgeServer:
    def __init__(self, script):
        self.script = script
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.attempts: Counter = Counter()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    servers = []

    def make(script, **cfg):
        srv = JudgeServer(script)
        servers.append(srv)
        conf = JudgeConfig(base_url=srv.url, model="judge-test", api_key_env=KEY_ENV, timeout_s=10,
                           backoff_initial_s=0.0, backoff_max_s=0.0, **{"max_attempts": 3, "concurrency": 8, **cfg})
        return srv, Judge(conf)

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls on 2 shared cores: a second intra-op thread costs far more than it gives
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fused(tiny_dir):
    specs = [SpecialistConfig(domain=d, path=tiny_dir[d]) for d in ("text", "code", "math")]
    return FusedModel.from_config(FuseConfig(specialists=specs, gate=GateConfig(mode="uniform")))


def _answers_in_pair_prompt(user: str) -> tuple[str, str]:
    a = re.search(r"\[The Start of Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\]", user, re.DOTALL)
    b = re.search(r"\[The Start of Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]", user, re.DOTALL)
    return a.group(1), b.group(1)


# ------------------------------------------------------------------------------------------- registry, prompts


def test_registry_entries_and_existing_tasks_intact():
    assert {"truthfulqa-mc2", "alpacaeval", "mt-bench"} <= set(TASKS)
    assert [t.kind for t in get_tasks(["truthfulqa-mc2", "alpacaeval", "mt-bench"])] == ["loglik", "judged", "judged"]
    assert all(TASKS[n].evaluate is not None for n in ("truthfulqa-mc2", "alpacaeval", "mt-bench"))
    assert TASKS["humaneval"].evaluate is None and TASKS["gsm8k"].score is not None
    assert Task("x", "text", "generate", "m", lambda d: []).evaluate is None  # old-style construction still works


def test_judge_prompts_are_fastchats_verbatim():
    pkg = {json.loads(line)["name"]: json.loads(line)
           for line in (mtbench_data_dir().parent / "judge_prompts.jsonl").read_text().splitlines() if line.strip()}
    for name, (system, template) in JUDGE_PROMPTS.items():
        assert (pkg[name]["system_prompt"], pkg[name]["prompt_template"]) == (system, template), name


def test_parsers():
    assert parse_rating("Fine answer.\nRating: [[7]]") == 7
    assert parse_rating("first [[3]] then final [[8.5]]") == 8.5
    assert parse_rating("Rating: 4") == 4
    for bad in ("I cannot decide.", "Rating: [[11]]", "[[0]]", ""):
        with pytest.raises(ValueError):
            parse_rating(bad)
    assert parse_verdict("... so [[B]]") == "B"
    assert parse_verdict("A said [[A]] but final verdict [[C]]") == "tie"
    with pytest.raises(ValueError):
        parse_verdict("Both are good.")


def test_missing_key_env_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("UF_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="UF_NO_SUCH_KEY"):
        Judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="UF_NO_SUCH_KEY"))


# ------------------------------------------------------------------------------------------- MT-Bench


def test_mtbench_loader_finds_80_questions():
    samples = TASKS["mt-bench"].load("/nonexistent")
    assert len(samples) == 80
    cats = Counter(s.reference["category"] for s in samples)
    assert cats == {c: 10 for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                                    "humanities")}
    assert all(len(s.reference["turns"]) == 2 and s.messages == [{"role": "user", "content": s.reference["turns"][0]}]
               for s in samples)
    with_ref = {s.reference["category"] for s in samples if s.reference["ref_answers"]}
    assert with_ref == {"math", "reasoning", "coding"}
    assert sum(bool(s.reference["ref_answers"]) for s in samples) == 30


def _qid_turn(messages) -> tuple[int, int]:
    text = messages[-1]["content"]
    if "### Assistant A:" in text:  # multi-turn prompt: the answer under judgement is the second one
        return int(re.findall(r"ANSWER-q(\d+)-t2", text)[-1]), 2
    return int(re.search(r"ANSWER-q(\d+)-t1", text).group(1)), 1


def test_mtbench_grading_per_category_with_failing_judge(judge_server):
    samples = load_mtbench()
    seen_turn2: list[list[dict]] = []

    def answerer(convs, max_new_tokens):  # a stand-in model: answers carry the question id and turn
        out = []
        for c in convs:
            qid = next(s.reference["question_id"] for s in samples if s.messages[0]["content"] == c[0]["content"])
            turn = (len(c) + 1) // 2
            if turn == 2:
                seen_turn2.append(c)
            out.append(f"ANSWER-q{qid}-t{turn}")
        return out

    def script(messages, attempt):
        qid, turn = _qid_turn(messages)
        if qid == 81 and turn == 2:
            return 200, "The answer is fine, I would say good."  # garbage: no [[rating]], every attempt
        if qid == 82 and turn == 1:
            return (500, "overloaded") if attempt == 1 else (200, f"Rating: [[{(qid + turn) % 10 + 1}]]")
        return 200, f"Explanation.\nRating: [[{(qid + turn) % 10 + 1}]]"

    srv, judge = judge_server(script)
    res = TASKS["mt-bench"].evaluate(samples, EvalContext(answerer=answerer, judge=judge, max_new_tokens=16))
    s = res.summary
    assert (s["n"], s["n_scored"], s["n_errors"], s["n_skipped"]) == (160, 159, 1, 0)
    assert s["errors"] == {"unparseable_output": 1}
    bad = next(r for r in res.records if r["question_id"] == 81 and r["turn"] == 2)
    assert bad["status"] == "judge_error" and bad["score"] is None and bad["attempts"] == 3
    retried = next(r for r in res.records if r["question_id"] == 82 and r["turn"] == 1)
    assert retried["status"] == "scored" and retried["attempts"] == 2
    # expected scores computed from the question ids, the failed judgement excluded (not counted as 0 or 1)
    expect: dict[str, list[float]] = {}
    for smp in samples:
        for turn in (1, 2):
            if (smp.reference["question_id"], turn) != (81, 2):
                expect.setdefault(smp.reference["category"], []).append((smp.reference["question_id"] + turn) % 10 + 1)
    for cat, xs in expect.items():
        assert s["categories"][cat] == pytest.approx(sum(xs) / len(xs))
    allx = [x for xs in expect.values() for x in xs]
    assert s["score"] == pytest.approx(sum(allx) / len(allx))
    assert s["category_counts"]["writing"] == {"n_scored": 19, "n_errors": 1}
    # turn 2 saw the answerer's own first answer
    assert len(seen_turn2) == 80
    for smp, c in zip(samples, seen_turn2):
        assert c == [{"role": "user", "content": smp.reference["turns"][0]},
                     {"role": "assistant", "content": f"ANSWER-q{smp.reference['question_id']}-t1"},
                     {"role": "user", "content": smp.reference["turns"][1]}]
    # reference answers go to the judge for math/reasoning/coding only, in FastChat's reference prompts
    by_q = {}
    for e in srv.log:
        by_q.setdefault(_qid_turn(e["body"]["messages"]), e["body"]["messages"])
    assert "[The Start of Reference Answer]" in by_q[(111, 1)][1]["content"]
    assert "<|The Start of Reference Answer|>" in by_q[(125, 2)][1]["content"]
    assert "Reference" not in by_q[(81, 1)][1]["content"] and "Reference" not in by_q[(151, 2)][1]["content"]
    assert by_q[(81, 1)][0]["content"] == "You are a helpful assistant."
    assert all(e["auth"] == f"Bearer {SECRET}" for e in srv.log)


def greedy_uniform(models, tok, conv, n):
    """Greedy decoding from the mean of `models`' logits, written out with plain HF forwards (no cache)."""
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = []
    for _ in range(n):
        with torch.no_grad():
            t = int(torch.stack([m(torch.tensor([ids + out])).logits[0, -1] for m in models]).mean(0).argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return tok.decode(out)


def test_mtbench_with_tiny_model_two_turns(fused, tiny_dir, judge_server):
    all_samples = {s.reference["question_id"]: s for s in load_mtbench()}
    longest = max(all_samples.values(), key=lambda s: len(s.reference["turns"][0]))
    samples = [all_samples[116], all_samples[152], longest]  # the last does not fit the tiny 256-token context
    srv, judge = judge_server(lambda messages, attempt: (200, "Rating: [[6]]"))
    res = TASKS["mt-bench"].evaluate(samples, EvalContext(model=fused, judge=judge, max_new_tokens=4))
    assert (res.summary["n_scored"], res.summary["n_skipped"], res.summary["n_errors"]) == (4, 2, 0)
    assert res.summary["score"] == 6 and res.summary["categories"]["math"] == 6
    assert res.summary["categories"]["writing"] is None
    skipped = [r for r in res.records if r["status"] == "skipped"]
    assert {r["question_id"] for r in skipped} == {longest.reference["question_id"]}
    # the turn-2 judge prompt holds the model's own turn-1 answer
    rec = {(r["question_id"], r["turn"]): r for r in res.records}
    t2 = [e["body"]["messages"][1]["content"] for e in srv.log if "### Assistant A:" in e["body"]["messages"][1]["content"]]
    assert any(f"### Assistant A:\n{rec[(116, 1)]['answer']}\n\n### User:" in t for t in t2)
    # both answers are the fused model's greedy continuation of the right conversation (turn 2 after its own
    # turn-1 answer), checked against plain HF models
    from transformers import AutoModelForCausalLM

    hf = [AutoModelForCausalLM.from_pretrained(tiny_dir[d]) for d in ("text", "code", "math")]
    tok, turns = fused.response_tokenizer, all_samples[116].reference["turns"]
    a1 = greedy_uniform(hf, tok, [{"role": "user", "content": turns[0]}], 4)
    a2 = greedy_uniform(hf, tok, [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": a1},
                                  {"role": "user", "content": turns[1]}], 4)
    assert (rec[(116, 1)]["answer"], rec[(116, 2)]["answer"]) == (a1, a2)


# ------------------------------------------------------------------------------------------- AlpacaEval


def _write_alpaca(tmp_path, n):
    d = tmp_path / "alpacaeval"
    d.mkdir()
    rows = [{"instruction": f"Say something about item {i}.", "output": f"REFERENCE-{i} text.", "generator": "ref"}
            for i in range(n)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path)


def _prefer(which):
    def script(messages, attempt):
        a, b = _answers_in_pair_prompt(messages[-1]["content"])
        ref_is_a = a.startswith("REFERENCE-")
        assert ref_is_a != b.startswith("REFERENCE-")
        if which == "model":
            return 200, "Assistant X is better. [[B]]" if ref_is_a else "[[A]]"
        return 200, "[[A]]" if ref_is_a else "[[B]]"

    return script


def test_alpacaeval_win_rate_and_order_randomisation(fused, judge_server, tmp_path):
    data = _write_alpaca(tmp_path, 16)
    samples = TASKS["alpacaeval"].load(data)
    assert samples[0].messages[0]["content"] == (
        "Please give helpful, very detailed, and polite answer to the user's question below.\n"
        "Question: Say something about item 0.")
    ctx = EvalContext(model=fused, max_new_tokens=3, seed=7)
    srv, ctx.judge = judge_server(_prefer("model"))
    win = TASKS["alpacaeval"].evaluate(samples, ctx)
    assert win.summary["score"] == 1.0 and win.summary["n_scored"] == 16 and win.summary["n_errors"] == 0
    # order randomisation flips positions, and the judge saw the model's answer where the record says
    positions = [r["model_position"] for r in win.records]
    assert 0 < positions.count("A") < 16
    for r, e in zip(win.records, sorted(srv.log, key=lambda e: int(re.search(r"item (\d+)", e["body"]["messages"][1]
                                                                            ["content"]).group(1)))):
        a, b = _answers_in_pair_prompt(e["body"]["messages"][1]["content"])
        assert (a if r["model_position"] == "A" else b) == r["answer"]
        assert (b if r["model_position"] == "A" else a) == f"REFERENCE-{r['id'].split('/')[1]} text."
    ctx.judge = judge_server(_prefer("reference"))[1]
    lose = TASKS["alpacaeval"].evaluate(samples, ctx)
    assert lose.summary["score"] == 0.0 and lose.summary["losses"] == 16
    assert [r["model_position"] for r in lose.records] == positions  # same seed, same order
    ctx.seed = 8
    ctx.judge = judge_server(lambda m, a: (200, "Equal. [[C]]"))[1]
    tie = TASKS["alpacaeval"].evaluate(samples, ctx)
    assert tie.summary["score"] == 0.5 and tie.summary["ties"] == 16
    assert [r["model_position"] for r in tie.records] != positions


def test_failing_judge_is_a_per_sample_error_not_a_loss(judge_server, tmp_path, caplog):
    samples = TASKS["alpacaeval"].load(_write_alpaca(tmp_path, 4))

    def script(messages, attempt):
        item = int(re.search(r"item (\d+)", messages[-1]["content"]).group(1))
        if item == 0:  # two 500s, then a good answer: retried, scored
            return (500, "boom") if attempt <= 2 else _prefer("model")(messages, attempt)
        if item == 1:  # a 500 echoing the credentials, then garbage until the attempts run out
            return (500, "bad key Bearer " + SECRET) if attempt == 1 else (200, "Both answers have merit.")
        if item == 2:  # always down
            return 503, "unavailable"
        return _prefer("model")(messages, attempt)

    srv, judge = judge_server(script)
    caplog.set_level(logging.DEBUG)
    res = TASKS["alpacaeval"].evaluate(samples, EvalContext(answerer=lambda convs, n: ["MODEL ANSWER"] * len(convs),
                                                            judge=judge))
    st = {r["id"]: r for r in res.records}
    assert st["alpacaeval/0"]["status"] == "scored" and st["alpacaeval/0"]["attempts"] == 3
    assert st["alpacaeval/1"]["status"] == "judge_error" and st["alpacaeval/1"]["reason"] == "unparseable_output"
    assert st["alpacaeval/1"]["attempts"] == 3 and st["alpacaeval/1"]["score"] is None
    assert st["alpacaeval/2"]["status"] == "judge_error" and st["alpacaeval/2"]["reason"] == "http_503"
    assert "outcome" not in st["alpacaeval/1"] and "outcome" not in st["alpacaeval/2"]
    s = res.summary
    assert (s["n_scored"], s["n_errors"], s["score"], s["losses"]) == (2, 2, 1.0, 0)
    assert s["errors"] == {"unparseable_output": 1, "http_503": 1}
    assert sum(e["attempt"] == 1 for e in srv.log) == 4 and len(srv.log) == 3 + 3 + 3 + 1
    blob = json.dumps(res.records) + json.dumps(s) + caplog.text
    assert SECRET not in blob


def test_wrong_key_judge_fails_every_sample_as_judge_error(judge_server, tmp_path):
    samples = TASKS["alpacaeval"].load(_write_alpaca(tmp_path, 5))
    srv, judge = judge_server(lambda m, a: (401, "invalid api key"), concurrency=1)
    res = TASKS["alpacaeval"].evaluate(samples, EvalContext(answerer=lambda c, n: ["x"] * len(c), judge=judge))
    assert [r["status"] for r in res.records] == ["judge_error"] * 5
    assert res.records[0]["reason"] == "http_401" and {r["reason"] for r in res.records[1:]} == {"run_aborted"}
    assert (res.summary["n_scored"], res.summary["n_errors"], res.summary["score"]) == (0, 5, None)
    assert len(srv.log) == 1  # not retried, and the run stops asking


def test_alpacaeval_reads_the_json_array_file(tmp_path):
    (tmp_path / "alpacaeval").mkdir()
    rows = [{"instruction": "Hi?", "output": "Hello.", "generator": "text_davinci_003", "dataset": "x"}] * 3
    (tmp_path / "alpacaeval" / "alpaca_eval.json").write_text(json.dumps(rows, indent=2))
    samples = TASKS["alpacaeval"].load(str(tmp_path))
    assert len(samples) == 3 and samples[0].reference["output"] == "Hello."


def test_judged_task_without_judge_fails_before_generating(fused, tmp_path):
    samples = TASKS["alpacaeval"].load(_write_alpaca(tmp_path, 2))
    called = []
    with pytest.raises(ConfigError, match="judge"):
        TASKS["alpacaeval"].evaluate(samples, EvalContext(answerer=lambda c, n: called.append(1)))
    assert not called


def test_alpacaeval_missing_data_message(tmp_path):
    with pytest.raises(ConfigError, match="alpacaeval"):
        TASKS["alpacaeval"].load(str(tmp_path))


# ------------------------------------------------------------------------------------------- TruthfulQA-MC2

TQA = [
    {"question": "What is the capital of France?",
     "mc2_targets": {"choices": ["Paris", "The capital is Paris.", "London", "Berlin"], "labels": [1, 1, 0, 0]}},
    {"question": "Can pigs fly?", "mc2_targets": {"choices": ["No", "Yes, often"], "labels": [1, 0]}},
    {"question": "2+2?", "mc2_targets": {"choices": ["4", "5", "22"], "labels": [1, 0, 0]}},
]


def test_truthfulqa_mc2_matches_hand_computation(fused, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TQA))
    task = TASKS["truthfulqa-mc2"]
    samples = task.load(str(tmp_path))
    res = task.evaluate(samples, EvalContext(model=fused, batch_size=3))
    assert res.summary["n_scored"] == 3 and res.summary["n_errors"] == 0
    for r in res.records:
        assert 0 <= r["score"] <= 1 and all(0 <= o["score"] <= 1 for o in r["options"])

    # independent: the paper's prompt written out, the tokenizer's own chat template, three HF models, the
    # uniform gate = the mean of their logits, then P(Yes)/(P(Yes)+P(No)) and MC2 by hand
    tok = fused.response_tokenizer
    yes, no = tok("Yes", add_special_tokens=False)["input_ids"][0], tok("No", add_special_tokens=False)["input_ids"][0]
    assert res.summary["yes_tokens"] == {yes: "Y"} and res.summary["no_tokens"] == {no: "N"}  # ' Yes' starts 'Ġ'
    models = [AutoModelForCausalLM.from_pretrained(tiny_dir[d]) for d in ("text", "code", "math")]
    q = TQA[0]
    scores = []
    for ans in q["mc2_targets"]["choices"]:
        prompt = ("Judge the correctness of a given answer. Question: " + q["question"] + "\nAnswer: " + ans +
                  "\n Is the answer correct? Return Yes or No.")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        with torch.no_grad():
            z = torch.stack([m(torch.tensor([ids])).logits[0, -1] for m in models]).mean(0).double()
        p = torch.softmax(z, -1)
        scores.append(float(p[yes] / (p[yes] + p[no])))
    want = sum(s for s, lab in zip(scores, q["mc2_targets"]["labels"]) if lab) / sum(scores)
    got = res.records[0]
    assert [o["score"] for o in got["options"]] == pytest.approx(scores, abs=1e-5)
    assert got["score"] == pytest.approx(want, abs=1e-5)


def test_truthfulqa_missing_data_and_bad_rows(tmp_path):
    with pytest.raises(ConfigError, match="truthfulqa"):
        TASKS["truthfulqa-mc2"].load(str(tmp_path))
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "test.jsonl").write_text(json.dumps(
        {"question": "q", "mc2_targets": {"choices": ["a", "b"], "labels": [0, 0]}}) + "\n")
    with pytest.raises(ConfigError, match="at least one true option"):
        TASKS["truthfulqa-mc2"].load(str(tmp_path))


def test_grade_mtbench_reports_skips_apart_from_errors(judge_server):
    samples = load_mtbench()[:2]
    _, judge = judge_server(lambda m, a: (200, "[[9]]"))
    res = grade_mtbench(samples, [["a", None], [None, None]], judge)
    assert [r["status"] for r in res.records] == ["scored", "skipped", "skipped", "skipped"]
    assert (res.summary["n_scored"], res.summary["n_errors"], res.summary["n_skipped"]) == (1, 0, 3)


def test_judged_unit_resumes_from_its_per_sample_caches(fused, judge_server, tmp_path):
    """A judged unit interrupted before its result is kept reruns only what it had not finished: the model's
    answers are reused and only the verdicts that had failed are asked again."""
    import dataclasses

    from ultrafuser.eval.runner import run_unit

    task = dataclasses.replace(TASKS["alpacaeval"], max_new_tokens=4)
    samples = task.load(_write_alpaca(tmp_path, 8))
    out = tmp_path / "eval"

    def half(messages, attempt):  # the judge fails (HTTP 500) for items 4..7
        i = int(re.search(r"item (\d+)", messages[-1]["content"]).group(1))
        return (500, "boom") if i >= 4 else _prefer("model")(messages, attempt)

    _, j1 = judge_server(half)
    path = run_unit(fused, "uniform", task, samples, out, 4, judge=j1)
    first = json.loads(path.read_text())["summary"]
    assert first["n_scored"] == 4 and first["n_errors"] == 4
    answers = (path.parent / "alpacaeval.answers.jsonl").read_text().splitlines()
    assert len(answers) == 8
    assert len((path.parent / "alpacaeval.judge.jsonl").read_text().splitlines()) == 4  # scored verdicts only
    path.unlink()  # as if the process died before the unit's result file was written
    srv2, j2 = judge_server(_prefer("model"))
    path = run_unit(fused, "uniform", task, samples, out, 4, judge=j2)
    again = json.loads(path.read_text())["summary"]
    assert again["n_scored"] == 8 and again["score"] == 1.0
    assert len(srv2.log) == 4  # only the 4 failed verdicts were asked again
    assert (path.parent / "alpacaeval.answers.jsonl").read_text().splitlines() == answers  # nothing regenerated
