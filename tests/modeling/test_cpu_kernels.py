"""The CPU LoRA kernel (`ultrafuser.modeling.cpu_kernels`): built with the machine's C compiler, it must give the
PyTorch ops' bits (`fast_llama.add_lora_b32_ops`) or not be used; without a compiler, or switched off, the ops run."""

from __future__ import annotations

import os
import shutil
import stat
import sys

import pytest
import torch

from ultrafuser.config import FuseConfig, GateConfig, SpecialistConfig
from ultrafuser.modeling import cpu_kernels, fast_llama
from ultrafuser.modeling.fast import FastFusedDecoder
from ultrafuser.modeling.fused import FusedModel

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
TEMPLATES = {"code": "ultralm", "math": "alpaca"}  # different prompt lengths per specialist


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel built into a cache of its own, forgotten again afterwards."""
    monkeypatch.setenv("ULTRAFUSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ULTRAFUSER_CPU_KERNEL", raising=False)
    cpu_kernels.reset()
    yield tmp_path / "cache" / "kernels"
    cpu_kernels.reset()


def random_case(g, G, n_out, r, M, take: bool):
    """A LoRA-shared projection's B chunks and a bf16 product ye: modules of widths n_out, r adapter rows each
    (take: q|k|v-like, the first module in three chunks sharing one x·A window, read by index)."""
    outs = [3 * n_out, n_out, n_out] if take else [n_out, n_out]
    R = r * len(outs) if not take else 3 * r
    spans = [(0, r), (r, 2 * r), (2 * r, 3 * r)] if take else [(0, r), (r, 2 * r)]
    B = torch.zeros(G, R, sum(outs))
    o = 0
    for (a, b), w in zip(spans, outs):
        B[:, a:b, o : o + w] = torch.randn(G, b - a, w, generator=g) * 0.05
        o += w
    b32 = fast_llama.Proj._b_chunks(B, spans, outs)
    ye = (torch.randn(G * M, sum(outs) + G * R, generator=g) * 3).to(torch.bfloat16)
    return b32, ye, R, sum(outs)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine: the PyTorch ops run (tested below)")
def test_kernel_gives_the_ops_bits(fresh):
    """Built here, used at every row count a decode step gives it (1..CPU_FP32_B_ROWS per member), and bit for bit
    the ops' result on chunks read by index and through a strided view, odd widths, two and three members (the
    per-shape self-check picks the ops' order of summation)."""
    assert cpu_kernels.lora_b_kernel() is not None
    assert len(list(fresh.glob("lora_b_add-*.so"))) == 1
    # PyTorch on GNU OpenMP (the Linux wheels): the kernel runs on the same threads
    gomp = sys.platform.startswith("linux") and "libgomp" in open("/proc/self/maps").read()
    assert cpu_kernels._STATE["openmp"] == gomp
    g = torch.Generator().manual_seed(0)
    n = 0
    for M in range(1, fast_llama.CPU_FP32_B_ROWS + 1):
        # SmolLM2-135M's q|k|v (576 | 192 | 192) and gate|up (1,536 x 2) with r-16 adapters, where the ops' order
        # of summation changes with the row count; odd widths and ranks, two members
        for G, n_out, r, take in ((3, 192, 16, True), (3, 1536, 16, False), (3, 64, 16, True), (3, 600, 16, False),
                                  (2, 40, 4, True), (2, 260, 8, False)):
            b32, ye, R, out = random_case(g, G, n_out, r, M, take)
            plan = fast_llama.lora_b32_plan(b32, G, R, M, ye.shape[1], out)
            assert plan[6] is not None, (M, G, n_out)
            # the fp32 sums themselves, before the rounding into bf16 that would hide most differences
            assert torch.equal(cpu_kernels.products(ye, plan[2], plan[6], plan[6][7]),
                               fast_llama.lora_b32_products(ye, plan)), (M, G, n_out, r, take)
            want, got = ye.clone(), ye.clone()
            fast_llama.add_lora_b32_ops(want, plan)
            fast_llama.add_lora_b32(got, plan)
            assert torch.equal(want.view(torch.int16), got.view(torch.int16)), (M, G, n_out, r, take)
            assert not torch.equal(got, ye)  # something was added
            n += 1
    assert n == 6 * fast_llama.CPU_FP32_B_ROWS


def test_switched_off_or_no_compiler_runs_the_ops(fresh, monkeypatch):
    """ULTRAFUSER_CPU_KERNEL=0, no compiler, or a compiler that fails: no kernel, plans carry none, and
    add_lora_b32 gives the ops' result."""
    g = torch.Generator().manual_seed(1)
    b32, ye, R, out = random_case(g, 3, 64, 16, 4, True)
    want = ye.clone()
    fast_llama.add_lora_b32_ops(want, fast_llama.lora_b32_plan(b32, 3, R, 4, ye.shape[1], out, kernel=False))
    for how in ("env", "no compiler", "failing compiler"):
        cpu_kernels.reset()
        with monkeypatch.context() as m:
            if how == "env":
                m.setenv("ULTRAFUSER_CPU_KERNEL", "0")
            else:
                m.setattr(cpu_kernels, "_compiler", lambda: None if how == "no compiler" else shutil.which("false"))
            assert cpu_kernels.lora_b_kernel() is None, how
            plan = fast_llama.lora_b32_plan(b32, 3, R, 4, ye.shape[1], out)
            assert plan[6] is None
            got = ye.clone()
            fast_llama.add_lora_b32(got, plan)
            assert torch.equal(got, want), how
    assert not fresh.exists() or not list(fresh.glob("*.so"))  # nothing was built


@pytest.mark.skipif(not HAS_CC or not hasattr(os, "getuid"), reason="needs a C compiler and POSIX permissions")
def test_a_cached_library_others_can_write_is_rebuilt(fresh):
    """A library is code: a cached one that others may write is not loaded but built again (0700), and a kernels
    folder that others may write is not used."""
    assert cpu_kernels.lora_b_kernel() is not None
    (lib,) = fresh.glob("lora_b_add-*.so")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    lib.chmod(0o777)
    cpu_kernels.reset()
    assert cpu_kernels.lora_b_kernel() is not None
    assert stat.S_IMODE(lib.stat().st_mode) & 0o022 == 0
    # a folder others can write: no kernel at all (the ops run)
    fresh.chmod(0o777)
    cpu_kernels.reset()
    assert cpu_kernels.lora_b_kernel() is None
    fresh.chmod(0o700)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
def test_lora_shared_decoder_same_logits_with_the_kernel(tiny_dir, fresh, monkeypatch):
    """A bf16 LoRA-shared group on the CPU decodes with the kernel (every layer's plans carry it) and gives the
    same logits, bit for bit, as with the ops, at batch 1 and 3 over 6 steps."""
    specs = [SpecialistConfig(domain=d, path=tiny_dir["text"], template=TEMPLATES.get(d), dtype="bfloat16",
                              adapter=a) for d, a in (("text", None), ("code", tiny_dir["lora_code"]),
                                                      ("math", tiny_dir["lora_math"]))]
    model = FusedModel.from_config(FuseConfig(specialists=specs, gate=GateConfig.parse("uniform")))
    texts = ["Write a function that adds two numbers.", "What is 7 * 8?", "Say hello."]
    prompts = [model.encode_prompt(t) for t in texts]
    runs = {}
    for on in (True, False):
        monkeypatch.setenv("ULTRAFUSER_CPU_KERNEL", "1" if on else "0")
        cpu_kernels.reset()
        dec = FastFusedDecoder(model, max_batch=4, max_len=256)
        for B in (1, 3):
            z, _ = dec.start_decoding(prompts[:B])
            out = [z]
            for _ in range(6):
                z, _ = dec.decode_step(z.argmax(-1))
                out.append(z)
            runs[on, B] = torch.stack(out)
        plans = [pl for L in dec.groups[0].layers for p in L.values() for pl in getattr(p, "_b32_plans", {}).values()]
        assert plans and all((pl[6] is not None) == on for pl in plans)
    for B in (1, 3):
        assert torch.equal(runs[True, B], runs[False, B]), B
