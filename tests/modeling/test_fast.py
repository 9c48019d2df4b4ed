"""The fast fused decoder (modeling/fast.py) against the straightforward reference path (tiny models, fp32, CPU)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig
from ultrafuser.data.conversation import Aligned
from ultrafuser.modeling import fast
from ultrafuser.modeling.fast import FastFusedDecoder, Unsupported, device_sample
from ultrafuser.modeling import cpu_kernels, fast_llama
from ultrafuser.modeling.fast_llama import describe
from ultrafuser.modeling.fused import FusedModel
from ultrafuser.modeling import generation
from ultrafuser.modeling.generation import SamplingParams


def generate(*args, **kw):
    """The reference: the core's straightforward path (generation.generate takes the fast path by default)."""
    return generation.generate(*args, fast=False, **kw)


TEMPLATES = {
    "code": "ultralm",
    "math": "alpaca",
}  # different templates: different prompt lengths per specialist
TEXTS = ["Hi", "Write a function that returns the sum of a list.", "Tom has 3 apples. How many?"]
GREEDY = SamplingParams(max_new_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # 2 shared cores: one intra-op thread avoids oversubscription stalls (and the tiny matmuls gain nothing)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fuse(paths, adapters=None, gate="learned", domains=("text", "code", "math"), seed=0):
    specs = [
        SpecialistConfig(domain=d, path=p, template=TEMPLATES.get(d), adapter=(adapters or {}).get(d))
        for d, p in zip(domains, paths)
    ]
    model = FusedModel.from_config(FuseConfig(specialists=specs, gate=GateConfig.parse(gate)))
    if model.gate is not None:  # a non-trivial gate, so the fused tokens depend on it
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.gate.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def dense(tiny_dir):
    model = fuse([tiny_dir["text"], tiny_dir["code"], tiny_dir["math"]])
    prompts = [model.encode_prompt(t) for t in TEXTS]
    return model, prompts, [c.token_ids for c in generate(model, prompts, GREEDY)]


@pytest.fixture(scope="module")
def lora(tiny_dir):
    base = tiny_dir["text"]
    model = fuse([base] * 3, adapters={"code": tiny_dir["lora_code"], "math": tiny_dir["lora_math"]}, seed=1)
    prompts = [model.encode_prompt(t) for t in TEXTS]
    return model, prompts, [c.token_ids for c in generate(model, prompts, GREEDY)]


def ids(completions):
    return [c.token_ids for c in completions]


@pytest.mark.parametrize("weights", ["copy", "refs"])
def test_dense_greedy_tokens_identical(dense, weights):
    model, prompts, want = dense
    assert len({len(p.input_ids[k]) for p in prompts for k in range(3)}) > 3  # left padding really differs
    dec = FastFusedDecoder(model, max_batch=4, max_len=256, weights=weights)
    assert dec.describe_groups() == [
        {"specialists": ["text", "code", "math"], "device": "cpu", "shared_base": False, "weights": weights}
    ]
    got = ids(dec.generate(prompts, GREEDY))
    assert got == want and all(len(t) == 64 for t in got)
    # a second request on the same static buffers, smaller batch, gives the same tokens again
    assert ids(dec.generate(prompts[1:], GREEDY)) == want[1:]


def test_lora_shared_base_runs_as_one_batch(lora):
    model, prompts, want = lora
    dec = FastFusedDecoder(model, max_batch=4, max_len=256)
    (g,) = dec.describe_groups()
    assert g["shared_base"] and g["specialists"] == ["text", "code", "math"]
    # the base weights exist once in the group: one (out, in) matrix per projection, no per-specialist stack
    q = dec.groups[0].layers[0]["qkv"]
    assert len(q.P) == 1 if q.P is not None else q.Wt.dim() == 2
    assert ids(dec.generate(prompts, GREEDY)) == want


def test_shared_head_runs_once_on_the_mixed_hidden_states(lora):
    """Members of a shared group have one LM head and the fusion is linear in the logits, so the fast path mixes
    their hidden states by the gate weights and runs the head once per prompt: the reference's greedy tokens, and
    the same fused logits (to fp32 rounding) as forming every member's logits (mix_before_head=False)."""
    model, prompts, want = lora
    dec = FastFusedDecoder(model, max_batch=4, max_len=256)
    g = dec.groups[0]
    assert dec.head_after_mix == [g] and g.mixed_head
    heads, orig = [], g._head

    def spy(h, *a, **kw):
        heads.append(tuple(h.shape))
        return orig(h, *a, **kw)

    g._head = spy
    assert ids(dec.generate(prompts, GREEDY)) == want
    assert heads and all(s[0] == 1 for s in heads)  # (1, rows, H): never one head product per member
    per_member = FastFusedDecoder(model, max_batch=4, max_len=256, mix_before_head=False)
    assert per_member.head_after_mix == []
    assert ids(per_member.generate(prompts, GREEDY)) == want
    z, w = dec.start_decoding(prompts)
    z0, w0 = per_member.start_decoding(prompts)
    for _ in range(6):
        assert torch.allclose(w, w0, atol=1e-6, rtol=0)
        assert (z - z0).abs().max() <= 1e-5 * z0.abs().max()
        tok = z0.argmax(-1)
        z, w = dec.decode_step(tok)
        z0, w0 = per_member.decode_step(tok)


def test_prefill_skips_left_padding_row_by_row(dense, lora):
    """On the CPU, prompts of different lengths are prefilled one row at a time into their own slot range (no
    compute on left padding); same-length prompts keep one batched prefill. Tokens equal the reference either way."""
    for model, prompts, want in (dense, lora):
        dec = FastFusedDecoder(model, max_batch=4, max_len=256)
        g = dec.groups[0]
        calls, orig = [], g.prefill

        def spy(ids, mask, row0=0, slot0=0, **kw):
            calls.append((ids.shape[1], row0, slot0))
            return orig(ids, mask, row0, slot0, **kw)

        g.prefill = spy
        assert ids(dec.generate(prompts, GREEDY)) == want
        assert [c[:2] for c in calls] == [(1, 0), (1, 1), (1, 2)]
        assert min(c[2] for c in calls) == 0 and max(c[2] for c in calls) > 0  # the shorter rows start later
        calls.clear()
        same = [prompts[1], prompts[1]]
        assert ids(dec.generate(same, GREEDY)) == [want[1], want[1]]
        assert calls == [(2, 0, 0)]


def test_teacher_forced_logits_match(dense, lora):
    for model, prompts, _ in (dense, lora):
        dec = FastFusedDecoder(model, max_batch=4, max_len=256)
        s = model.start_decoding(prompts)
        z, w = dec.start_decoding(prompts)
        for _ in range(6):
            assert torch.allclose(z, s.logits, atol=1e-4, rtol=0)
            assert torch.allclose(w, s.weights, atol=1e-5, rtol=0)
            t = s.logits.argmax(-1)
            s = model.decode_step(s, t)
            z, w = dec.decode_step(t)


def test_groups_on_devices_in_threads(tiny_dir):
    # a wider specialist cannot be stacked with the others: two groups, run concurrently in threads
    model = fuse([tiny_dir["text"], tiny_dir["wide"], tiny_dir["math"]], seed=2)
    prompts = [model.encode_prompt(t) for t in TEXTS[:2]]
    want = ids(generate(model, prompts, GREEDY))
    dec = FastFusedDecoder(model, max_batch=2, max_len=256, devices=["cpu", "cpu", "cpu"], threads=True)
    assert [g["specialists"] for g in dec.describe_groups()] == [["text", "math"], ["code"]]
    assert dec._pool is not None
    assert ids(dec.generate(prompts, GREEDY)) == want
    # the multi-device step sequence (one graph per device, then the fuse graph) emulated on one CPU
    dec = FastFusedDecoder(
        model,
        max_batch=2,
        max_len=256,
        devices=["cpu"] * 3,
        groups=[[0], [1], [2]],
        threads=True,
        cuda_graphs="emulate",
    )
    assert len(dec._runners()) == 3
    assert ids(dec.generate(prompts, GREEDY)) == want


def test_graph_path_emulated_pipelined(dense, lora):
    """The CUDA-graph code path (warm-up + state restore, attention buckets, token fed back on the device, the
    host one step behind) run eagerly: same tokens, in both the dense and the LoRA-shared case."""
    for (model, prompts, want), attention in ((dense, "bmm"), (lora, "bmm"), (dense, "sdpa"), (lora, "sdpa")):
        dec = FastFusedDecoder(
            model, max_batch=4, max_len=256, cuda_graphs="emulate", bucket=16, decode_attention=attention
        )
        assert dec.pipeline and dec.max_len == 256
        assert ids(dec.generate(prompts, GREEDY)) == want
        keys = {k for st in dec._states.values() for k in st.graphs}
        assert len({k[1] for k in keys}) > 2  # several attention-length buckets were used


def test_attention_length_buckets(dense):
    """The default growing buckets: multiples of 32 below 512 filled slots, of 64 below 1,024, ...; from 256 filled
    slots on at most 1/8 of the slots read are padding; 8 lengths (graphs) per doubling; capped at max_len; a fixed
    bucket as before."""
    al = fast.attention_length
    assert [al(n, None, 4096) for n in (1, 32, 33, 256, 257, 511, 512, 513, 1025, 4000)] == [
        32, 32, 64, 256, 288, 512, 512, 576, 1152, 4096]
    assert all(al(n, None, 4096) - n <= al(n, None, 4096) / 8 for n in range(256, 4097))
    assert all(al(n, None, 4096) >= n for n in range(1, 4097))
    assert len({al(n, None, 4096) for n in range(257, 513)}) == 8
    assert len({al(n, None, 4096) for n in range(1, 4097)}) == 40
    assert al(300, None, 300) == 300 and al(257, 128, 4096) == 384 and al(384, 128, 4096) == 384
    for bad in (0, -32, 1.5, True):
        with pytest.raises(ValueError, match="bucket"):
            FastFusedDecoder(dense[0], max_batch=4, max_len=256, cuda_graphs="emulate", bucket=bad)
    # decode_attention="auto" (default): PyTorch's fused attention on CUDA, the bmm form on the CPU
    assert [g.attention for g in FastFusedDecoder(dense[0], max_batch=4, max_len=256).groups] == ["bmm"]
    with pytest.raises(ValueError, match="decode_attention"):
        FastFusedDecoder(dense[0], max_batch=4, max_len=256, decode_attention="flash")


def test_graph_path_default_growing_buckets_and_bench_override(dense, lora):
    """With the default buckets the emulated graph path attends over lengths of attention_length (several of them),
    same tokens; bench/decode.py's with_bucket (--also-bucket) runs the same decoder with a fixed bucket and puts
    the default back afterwards."""
    bench = load_bench_decode()
    for model, prompts, want in (dense, lora):
        dec = FastFusedDecoder(model, max_batch=4, max_len=250, cuda_graphs="emulate")
        assert dec.bucket is None and dec.max_len == 256  # rounded up to MIN_BUCKET
        assert ids(dec.generate(prompts, GREEDY)) == want
        lens = {k[1][0] for st in dec._states.values() for k in st.graphs}
        assert len(lens) > 2 and all(n % fast.MIN_BUCKET == 0 for n in lens)
        for st in dec._states.values():
            st.graphs.clear()
        run = bench.with_bucket(dec, 48, lambda p, s: dec.stream(p, s))
        assert ids(generation.collect(run(prompts, GREEDY), prompts)) == want
        lens = {k[1][0] for st in dec._states.values() for k in st.graphs}
        assert lens and all(n % 48 == 0 or n == dec.max_len for n in lens) and dec.bucket is None


def test_sampling_and_stream_events_match_reference(dense):
    model, prompts, _ = dense
    dec = FastFusedDecoder(model, max_batch=4, max_len=256)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=20, top_p=0.9, seed=5, ignore_eos=True)
    assert ids(dec.generate(prompts, params)) == ids(generate(model, prompts, params))
    # stop strings, end-of-reply token and gate weights: the same completions as the reference
    full = generate(model, prompts[:1], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    stop = full.text[3:5]
    eos_model = fuse([s.config.path for s in model.specialists])
    eos_model.stop_token_ids = {full.token_ids[4]}
    for m, p in (
        (model, SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,))),
        (eos_model, SamplingParams(max_new_tokens=20)),
    ):
        want = generate(m, prompts, p, return_weights=True)
        got = FastFusedDecoder(m, max_batch=4, max_len=256).generate(prompts, p, return_weights=True)
        for a, b in zip(got, want):
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
            assert len(a.weights) == len(b.weights)
            for wa, wb in zip(a.weights, b.weights):
                assert wa.keys() == wb.keys() and all(abs(wa[d] - wb[d]) < 1e-5 for d in wa)
    assert generate(eos_model, prompts[:1], SamplingParams(max_new_tokens=20))[0].finish_reason == "stop"


def test_gate_switch_and_per_row_length_limits(dense):
    """FusedModel.gate_mode(...) between requests (graphs are keyed by the gate), one-hot baselines left to the
    reference, and rows whose context room differs stopping at their own limit, as in generation.stream."""
    model, prompts, want = dense
    dec = FastFusedDecoder(model, max_batch=4, max_len=512, cuda_graphs="emulate", bucket=32)
    short = SamplingParams(max_new_tokens=16, ignore_eos=True)
    assert ids(dec.generate(prompts, short)) == [t[:16] for t in want]
    with model.gate_mode("uniform"):
        assert ids(dec.generate(prompts, short)) == ids(generate(model, prompts, short))
    with model.gate_mode("onehot:math"):
        ref = ids(generate(model, prompts, short))
        assert ids(dec.generate(prompts, short)) == ref
        # the automatic choice decodes a one-hot baseline as that specialist alone (a one-specialist view)
        assert fast.maybe_stream(model, prompts, short, return_weights=True) is None  # weights: the reference's
        assert ids(fast.generate(model, prompts, short, fast=True)) == ref
        assert "math" in model.__dict__["_ultrafuser_onehot_views"]
    assert {k[3] for st in dec._states.values() for k in st.graphs} == {
        ("learned", None),
        ("uniform", None),
        ("onehot", "math"),
    }
    # rows with different prompt lengths run out of context (256) at different steps
    long = SamplingParams(max_new_tokens=300, ignore_eos=True)
    want_long = generate(model, prompts, long)
    assert len({len(c.token_ids) for c in want_long}) > 1
    got = dec.generate(prompts, long)
    assert [(c.token_ids, c.finish_reason) for c in got] == [
        (c.token_ids, c.finish_reason) for c in want_long
    ]


def test_device_sampler():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 50, generator=g) * 2
    B = z.shape[0]
    one = torch.ones(B)

    def draw(temp, k, p, seed, step):
        return device_sample(
            z, temp * one, torch.full((B,), k), p * one, torch.full((B,), seed), torch.tensor([step])
        )

    assert torch.equal(draw(0.0, 0, 1.0, 1, 0), z.argmax(-1))  # greedy
    assert torch.equal(draw(1.0, 1, 1.0, 1, 0), z.argmax(-1))  # top-k 1 is greedy
    assert torch.equal(draw(0.7, 0, 1.0, 3, 4), draw(0.7, 0, 1.0, 3, 4))  # seeded
    many = torch.stack([draw(1.0, 0, 1.0, 9, s) for s in range(40)])  # (steps, B): the stream moves per step
    assert len({tuple(r.tolist()) for r in many}) > 20
    n = 4000  # one row's draws over many seeds follow softmax(z)
    for b in range(B):
        zb = z[b].expand(n, -1)
        dr = device_sample(
            zb,
            torch.ones(n),
            torch.zeros(n, dtype=torch.long),
            torch.ones(n),
            torch.arange(n),
            torch.tensor([3]),
        )
        freq = torch.bincount(dr, minlength=50).float() / n
        assert (freq - torch.softmax(z[b], -1)).abs().max() < 0.035
        dk = device_sample(
            zb, torch.ones(n), torch.full((n,), 5), torch.ones(n), torch.arange(n), torch.tensor([3])
        )
        assert set(dk.tolist()) <= set(z[b].topk(5).indices.tolist())  # top-k keeps the k best
        dp = device_sample(
            zb,
            torch.ones(n),
            torch.zeros(n, dtype=torch.long),
            torch.full((n,), 0.5),
            torch.arange(n),
            torch.tensor([3]),
        )
        p_sorted, order = torch.softmax(z[b], -1).sort(descending=True)
        nucleus = order[: int((p_sorted.cumsum(0) < 0.5).sum()) + 1]
        assert set(dp.tolist()) <= set(nucleus.tolist())  # top-p keeps the smallest set reaching p
    # a row's draw does not depend on the other rows of the batch
    alone = device_sample(
        z[1:2], one[:1], torch.zeros(1, dtype=torch.long), one[:1], torch.full((1,), 9), torch.tensor([7])
    )
    assert int(alone) == int(draw(1.0, 0, 1.0, 9, 7)[1])


def test_automatic_choice_and_fallback(dense, tiny_dir):
    model, prompts, want = dense
    fast.release(model)
    assert (
        ids(fast.generate(model, prompts, GREEDY, fast=True)) == want
    )  # fast=True: the fast path or an error
    dec = fast.fast_decoder_for(model, 3, 100)
    assert dec is not None and dec.max_batch >= 3 and dec._states  # the decoder that just ran, cached
    assert fast.fast_decoder_for(model, 3, 100) is dec
    assert ids(fast.generate(model, prompts[:1], GREEDY)) == want[:1]  # automatic choice
    assert ids(fast.generate(model, prompts, GREEDY, fast=False)) == want
    # the core's own entry points take the fast path by themselves (the cached decoder's state is used)
    fast.release(model)
    assert ids(generation.generate(model, prompts, GREEDY)) == want
    assert fast.fast_decoder_for(model, 3, 100)._states
    fast.release(model)
    assert ids(generation.generate(model, prompts, GREEDY, fast=False)) == want
    assert model.__dict__.get(fast._ATTR) is None  # fast=False never builds a decoder
    model.models[0].train()  # specialists in training mode: the reference path decides
    try:
        assert fast.maybe_stream(model, prompts, GREEDY) is None
    finally:
        model.models[0].eval()
    # an architecture the fast path does not run falls back to the reference path
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=model.vocab_size)).eval()
    with pytest.raises(Unsupported):
        describe(gpt)
    spec = model.specialists[0]
    import dataclasses

    other = FusedModel(
        model.config.model_copy(
            update={"specialists": model.config.specialists[:1], "gate": GateConfig(mode="uniform")}
        ),
        [dataclasses.replace(spec, model=gpt)],
        model.vocab_size,
        model.eos_token_id,
    )
    p1 = [Aligned(input_ids=p.input_ids[:1], target_positions=[[]], targets=[]) for p in prompts]
    assert fast.maybe_stream(other, p1, GREEDY) is None
    assert ids(fast.generate(other, p1, SamplingParams(max_new_tokens=8))) == ids(
        generate(other, p1, SamplingParams(max_new_tokens=8))
    )
    with pytest.raises(Unsupported):
        fast.generate(other, p1, GREEDY, fast=True)
    # an empty prompt is left to the reference path (the fast decoder itself refuses it with a clear message)
    empty = [Aligned(input_ids=[[], [], []], target_positions=[[], [], []], targets=[])]
    assert fast.maybe_stream(model, empty, GREEDY) is None
    with pytest.raises(ValueError, match="empty"):
        dec.generate(empty, GREEDY)


def test_weights_changed_in_place_are_reread(dense):
    model, prompts, _ = dense
    dec = FastFusedDecoder(model, max_batch=4, max_len=256)
    w = model.specialists[1].model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.mul_(3.0)
    try:
        assert ids(dec.generate(prompts, GREEDY)) == ids(generate(model, prompts, GREEDY))
    finally:
        with torch.no_grad():
            w.div_(3.0)


def load_bench_decode():
    """bench/decode.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parents[2] / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_decode"] = bench
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_script_cpu_tiny(tmp_path):
    bench = load_bench_decode()
    out = tmp_path / "decode.json"
    n = torch.get_num_threads()
    try:
        bench.main(
            [
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--json",
                str(out),
                "--steps",
                "24",
                "--batches",
                "2",
                "--prompt-len",
                "12",
                "--lora-rank",
                "4",
            ]
        )
    finally:
        torch.set_num_threads(n)
    d = json.loads(out.read_text())
    assert d["tokens_match"] is True and d["errors"] == []
    assert d["env"]["copy_bandwidth_GBps"] > 0 and d["env"]["device_name"]
    s = d["shapes"]["tiny"]
    b = s["batch2"]
    for mode in ("naive-single", "naive-fused", "fast-single", "fast-fused"):
        assert b[mode]["ms_step"] > 0 and 0 < b[mode]["frac_floor"] and len(b[mode]["tokens"]) == 2
    assert {
        "fast_fused_vs_3x_single",
        "fast_vs_naive_fused_speedup",
        "prefill_fast_fused_vs_3x_single",
    } <= set(b["ratios"])
    assert all(c["exact"] for c in b["token_checks"].values())
    lb = s["lora_phase"]["batch2"]
    assert lb["token_checks"]["fast-lora==naive-lora"]["exact"] and "lora_shared_vs_one_model" in lb["ratios"]
    assert s["logits_check_dense_b1"]["argmax_agree"] == 1.0


def test_benchmark_script_lora_only_with_model_dtype_terms(tmp_path):
    """`--lora-only` builds one model and times only the LoRA-shared phase; with `--lora-precision model` the fp32
    tiny run takes the A-in-the-base path and its greedy tokens still equal the reference's. `--lora-adapters 2`
    leaves the first specialist the bare base; `--also-no-adapters` times the group with no adapter at all; with two
    repetitions the LoRA-shared ratio is also reported per repetition."""
    bench = load_bench_decode()
    out = tmp_path / "decode.json"
    n = torch.get_num_threads()
    try:
        bench.main(["--shape", "tiny", "--device", "cpu", "--json", str(out), "--steps", "16", "--batches", "2",
                    "--prompt-len", "12", "--lora-rank", "4", "--lora-only", "--lora-precision", "model",
                    "--lora-adapters", "2", "--also-no-adapters", "--reps", "2"])
    finally:
        torch.set_num_threads(n)
    d = json.loads(out.read_text())
    assert d["tokens_match"] is True and d["errors"] == []
    s = d["shapes"]["tiny"]
    assert "batch2" not in s and "fast_groups" not in s  # no dense phase
    lb = s["lora_phase"]["batch2"]
    assert lb["token_checks"]["fast-lora==naive-lora"]["exact"]
    assert lb["fast-lora"]["ms_step"] > 0 and "lora_shared_vs_one_model" in lb["ratios"]
    assert s["lora"]["adapters"] == ["(bare base)", "code", "math"]
    assert lb["fast-lora-noadapters"]["ms_step"] > 0 and lb["ratios"]["no_adapters_tput_vs_single"] > 0
    # one median per repetition (--reps 2), and the ratio's spread paired repetition by repetition
    single, lora = lb["fast-single"]["rep_ms"], lb["fast-lora"]["rep_ms"]
    assert len(single) == len(lora) == 2 and all(x > 0 for x in single + lora)
    assert lb["ratios"]["lora_shared_tput_vs_single_per_rep"] == [round(a / b, 3) for a, b in zip(single, lora)]


def test_benchmark_script_bf16_cache_side_by_side(tmp_path):
    """`--dtype bfloat16 --also-kv-model` times the fast decoders with the cache in fp32 (the CPU default) and in
    bf16 side by side and reports what the fp32 cache gains; `--also-lora-model` the same for the low-rank products
    (fp32 (x·A)·B pieces by default on the CPU vs all in bf16), every specialist with its own adapter."""
    bench = load_bench_decode()
    out = tmp_path / "decode.json"
    n = torch.get_num_threads()
    try:
        bench.main(["--shape", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--json", str(out), "--steps", "8",
                    "--batches", "2", "--prompt-len", "12", "--lora-rank", "4", "--lora-only", "--also-kv-model",
                    "--also-lora-model", "--paths", "fast"])
    finally:
        torch.set_num_threads(n)
    d = json.loads(out.read_text())
    assert d["errors"] == []
    lb = d["shapes"]["tiny"]["lora_phase"]["batch2"]
    assert all(lb[m]["ms_step"] > 0 for m in ("fast-lora", "fast-single", "fast-lora-kvmodel", "fast-single-kvmodel"))
    r = lb["ratios"]
    assert r["fast_lora_speedup_vs_kv_cache_in_model_dtype"] > 0 and r["fast_single_speedup_vs_kv_cache_in_model_dtype"] > 0
    assert lb["fast-lora-lowp"]["ms_step"] > 0 and r["fast_lora_speedup_vs_lora_terms_in_model_dtype"] > 0
    assert d["shapes"]["tiny"]["lora"]["adapters"] == ["text", "code", "math"]


def test_kv_cache_dtype_fp32_for_half_models_on_the_cpu(tiny_dir):
    """bf16 specialists on the CPU keep the KV cache (and the decode attention) in fp32 by default — half-precision
    batched matmuls this small are slow there (bench/cpu_attention.py) —; kv_cache_dtype="model" keeps bf16. Both
    stay as close to the reference's fused logits as bf16 allows, and fp32 models are unaffected."""
    specs = [SpecialistConfig(domain=d, path=tiny_dir["text"], template=TEMPLATES.get(d), dtype="bfloat16",
                              adapter={"code": tiny_dir["lora_code"], "math": tiny_dir["lora_math"]}.get(d))
             for d in ("text", "code", "math")]
    model = FusedModel.from_config(FuseConfig(specialists=specs, gate=GateConfig.parse("uniform")))
    prompts = [model.encode_prompt(t) for t in TEXTS]
    ref = model.start_decoding(prompts).logits.float()
    scale = ref.abs().max()
    decs = {k: FastFusedDecoder(model, max_batch=4, max_len=256, kv_cache_dtype=k) for k in ("auto", "model")}
    assert decs["auto"].groups[0].k_cache[0].dtype == torch.float32
    assert decs["model"].groups[0].k_cache[0].dtype == torch.bfloat16
    for k, dec in decs.items():
        z, _ = dec.start_decoding(prompts)
        assert (z - ref).abs().max() < 0.05 * scale, k
        assert (z.argmax(-1) == ref.argmax(-1)).all(), k
    fp32 = FastFusedDecoder(fuse([tiny_dir["text"]] * 3, adapters={"code": tiny_dir["lora_code"]}), max_batch=2,
                            max_len=64)
    assert fp32.groups[0].k_cache[0].dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        FastFusedDecoder(model, max_batch=4, max_len=256, kv_cache_dtype="fp8")


def test_lora_terms_in_the_model_dtype_give_the_same_tokens(lora):
    """lora_precision="model" (the CUDA bf16 default: scale folded into B, one baddbmm) is the same math; in fp32
    on the CPU its greedy tokens equal the reference's."""
    model, prompts, want = lora
    dec = FastFusedDecoder(model, max_batch=4, max_len=256, lora_precision="model", cpu_matmul="rule")
    assert any(p.lora_lowp for g in dec.groups for L in g.layers for p in L.values() if hasattr(p, "lora_lowp"))
    assert ids(dec.generate(prompts, GREEDY)) == want
    # one prompt = 3 rows through the shared base: the (in, out) copies, each member's A as extra columns of the
    # base's product (more rows in fp32 take the models' own weights and a separate x·A)
    lora_projs = [p for g in dec.groups for L in g.layers for p in L.values() if getattr(p, "lora", None)]
    assert lora_projs and all(p.Wt_ext is not None and p.a_in_base for p in lora_projs)
    assert ids(dec.generate(prompts[:1], GREEDY)) == want[:1]
    if fast_llama.mkldnn_packing(torch.float32):  # the same with oneDNN-packed copies: A's rows join the packed base
        dec = FastFusedDecoder(model, max_batch=4, max_len=256, lora_precision="model", cpu_matmul="packed")
        projs = [p for g in dec.groups for L in g.layers for p in L.values() if getattr(p, "lora", None)]
        assert projs and all(p.a_in_base and p.P is not None and p.Wt_ext is None for p in projs)
        assert ids(dec.generate(prompts, GREEDY)) == want
        assert ids(dec.generate(prompts[:1], GREEDY)) == want[:1]
    with pytest.raises(ValueError, match="lora_precision"):
        FastFusedDecoder(model, max_batch=4, max_len=256, lora_precision="fp8")


def test_cpu_lora_b_products_in_fp32_for_half_models(tiny_dir, tmp_path):
    """bf16 LoRA specialists on one base, on the CPU: each member's x·A rides in the base's product and, in decode
    steps of up to CPU_FP32_B_ROWS rows a member, (x·A)·B runs as one fp32 product over B cut into chunks
    (`Proj._b_chunks`), added into the base's output (more rows: one bf16 baddbmm_). Members adapt different
    modules with different ranks (text: all seven, r = 2; code / math: q, v, up, r = 4), so the chunks must cover
    every member's rows: each projection equals the PEFT modules' own math in fp32 to bf16 rounding, and the fused
    logits stay within bf16 noise of the reference's over teacher-forced steps (as with lora_precision="model", B in
    bf16, one baddbmm_)."""
    from tinymodels import make_lora

    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapters = {"text": make_lora(tiny_dir["text"], tmp_path / "lora_all", seed=7, r=2, targets=every),
                "code": tiny_dir["lora_code"], "math": tiny_dir["lora_math"]}
    specs = [SpecialistConfig(domain=d, path=tiny_dir["text"], template=TEMPLATES.get(d), dtype="bfloat16",
                              adapter=adapters[d]) for d in ("text", "code", "math")]
    model = FusedModel.from_config(FuseConfig(specialists=specs, gate=GateConfig.parse("uniform")))
    decs = {k: FastFusedDecoder(model, max_batch=4, max_len=256, lora_precision=k) for k in ("auto", "model")}
    L0 = decs["auto"].groups[0].layers[0]
    assert all(p.b32 is not None and p.a_in_base for p in L0.values() if hasattr(p, "b32"))
    assert all(p.b32 is None for p in decs["model"].groups[0].layers[0].values() if hasattr(p, "b32"))
    # B cut into chunks of the modules' common width, each with the rows its module's adapters take over all members
    # (q = text's rows 0-2 / code's and math's 0-4, k = text's 2-4 only, v = text's 4-6 / the others' 4-8), windows
    # as wide as the widest module's: q|k|v (32 | 16 | 16 columns) = 4 chunks of 16 (q two) reading rows 0-4, 0-4,
    # 2-6, 4-8; gate (text's rows 0-2) | up (text's 2-4, the others' 0-4) = 2 chunks of 64 reading rows 0-4; down
    # only the text adapter's 2 rows
    def chunks(p):
        B, starts, col0, c = p.b32
        return B.shape, starts.tolist(), col0, c

    assert chunks(L0["qkv"]) == ((3 * 4, 4, 16), [0, 0, 2, 4], 0, 16)
    assert chunks(L0["gu"]) == ((3 * 2, 4, 64), [0, 0], 0, 64)
    assert chunks(L0["down"]) == ((3, 2, 32), [0], 0, 32)
    # the rows outside a module's own adapters read zeros of B: member by member the chunks rebuild B·scale
    for name in ("qkv", "gu", "down", "o"):
        p = L0[name]
        B, starts, col0, c = p.b32
        G, R = p.G, p.lora[0].shape[2]
        n, w = starts.numel(), B.shape[1]
        full = torch.zeros(G, R, sum(p.outs))
        for k in range(n):
            s0 = int(starts[k])
            full[:, s0 : s0 + w, col0 + k * c : col0 + (k + 1) * c] += B.view(G, n, w, c)[:, k]
        assert torch.equal(full.to(torch.bfloat16), p.lora[1]), name
    # each projection vs PEFT's math in fp32, member by member
    members = [s.model.model.layers[0] for s in model.specialists]
    g = torch.Generator().manual_seed(0)
    for name, mods, inp in (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 32),
                            ("o", ("self_attn.o_proj",), 32), ("gu", ("mlp.gate_proj", "mlp.up_proj"), 32),
                            ("down", ("mlp.down_proj",), 64)):
        for rows in (1, 4, fast_llama.CPU_FP32_B_ROWS, fast_llama.CPU_FP32_B_ROWS + 2):  # fp32 chunks up to
            # CPU_FP32_B_ROWS rows per member, more: the bf16 baddbmm_
            x = torch.randn(3, rows, inp, generator=g).to(torch.bfloat16)
            got = L0[name](x).float()
            want = []
            for k, (spec, layer) in enumerate(zip(model.specialists, members)):
                outs = []
                for m in mods:
                    mod = layer.get_submodule(m)
                    y = x[k].float() @ fast_llama._base_linear(mod).weight.float().t()
                    parts = fast_llama.lora_parts(mod, spec.adapter)
                    if parts is not None:
                        a, b, sc = parts
                        y = y + sc * ((x[k].float() @ a.float().t()) @ b.float().t())
                    outs.append(y)
                want.append(torch.cat(outs, -1))
            want = torch.stack(want)
            assert (got - want).abs().max() < 0.02 * want.abs().max(), (name, rows)
    prompts = [model.encode_prompt(t) for t in TEXTS]
    ref = model.start_decoding(prompts)
    scale = ref.logits.abs().max()
    errs = {}
    for k, dec in decs.items():
        s = ref
        z, _ = dec.start_decoding(prompts)
        errs[k] = []
        for _ in range(4):
            errs[k].append(float((z - s.logits).abs().max() / scale))
            t = s.logits.argmax(-1)
            s = model.decode_step(s, t)
            z, _ = dec.decode_step(t)
    # bf16 noise (measured: 0.041 and 0.051 of the logits' range at most over the 4 steps; the prefill, 3 prompts x
    # 20-odd positions a member, takes the bf16 B in both)
    assert max(errs["auto"]) < 0.08 and max(errs["model"]) < 0.08, errs


def test_lora_b_chunks_cover_unadapted_modules_and_fall_back():
    """`Proj._b_chunks` on its own: an unadapted module between two adapted ones gets zero chunks (its columns stay
    the base's), columns before the first adapted module are skipped, and widths whose gcd would need more than
    MAX_B_CHUNKS chunks give None (the caller keeps the bf16 product); the chunks added by `add_lora_b32` equal
    (x·A)·B with the full batched B in fp32, x·A gathered (uneven chunk starts) or viewed (even ones)."""
    G, r, outs = 2, 3, [8, 12, 4, 8]  # module 0 unadapted, 1 and 3 adapted, 2 unadapted in between
    spans = [None, (0, r), None, (r, 2 * r)]
    R, out = 2 * r, sum(outs)
    g = torch.Generator().manual_seed(0)
    B = torch.zeros(G, R, out)
    B[:, 0:r, 8:20] = torch.randn(G, r, 12, generator=g)
    B[:, r:, 24:32] = torch.randn(G, r, 8, generator=g)
    Bc, starts, col0, c = fast_llama.Proj._b_chunks(B, spans, outs)
    assert (col0, c, starts.tolist(), Bc.shape) == (8, 4, [0, 0, 0, 0, 3, 3], (G * 6, r, 4))
    assert torch.equal(Bc.view(G, 6, r, 4)[:, 3], torch.zeros(G, r, 4))  # module 2: zeros
    # and two adapted modules of one width: chunk starts 0, r step evenly, so x·A is one strided view of ye (no
    # take); one plan (buffers, views) reused for two calls
    spans2, outs2 = [(0, r), (r, 2 * r)], [12, 12]
    B2 = torch.zeros(G, R, 24)
    B2[:, 0:r, :12], B2[:, r:, 12:] = torch.randn(G, r, 12, generator=g), torch.randn(G, r, 12, generator=g)
    b32_2 = fast_llama.Proj._b_chunks(B2, spans2, outs2)
    assert b32_2[1].tolist() == [0, r] and b32_2[3] == 12
    for M in (1, 3):
        for full, b32, gathered in ((B, (Bc, starts, col0, c), True), (B2, b32_2, False)):
            o = full.shape[2]
            ye0 = torch.randn(G * M, o + G * R, generator=g)
            want = ye0[:, :o].clone().view(G, M, o)
            for k in range(G):
                want[k] += ye0[k * M : (k + 1) * M, o + k * R : o + (k + 1) * R] @ full[k]
            idx = fast_llama.xa_chunk_index(G, R, M, ye0.shape[1], o, b32[1], r)
            assert isinstance(idx, torch.Tensor) == gathered
            plan = fast_llama.lora_b32_plan(b32, G, R, M, ye0.shape[1], o)
            assert isinstance(plan[1], torch.Tensor) == gathered
            for _ in range(2):  # the plan's buffers and views serve call after call
                ye = ye0.clone()
                fast_llama.add_lora_b32(ye, plan)
                torch.testing.assert_close(ye[:, :o].view(G, M, o), want)
                assert torch.equal(ye[:, o:], ye0[:, o:])  # the x·A columns are only read
    assert fast_llama.Proj._b_chunks(B, spans, [8, 12, 4, 8 * fast_llama.MAX_B_CHUNKS]) is None  # gcd 4: too many
    assert fast_llama.Proj._b_chunks(B, spans, [8, 12, 4, 33]) is None  # gcd 1: 49 chunks


def test_lora_a_in_the_base_with_the_cuda_layout(lora, monkeypatch):
    """CUDA's layout (nn.Linear's (out, in) copy) with the low-rank terms in the model dtype: each member's A rows
    join the base's rows (one GEMM) and (x·A)·B is added in place into the base's output columns. Built here on the
    CPU (the layout is chosen by `fast_llama.in_out_copies`); in fp32 its greedy tokens equal the reference's."""
    model, prompts, want = lora
    monkeypatch.setattr(fast_llama, "in_out_copies", lambda device: False)
    dec = FastFusedDecoder(model, max_batch=4, max_len=256, lora_precision="model", cpu_matmul="rule")
    projs = [p for g in dec.groups for L in g.layers for p in L.values() if getattr(p, "lora", None)]
    assert projs and all(p.W_ext is not None and p.a_in_base and p.W is None and p.Wt_ext is None for p in projs)
    assert all(p.W_ext.shape[0] == sum(p.outs) + p.lora[0].shape[0] * p.lora[0].shape[2] for p in projs)
    assert ids(dec.generate(prompts, GREEDY)) == want
    assert ids(dec.generate(prompts[:1], GREEDY)) == want[:1]


def test_onehot_baselines_through_the_fast_path(lora):
    """One-hot variants of LoRA specialists on a shared base (the embedded default's layout) give the reference's
    tokens through the automatic fast path."""
    model, prompts, _ = lora
    short = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for dom in model.domains:
        with model.gate_mode(f"onehot:{dom}"):
            want = ids(generate(model, prompts, short))
            assert ids(generation.generate(model, prompts, short)) == want, dom
    assert set(model.__dict__["_ultrafuser_onehot_views"]) == set(model.domains)
    fast.release(model)
    assert "_ultrafuser_onehot_views" not in model.__dict__


def run_bench_script(name: str, args: list[str], out: Path) -> dict:
    """Run bench/<name> as a script with `--json out`; return the JSON it wrote."""
    import subprocess

    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "bench" / name), *args,
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_cpu_head_benchmark_runs(tmp_path):
    """bench/cpu_head.py (the LM-head layout measurement) runs on a tiny shape and writes its JSON."""
    res = run_bench_script("cpu_head.py", ["--vocab", "512", "--hidden", "64", "--rows", "1,8", "--reps", "2",
                                           "--threads", "1", "--dtype", "bfloat16"], tmp_path / "head.json")
    assert res["dtype"] == "bfloat16" and [x["rows"] for x in res["rows"]] == [1, 8]
    assert all(x["linear_ms"] > 0 and x["w_ht_ms"] > 0 and x["copy_ms"] > 0 and x["w_xt_padded_ms"] > 0
               for x in res["rows"])


def test_cpu_attention_benchmark_runs(tmp_path):
    """bench/cpu_attention.py (the measurement behind the CPU's fp32 KV cache) runs on a small shape and writes its
    JSON with both caches (and PyTorch's fused attention on the half one) timed per row count."""
    res = run_bench_script("cpu_attention.py", ["--batches", "1,3", "--layers", "2", "--prompt-len", "8", "--steps",
                                                "4", "--reps", "1", "--threads", "1"], tmp_path / "attn.json")
    assert res["dtype"] == "bfloat16" and [x["rows"] for x in res["rows"]] == [1, 3]
    assert all(x["half_us"] > 0 and x["fp32_us"] > 0 and x["half_over_fp32"] > 0 and x["sdpa_half_us"] > 0
               for x in res["rows"])


def test_cpu_lora_b_benchmark_runs(tmp_path):
    """bench/cpu_lora_b.py (the measurement behind CPU_FP32_B_ROWS) runs on a small shape and writes its JSON with
    both ways timed per row count."""
    res = run_bench_script("cpu_lora_b.py", ["--rows", "1,8", "--layers", "2", "--hidden", "64", "--inter", "128",
                                             "--kv-out", "32", "--rank", "4", "--reps", "1", "--threads", "1"],
                           tmp_path / "lora_b.json")
    assert res["dtype"] == "bfloat16" and [x["rows_per_member"] for x in res["rows"]] == [1, 8]
    assert all(x["half_us"] > 0 and x["fp32_us"] > 0 and x["half_over_fp32"] > 0 for x in res["rows"])


def test_cpu_rows_benchmark_runs(tmp_path):
    """bench/cpu_rows.py (the projections' cost at one model's rows vs the LoRA-shared group's) runs on the tiny
    shape and writes, per batch, both modes' row counts, times and the rates derived from them."""
    res = run_bench_script("cpu_rows.py", ["--shape", "tiny", "--batches", "1,2", "--reps", "2", "--rank", "4"],
                           tmp_path / "rows.json")
    assert res["dtype"] == "bfloat16" and res["gemm_ceiling_GFLOPs"] > 0 and res["copy_bandwidth_GBps"] > 0
    for B in (1, 2):
        r = res["batches"][str(B)]
        assert (r["single"]["rows"], r["lora"]["rows"]) == (B, 3 * B)
        assert all(r[m]["cold_ms"] > 0 and r[m]["hot_ms"] > 0 for m in ("single", "lora"))
        assert r["lora_over_single_cold"] == round(r["lora"]["cold_ms"] / r["single"]["cold_ms"], 3)
        # the tiny shape's 2 layers in bf16: q|k|v 64 -> 128 + 3 x 12 x·A columns, o 64 -> 64 + 12, gate|up
        # 64 -> 256 + 24, down 128 -> 64 + 12: the bytes behind cold_GBps
        byt = 2 * 2 * (64 * (128 + 36) + 64 * (64 + 12) + 64 * (256 + 24) + 128 * (64 + 12))
        assert r["lora"]["cold_GBps"] == round(byt / r["lora"]["cold_ms"] / 1e6, 1)


def test_cpu_lora_parts_benchmark_runs(tmp_path):
    """bench/cpu_lora_parts.py (the LoRA-shared CPU step split by ablation) runs on the tiny shape in bf16 and writes
    every mode's ms per step and the derived costs."""
    res = run_bench_script("cpu_lora_parts.py", ["--shape", "tiny", "--batches", "2", "--reps", "1", "--steps", "4",
                                                 "--prompt-len", "8", "--rank", "4"], tmp_path / "parts.json")
    ms = res["batches"]["2"]["ms_step"]
    assert set(ms) == {"single", "lora", "lora-ops", "lora-no-b", "lora-b-bmm-only", "lora-b-no-add", "noadapters"}
    assert all(v > 0 for v in ms.values()) and res["env"]["dtype"] == "bfloat16"
    r = res["batches"]["2"]
    assert r["lora_tput_vs_single"] == round(ms["single"] / ms["lora"], 3)
    assert r["kernel_gain_ms"] == round(ms["lora-ops"] - ms["lora"], 3)
    assert r["kernel_tokens_match"] is True and r["kernel_in_use"] is (cpu_kernels.lora_b_kernel() is not None)


def test_finished_rows_leave_the_batch(dense, lora):
    """Without CUDA graphs, rows that finished are compacted out of the batch (their cache rows too); the rows
    still running give the reference's tokens — greedy and sampled (each row keeps its own generator)."""
    lens = [12, 40, 64]
    for (model, prompts, _), sample in ((dense, False), (lora, False), (dense, True)):
        extra = dict(temperature=0.8, top_k=30, seed=7) if sample else {}
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True, **extra) for n in lens]
        dec = FastFusedDecoder(model, max_batch=4, max_len=256)
        got = dec.generate(prompts, params, return_weights=True)
        want = generate(model, prompts, params, return_weights=True)
        assert [len(c.token_ids) for c in got] == lens
        assert ids(got) == ids(want)
        for a, b in zip(got, want):
            assert all(abs(wa[d] - wb[d]) < 1e-5 for wa, wb in zip(a.weights, b.weights) for d in wa)
        assert {1, 2, 3} <= set(dec._states)  # the batch shrank twice: 3 -> 2 -> 1 rows


@pytest.fixture(scope="module")
def biased(tiny_dir, tmp_path_factory):
    """Three tiny specialists with q/k/v/o and MLP biases (Qwen2-style), one of them with a tied head."""
    from tinymodels import make_llama, make_tokenizer

    root, tok = tmp_path_factory.mktemp("biased"), make_tokenizer()
    paths = [make_llama(root / d, tok, seed=10 + i, bias=True, tie=d == "math") for i, d in enumerate(("t", "c", "m"))]
    model = fuse(paths, seed=2)
    prompts = [model.encode_prompt(t) for t in TEXTS]
    return model, prompts, [c.token_ids for c in generate(model, prompts, GREEDY)]


@pytest.mark.parametrize("form", ["rule", "packed", "copies", "w_xt", "linear"])
def test_cpu_matmul_forms_give_the_reference_tokens(dense, lora, biased, form, monkeypatch):
    """Every way the decode step can run its CPU matmuls gives the reference's greedy tokens (fp32), for stacked
    and shared-base groups, with and without biases, copied and in-place weights, batches of 3 and of 1."""
    calls = []
    real = fast_llama.w_xt
    monkeypatch.setattr(fast_llama, "w_xt", lambda w, x2: calls.append(x2.shape[0]) or real(w, x2))
    for name, (model, prompts, want) in (("dense", dense), ("lora", lora), ("biased", biased)):
        for weights in ("copy", "refs"):
            dec = FastFusedDecoder(model, max_batch=4, max_len=256, weights=weights, cpu_matmul=form)
            assert ids(dec.generate(prompts, GREEDY)) == want, (name, weights)
            assert ids(dec.generate(prompts[:1], GREEDY)) == want[:1], (name, weights)
            assert dec.cpu_matmul_choices()[0]["by_batch"] == {}  # a forced form measures nothing
    if form == "w_xt":  # the W·xᵀ path really ran, a single row (padded) included
        assert 1 in calls and 3 in calls
    else:
        assert not calls
    with pytest.raises(ValueError, match="cpu_matmul='gemv'"):
        FastFusedDecoder(dense[0], max_batch=4, max_len=256, cpu_matmul="gemv")


def test_cpu_matmul_auto_measures_each_small_batch_once(dense, lora, monkeypatch):
    """cpu_matmul="auto" (fp32 on the CPU): the first decode of each batch size with at most CPU_TUNE_MAX_ROWS rows
    per matmul times every available form on the group's own weights and keeps one; the tokens stay the
    reference's."""
    monkeypatch.setattr(fast_llama, "CPU_TUNE_MAX_ROWS", 8)  # a shared batch of 3 (9 rows) keeps the fixed rule
    for (model, prompts, want), weights in ((dense, "copy"), (lora, "copy"), (dense, "refs")):
        dec = FastFusedDecoder(model, max_batch=4, max_len=256, weights=weights)
        assert ids(dec.generate(prompts, GREEDY)) == want
        assert ids(dec.generate(prompts[:1], GREEDY)) == want[:1]
        g = dec.groups[0]
        (choice,) = dec.cpu_matmul_choices()
        # rows per matmul: 3 rows of a stacked group (each member's own matmul), 9 or 3 through a shared base
        assert set(choice["by_batch"]) == ({1} if g.shared else {1, 3})
        for f in choice["by_batch"].values():
            proj_forms, head_forms = g.layers[0]["qkv"].forms, g.head_forms
            assert set(f["ms"]["proj"]) == set(proj_forms) and set(f["ms"]["head"]) == set(head_forms)
            assert all(t > 0 for part in f["ms"].values() for t in part.values())
            assert f["proj"] in proj_forms and f["head"] in head_forms
        own = "packed" if fast_llama.mkldnn_packing(torch.float32) else "copies"  # the decoder's own copies
        assert (own in proj_forms) == (weights == "copy") and "w_xt" in proj_forms
        n = len(choice["by_batch"])
        dec.generate(prompts[:1], GREEDY)
        assert len(dec.cpu_matmul_choices()[0]["by_batch"]) == n  # measured once per batch size
