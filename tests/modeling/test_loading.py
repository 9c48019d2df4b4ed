"""Tokenizer compatibility, safe loading, bad input, and the fuse / generate CLI contract."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinymodels import make_llama, make_tokenizer
from ultrafuser.config import ConfigError, FuseConfig, GateConfig, SpecialistConfig
from ultrafuser.modeling.fused import FusedModel
from ultrafuser.modeling.generation import PromptTooLongError, SamplingParams, generate
from ultrafuser.modeling.specialists import LoadError, TokenizerMismatchError


def cli(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "ultrafuser.cli", *args], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def two(paths, **gate):
    return FuseConfig(
        specialists=[SpecialistConfig(domain="a", path=paths[0]), SpecialistConfig(domain="b", path=paths[1])],
        gate=GateConfig(**gate),
    )


def test_extra_trailing_vocab_rows_fuse_over_prefix(tmp_path, tiny_dir):
    # the paper's case: CodeLlama has 32016 rows where the others have 32000
    base_tok = make_tokenizer()
    big_tok = make_tokenizer(extra_tokens=16)
    assert len(big_tok) == len(base_tok) + 16
    a = make_llama(tmp_path / "a", base_tok, seed=1)
    b = make_llama(tmp_path / "b", big_tok, seed=2)
    # make the extra rows win every argmax in b, so emitting past the prefix would be visible
    from transformers import AutoModelForCausalLM

    mb = AutoModelForCausalLM.from_pretrained(b)
    with torch.no_grad():
        mb.lm_head.weight[len(base_tok):] = mb.lm_head.weight[: len(base_tok)].abs().max() * 0 + mb.lm_head.weight[5] * 100
    mb.save_pretrained(b)
    model = FusedModel.from_config(two([a, b], mode="onehot", onehot_domain="b"))
    assert model.vocab_size == len(base_tok)
    out = generate(model, [model.encode_prompt("Hello")], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and max(out.token_ids) < len(base_tok)
    logits = model(model.collate([model.align([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])])).logits
    assert logits.shape[-1] == len(base_tok)


def test_mismatched_tokenizers_refused_with_ids_named(tmp_path):
    tok = make_tokenizer()
    other = make_tokenizer(corpus_extra=("zebra quokka xylophone " * 20,))  # other merges: ids diverge
    a = make_llama(tmp_path / "a", tok, seed=1)
    b = make_llama(tmp_path / "b", other, seed=2)
    with pytest.raises(TokenizerMismatchError) as e:
        FusedModel.from_config(two([a, b]))
    msg = str(e.value)
    assert "id " in msg and "'a'" in msg and "'b'" in msg
    # the message names the first differing id and both strings
    va, vb = tok.convert_ids_to_tokens(list(range(len(other)))), other.convert_ids_to_tokens(list(range(len(other))))
    first = next(i for i in range(len(other)) if va[i] != vb[i])
    assert f"id {first} is {va[first]!r}" in msg and repr(vb[first]) in msg
    # the CLI refuses it too, before writing anything
    r = cli("fuse", "--specialist", f"a={a}", "--specialist", f"b={b}", "--out", str(tmp_path / "f"), check=False)
    assert r.returncode == 2 and "incompatible tokenizers" in r.stderr and not (tmp_path / "f").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['UF_PWNED']}",))


def test_pickled_or_corrupted_gate_refused_and_payload_never_runs(tiny_dir, tmp_path, monkeypatch):
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("UF_PWNED", str(pwned))
    out = tmp_path / "fused"
    cli("fuse", "--specialist", f"text={tiny_dir['text']}", "--specialist", f"code={tiny_dir['code']}", "--out", str(out))
    FusedModel.from_pretrained(out)  # loads fine as written
    gate = out / "gate.safetensors"
    good = gate.read_bytes()
    gate.write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(LoadError, match="checksum"):
        FusedModel.from_pretrained(out)
    # even with the checksum updated to match, a pickle is not a safetensors file
    meta = json.loads((out / "ultrafuser.json").read_text())
    import hashlib

    meta["gate_sha256"] = hashlib.sha256(gate.read_bytes()).hexdigest()
    (out / "ultrafuser.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="not a valid safetensors"):
        FusedModel.from_pretrained(out)
    assert not pwned.exists()
    # a flipped byte in a real safetensors file is caught by the checksum
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF
    gate.write_bytes(bytes(flipped))
    meta["gate_sha256"] = hashlib.sha256(good).hexdigest()
    (out / "ultrafuser.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="checksum"):
        FusedModel.from_pretrained(out)


def test_pickled_specialist_weights_refused(tiny_dir, tmp_path, monkeypatch):
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("UF_PWNED", str(pwned))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(tiny_dir["text"]).iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(LoadError, match="no safetensors weights"):
        FusedModel.from_config(two([tiny_dir["text"], str(bad)]))
    assert not pwned.exists()


def test_truncated_specialist_weights_give_clear_error(tiny_dir, tmp_path):
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in Path(tiny_dir["text"]).iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(LoadError, match="cannot load specialist 'b'"):
        FusedModel.from_config(two([tiny_dir["text"], str(bad)]))


def test_bad_inputs_named(tiny_dir, tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        FusedModel.from_config(two([tiny_dir["text"], str(tmp_path / "nope")]))
    with pytest.raises(ValueError, match=r"\{instruction\}"):
        SpecialistConfig(domain="x", path="p", template="User: hi\nAssistant:")
    with pytest.raises(ValueError, match="unknown slot"):
        SpecialistConfig(domain="x", path="p", template="{instruction} {foo}")
    with pytest.raises(ValueError, match="Extra inputs|extra"):
        SpecialistConfig(domain="x", path="p", tempalte="ultralm")
    with pytest.raises(ValueError, match="given twice"):
        FuseConfig(specialists=[SpecialistConfig(domain="x", path="p"), SpecialistConfig(domain="x", path="q")])
    with pytest.raises(ValueError, match="not one of the specialists"):
        FuseConfig(specialists=[SpecialistConfig(domain="x", path="p")], gate=GateConfig(mode="onehot", onehot_domain="y"))
    r = cli("fuse", "--specialist", f"text={tiny_dir['text']}", "--gate", "sparse", "--out", str(tmp_path / "o"), check=False)
    assert r.returncode == 2 and "--gate 'sparse'" in r.stderr
    r = cli("generate", str(tmp_path / "missing"), "--prompt", "hi", check=False)
    assert r.returncode == 2 and "not a fused-model directory" in r.stderr


def test_prompt_longer_than_smallest_context_refused(tiny_dir, tmp_path):
    tok = make_tokenizer()
    short = make_llama(tmp_path / "short", tok, seed=1, max_positions=32)
    model = FusedModel.from_config(two([tiny_dir["text"], short]))
    assert model.context_length == 32
    with pytest.raises(PromptTooLongError, match="specialist 'b'.*context is 32"):
        generate(model, [model.encode_prompt("hello " * 40)], SamplingParams(max_new_tokens=4))
    # a prompt that fits stops with "length" when the smallest context is full
    out = generate(model, [model.encode_prompt("hi")], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(model.encode_prompt("hi").input_ids[1]) + len(out.token_ids) <= 32


def test_cli_fuse_and_generate_json(tiny_dir, tmp_path):
    out = tmp_path / "fused"
    cli("fuse", "--specialist", f"text={tiny_dir['text']}", "--specialist", f"code={tiny_dir['code']}",
        "--specialist", f"math={tiny_dir['text']}+{tiny_dir['lora_math']}", "--template", "code=ultralm",
        "--gate", "learned", "--out", str(out))
    meta = json.loads((out / "ultrafuser.json").read_text())
    assert [s["domain"] for s in meta["config"]["specialists"]] == ["text", "code", "math"]
    assert meta["config"]["specialists"][2]["adapter"]
    r = cli("generate", str(out), "--prompt", "Hello", "--max-new-tokens", "6", "--json")
    lines = r.stdout.strip().splitlines()
    assert 1 <= len(lines) <= 6
    for line in lines:
        obj = json.loads(line)
        assert set(obj) == {"id", "text", "weights"}
        assert set(obj["weights"]) == {"text", "code", "math"}
        assert abs(sum(obj["weights"].values()) - 1) < 1e-5
    # the JSON ids are the same greedy tokens the library produces
    model = FusedModel.from_pretrained(out)
    lib = generate(model, [model.encode_prompt("Hello")], SamplingParams(max_new_tokens=6))[0]
    assert [json.loads(x)["id"] for x in lines] == lib.token_ids
    r = cli("generate", str(out), "--prompt", "Hello", "--max-new-tokens", "4", "--no-template", "--show-gate")
    assert "text=" in r.stdout and "math=" in r.stdout
    r = cli("generate", str(out), "--prompt", "Hello", "--max-new-tokens", "5")
    assert r.stdout.strip() == lib.text[: len(r.stdout.strip())] or r.stdout.strip() in lib.text
