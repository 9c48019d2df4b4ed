"""Parity and correctness tests of the fused model (tiny random Llama models, fp32, CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig
from ultrafuser.data.conversation import IGNORE_INDEX
from ultrafuser.modeling.fused import FusedModel
from ultrafuser.modeling.generation import SamplingParams, generate

CONVS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! def f(x): return x"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tom has 3 apples"},
        {"role": "assistant", "content": "The answer is 7."},
        {"role": "user", "content": "and more?"},
        {"role": "assistant", "content": "print(1)"},
    ],
]


def fuse(paths, gate="learned", templates=None, adapters=None, domains=("text", "code", "math"), eos_token=None):
    specs = []
    for i, d in enumerate(domains):
        specs.append(SpecialistConfig(domain=d, path=paths[i], template=(templates or {}).get(d),
                                      adapter=(adapters or {}).get(d)))
    return FusedModel.from_config(FuseConfig(specialists=specs, gate=GateConfig.parse(gate), eos_token=eos_token))


def randomize_gate(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def hf_logits(path, ids, adapter=None):
    m = AutoModelForCausalLM.from_pretrained(path)
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter).merge_and_unload()
    with torch.no_grad():
        out = m(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0]


@pytest.fixture(scope="module")
def paths(tiny_dir):
    return [tiny_dir["text"], tiny_dir["code"], tiny_dir["math"]]


TEMPLATES = {"code": "ultralm", "math": "alpaca"}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_onehot_reproduces_specialist_hf_logits(paths, k):
    domains = ("text", "code", "math")
    model = fuse(paths, gate=f"onehot:{domains[k]}", templates=TEMPLATES)
    examples = [model.align(c) for c in CONVS]
    out = model(model.collate(examples))
    for b, ex in enumerate(examples):
        ref, _ = hf_logits(paths[k], ex.input_ids[k])
        want = ref[ex.target_positions[k]]  # (J, V)
        got = out.logits[b, : len(ex.targets)]
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        assert torch.all(out.gate_weights[b, :, k] == 1)


@pytest.mark.parametrize("gate", ["learned", "uniform", "onehot:text", "onehot:math"])
def test_identical_specialists_equal_single_model(paths, gate):
    model = fuse([paths[0]] * 3, gate=gate)
    if gate == "learned":
        randomize_gate(model)
    ex = model.align(CONVS[1])
    out = model(model.collate([ex]))
    assert torch.allclose(out.gate_weights.sum(-1), torch.ones(1))
    ref, _ = hf_logits(paths[0], ex.input_ids[0])
    assert torch.allclose(out.logits[0], ref[ex.target_positions[0]], atol=1e-5, rtol=0)


def test_fused_equals_independent_reference(paths):
    model = fuse(paths, templates=TEMPLATES)
    randomize_gate(model, seed=3)
    ex = model.align(CONVS[1])
    out = model(model.collate([ex]))
    g = model.gate.mlp
    scores, logits = [], []
    for k, p in enumerate(paths):
        lg, hs = hf_logits(p, ex.input_ids[k])
        h = hs[ex.target_positions[k]]  # (J, H) the LM head's input (post final norm)
        s = torch.relu(h @ g[0].weight.T + g[0].bias) @ g[2].weight.T + g[2].bias  # (J, 1)
        scores.append(s[:, 0])
        logits.append(lg[ex.target_positions[k]])
    w = torch.softmax(torch.stack(scores, -1), -1)  # (J, N)
    z = sum(w[:, k : k + 1] * logits[k] for k in range(3))  # (J, V)
    assert torch.allclose(out.gate_weights[0], w, atol=1e-5)
    assert torch.allclose(out.logits[0], z, atol=1e-4, rtol=0)
    p_fused = torch.softmax(out.logits[0], -1)
    # the product-of-experts identity: softmax(sum w o) is the normalised prod p_k^w_k
    logp = sum(w[:, k : k + 1] * torch.log_softmax(logits[k], -1) for k in range(3))
    assert torch.allclose(p_fused, torch.softmax(logp, -1), atol=1e-5)
    # loss = CE on the reply tokens only
    labels = torch.tensor(ex.targets)
    want_loss = torch.nn.functional.cross_entropy(z, labels)
    assert torch.allclose(out.loss, want_loss, atol=1e-5)


def test_incremental_decoding_equals_full_forward(paths):
    model = fuse(paths, templates=TEMPLATES)
    randomize_gate(model, seed=5)
    prompts = [model.encode_prompt("Hello there"), model.encode_prompt("Tom has 3 apples and buys more, how many?")]
    state = model.start_decoding(prompts)
    steps_logits, toks = [state.logits], []
    for _ in range(12):
        t = state.logits.argmax(-1)
        toks.append(t)
        state = model.decode_step(state, t)
        steps_logits.append(state.logits)
    toks = torch.stack(toks, 1)  # (B, T)
    for b, p in enumerate(prompts):
        full = type(p)(
            input_ids=[ids + toks[b].tolist() for ids in p.input_ids],
            target_positions=[list(range(len(ids) - 1, len(ids) + 12)) for ids in p.input_ids],
            targets=[0] * 13,
        )
        out = model(model.collate([full]))
        for t in range(13):
            assert torch.allclose(out.logits[0, t], steps_logits[t][b], atol=1e-4, rtol=0), (b, t)


def test_batch_equals_single_prompts(paths):
    model = fuse(paths, templates=TEMPLATES)
    randomize_gate(model, seed=7)
    texts = ["Hi", "Write a function that returns the sum of a list.", "Tom has 3 apples. How many?"]
    prompts = [model.encode_prompt(t) for t in texts]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    batched = generate(model, prompts, params)
    for p, got in zip(prompts, batched):
        alone = generate(model, [p], params)[0]
        assert alone.token_ids == got.token_ids
        assert len(got.token_ids) == 16


def test_sampling_is_seeded_and_respects_top_k(paths):
    model = fuse(paths)
    p = [model.encode_prompt("Hello")]
    a = generate(model, p, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5, seed=11, ignore_eos=True))[0]
    b = generate(model, p, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5, seed=11, ignore_eos=True))[0]
    c = generate(model, p, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5, seed=12, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # top_k=1 sampling is greedy
    g = generate(model, p, SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    k1 = generate(model, p, SamplingParams(max_new_tokens=10, temperature=0.7, top_k=1, seed=3, ignore_eos=True))[0]
    assert g.token_ids == k1.token_ids
    # a vanishing temperature (the smallest float: logits / t would overflow to NaN probabilities) decodes greedily,
    # on the fast path and the reference path (found by the serving fuzz test)
    tiny = SamplingParams(max_new_tokens=10, temperature=5e-324, seed=3, ignore_eos=True)
    assert tiny.temperature == 0.0
    assert generate(model, p, tiny)[0].token_ids == g.token_ids
    assert generate(model, p, tiny, fast=False)[0].token_ids == g.token_ids


def test_stop_strings_and_eos(paths):
    model = fuse(paths)
    p = [model.encode_prompt("Hello")]
    full = generate(model, p, SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = generate(model, p, SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    # with the third greedy token as end-of-reply token, generation stops there, without it in the text
    eos = model.response_tokenizer.convert_ids_to_tokens(full.token_ids[2])
    m2 = fuse(paths, eos_token=eos)
    out = generate(m2, [m2.encode_prompt("Hello")], SamplingParams(max_new_tokens=20))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:2]


def test_reply_ids_shared_and_labels_exact(paths):
    model = fuse(paths, templates=TEMPLATES)
    tok = model.response_tokenizer
    ex = model.align(CONVS[1])
    assert len(set(map(len, ex.input_ids))) == 3  # the templates really differ
    replies = [m["content"] for m in CONVS[1] if m["role"] == "assistant"]
    want = []
    for r in replies:
        want += tok(r, add_special_tokens=False)["input_ids"] + [model.eos_token_id]
    assert ex.targets == want
    for k in range(3):
        got = [ex.input_ids[k][p + 1] for p in ex.target_positions[k]]
        assert got == ex.targets  # every specialist predicts exactly the shared reply ids
        labels = ex.labels(k)
        assert [t for t in labels if t != IGNORE_INDEX] == ex.targets
        # the labelled tokens decode to exactly the assistant texts (+ eos)
        text = tok.decode([t for t in labels if t != IGNORE_INDEX])
        assert text == "".join(r + tok.eos_token for r in replies)
    ex0 = model.align(CONVS[0])
    batch = model.collate([ex, ex0])
    assert batch.labels.shape[1] == max(len(ex.targets), len(ex0.targets))
    assert (batch.labels[0] != IGNORE_INDEX).sum() == len(ex.targets)
    assert (batch.labels[1] != IGNORE_INDEX).sum() == len(ex0.targets)


def test_save_load_identical_logits(paths, tmp_path):
    model = fuse(paths, templates=TEMPLATES)
    randomize_gate(model, seed=9)
    batch = model.collate([model.align(c) for c in CONVS])
    want = model(batch).logits
    model.save_pretrained(tmp_path / "fused")
    again = FusedModel.from_pretrained(tmp_path / "fused")
    assert torch.equal(again(batch).logits, want)
    assert again.config == model.config


def test_lora_specialists_share_one_base(tiny_dir):
    base = tiny_dir["text"]
    model = fuse([base, base, base], adapters={"code": tiny_dir["lora_code"], "math": tiny_dir["lora_math"]})
    assert len(model.models) == 1  # one model in memory
    ptrs = {s.model.get_input_embeddings().weight.data_ptr() for s in model.specialists}
    assert len(ptrs) == 1
    n_base = sum(p.numel() for n, p in model.models[0].named_parameters() if "lora_" not in n)
    single = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    assert n_base == single  # the base's weights exist once, not three times
    ex = model.align(CONVS[0])
    for k, (d, adapter) in enumerate([("text", None), ("code", tiny_dir["lora_code"]), ("math", tiny_dir["lora_math"])]):
        m = fuse([base, base, base], gate=f"onehot:{d}",
                 adapters={"code": tiny_dir["lora_code"], "math": tiny_dir["lora_math"]})
        out = m(m.collate([ex]))
        ref, _ = hf_logits(base, ex.input_ids[k], adapter=adapter)
        assert torch.allclose(out.logits[0], ref[ex.target_positions[k]], atol=1e-5, rtol=0), d
    # adapters really change the output
    outs = model(model.collate([ex]), return_specialist_logits=True).specialist_logits
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_multi_turn_prompt_generates_from_its_last_position(paths):
    """A generation prompt with earlier replies reads the next token at the end of the prompt, also when
    batched with a single-turn prompt."""
    model = fuse(paths, gate="onehot:code", templates=TEMPLATES)
    multi = CONVS[1][:-1]  # system, user, assistant, user
    prompts = [model.encode_prompt(multi), model.encode_prompt("Hello there")]
    state = model.start_decoding(prompts)
    for b, p in enumerate(prompts):
        ref, _ = hf_logits(paths[1], p.input_ids[1])
        assert torch.allclose(state.logits[b], ref[-1], atol=1e-4, rtol=0)
