"""A compact Llama-family decoder that runs G specialists of one architecture as one batch.

It reads the Hugging Face weights of Llama / Mistral / Qwen2 models (RMSNorm, RoPE with each specialist's own
`inv_freq` — so its own `rope_theta` and static scaling —, GQA, SwiGLU, optional q/k/v/o/MLP biases) and PEFT
LoRA adapters, and computes exactly what `Specialist.forward` computes, in a layout made for decoding:

- activations are specialist-major, `(G, B, T, H)`: every projection is one batched matmul over the G members;
- a *stacked* group (G distinct models of identical shape) runs `bmm` over weights stacked as `(G, out, in)`
  with q|k|v and gate|up fused into one matrix each (weights="copy"), or reads each model's own weights in place
  (weights="refs": no extra memory, G matmuls per projection, everything else still batched);
- a *shared* group (G specialists = one base model + per-specialist LoRA adapters, or none) multiplies all
  G×B rows by the base weights at once — the base is read once per step — and adds the low-rank deltas of
  every member batched (a member without an adapter has zero A/B rows): in the model dtype each member's A rides
  in the base's product and (x·A)·B is one batched GEMM (on the CPU's decode steps: fp32 products per module);
- the KV cache is static: per layer `(B_max, G, H_kv, T_max, D)`, batch-major so that a `[:B]` slice stays
  contiguous; the decode step writes slot `cur` (a device tensor, so the step can be captured in a CUDA graph)
  and attends over the first `T_attn` slots with a mask built from each row's left padding.

Numerics follow the Hugging Face modules (RMSNorm in fp32 then cast, cos/sin in fp32 then cast, softmax in
fp32, LoRA in the adapter's dtype then cast back), so fp32 greedy tokens match the reference path. Half-precision
models on the CPU keep the KV cache and the decode attention in fp32 (`kv_cache_dtype`, see `Group`): faster there,
and closer to fp32 than HF's eager half-precision attention.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ultrafuser.modeling import cpu_kernels

log = logging.getLogger(__name__)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SEQ_DEPENDENT_ROPE = ("dynamic", "longrope")
NEG_INF = float("-inf")
# CPU, half-precision model, LoRA-shared group: with at most this many rows per member (a decode step of batch <= 8)
# the (x·A)·B products run in fp32, one batched product per projection over B cut into equal chunks (Proj._b_chunks);
# more rows (prefill, big batches): one half-precision baddbmm_ over the zero-padded B. oneDNN's half-precision GEMMs
# this small (K = 16-48) have a fixed floor that fp32 ones don't: `python bench/cpu_lora_b.py` (SmolLM2 shape,
# 3 members, r 16; bench/results/cpu_lora_b_chunks_bf16.json) measured bf16 / fp32 = 1.73, 1.44, 1.31, 1.10, 0.86
# at 1, 4, 8, 16, 24 rows per member; in the whole decode step (bench/decode.py --also-lora-model, the B products'
# bytes competing with the weights') the fp32 way was 1.11-1.14x, 1.06-1.08x, 1.02x, 0.975x as fast at batch 1, 4,
# 8, 16 (docs/benchmarks.md).
CPU_FP32_B_ROWS = 8
# ... unless the adapted modules' widths would cut B into more chunks than this (their gcd is small)
MAX_B_CHUNKS = 32
# On the CPU, fp32 matmuls with at most this many rows use the (in, out) copies, more rows the models' own
# (out, in) weights: MKL measured 1.7-2.2x faster the first way at 1-3 rows and ~1.25x slower at 12 rows (2-core
# AVX2 VM). bf16 / fp16 (oneDNN; 2-core AVX-512-bf16 VM, `python bench/cpu_head.py --dtype bfloat16`): the (in, out)
# copies are as fast or faster at every row count for the projections, and the LM head runs fastest as the
# plain (V, H) product h·Wᵀ — so no row threshold there.
CPU_FEW_ROWS = 3


# Few-row matmuls on the CPU can run several ways, and which is fastest depends on the BLAS and the CPU more than on
# the shape: "packed" (oneDNN's linear on copies reordered into its blocked layout — what Inductor does on the CPU;
# the default where the PyTorch build has it, bf16 included: see docs/benchmarks.md), "copies" (x·Wt with plain
# (in, out) copies), "w_xt" (W·xᵀ on the models' own (out, in) weights, one zero
# row added to a single row: for one column MKL takes a slow GEMV path — SmolLM2's fp32 LM head took 9.0 ms
# unpadded, 2.9 ms padded, 4.1 ms as "copies" in `python bench/cpu_head.py --rows 1,3` on the VM below) and
# "linear" (F.linear, x·Wᵀ). On a 2-core AMD EPYC (Zen 4) in fp32, a SmolLM2-135M step's projections (the `cpu_matmul` timings that
# `python bench/decode.py --shape smollm2-135m --device cpu --dtype float32 --batches 1,4` records) took
# 26 / 18 / 36 ms (copies / w_xt / linear) at 1 row, 49 / 28 / 61 ms at 3 rows and 71-74 ms every way at 12 rows,
# while the 2-core AVX2 VM that set CPU_FEW_ROWS measured "copies" fastest at 1-3 rows. So a group measures the
# choice on its own weights the first time it decodes a batch with at most CPU_TUNE_MAX_ROWS rows per matmul
# (FastFusedDecoder(cpu_matmul=...)). bf16 / fp16 keep the fixed rule: there the ways differ by ~25 % at most
# (`bench/cpu_head.py --dtype bfloat16 --rows 1,3,12`), not worth run-to-run changes in bf16 rounding.
CPU_FORMS = ("packed", "copies", "w_xt", "linear")
CPU_TUNE_MAX_ROWS = 16
# an alternative replaces the default form only when this much faster: near-ties keep the default, so the same
# machine keeps making the same choice (and the same fp32 roundings) from run to run
CPU_TUNE_MARGIN = 0.8


_PACKING: dict = {}


def mkldnn_pack(w: torch.Tensor) -> torch.Tensor:
    """w (out, in) reordered into oneDNN's blocked layout for its linear (PyTorch's own op, as Inductor uses on
    the CPU); the batch-size hint 16 measured as fast as exact hints at 1-48 rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 16)


def mkldnn_linear(x2: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")


def mkldnn_packing(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build runs oneDNN's packed linear in `dtype`, checked once against F.linear (the ops are
    PyTorch internals; a build without them, or one that changed them, falls back to plain copies)."""
    if dtype not in _PACKING:
        ok = False
        try:
            if torch.backends.mkldnn.is_available():
                g = torch.Generator().manual_seed(0)
                w, x, b = (torch.randn(s, generator=g).to(dtype) for s in ((24, 16), (3, 16), (24,)))
                with torch.no_grad():
                    y = mkldnn_linear(x, mkldnn_pack(w), b)
                ok = y.shape == (3, 24) and torch.allclose(y.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)
        except (RuntimeError, AttributeError, NotImplementedError, TypeError):
            ok = False
        if not ok:
            log.info("oneDNN packed linear unavailable for %s: the CPU fast path uses plain copies", dtype)
        _PACKING[dtype] = ok
    return _PACKING[dtype]


def w_xt(w: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """W (out, in) · x2ᵀ for x2 (rows, in) -> (out, rows); a single row is padded with a zero row (see CPU_FORMS)."""
    if x2.shape[0] == 1:
        return torch.mm(w, torch.cat([x2, x2.new_zeros(x2.shape)]).t())[:, :1]
    return torch.mm(w, x2.t())


def _contiguous_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x contiguous in `dtype` with one copy at most (layout and dtype at once: a `to` keeps a permuted layout, and
    with a same-dtype `to` memory_format is ignored)."""
    return x.to(dtype, memory_format=torch.contiguous_format) if x.dtype != dtype else x.contiguous()


def in_out_copies(device) -> bool:
    """Whether a group's weight copies take the CPU layouts (packed or (in, out)) rather than nn.Linear's (out, in)
    (CUDA's). A function so that a CPU test can build the CUDA layout."""
    return torch.device(device).type == "cpu"


def cpu_few_rows(dtype: torch.dtype) -> float:
    """Up to how many rows a CPU matmul in `dtype` uses the (in, out) copies (see CPU_FEW_ROWS)."""
    return CPU_FEW_ROWS if dtype == torch.float32 else math.inf


def xa_chunk_index(G: int, R: int, M: int, rs: int, out: int, starts: torch.Tensor, w: int):
    """Where a LoRA-shared projection's base product ye (G·M, rs = out + G·R; each member's x·A as G·R extra
    columns) holds each chunk's x·A (see Proj._b_chunks), laid out as the fp32 product's input (G, n, M, w): chunk k
    of member g reads row block g, columns out + g·R + starts[k] + 0..w-1. Where the chunks' starts step evenly
    (one chunk, or gate|up's two) that is one strided view of ye: returns its (size, stride, offset from ye's
    start); else flat indices (G·n, M, w) for a `take` (q|k|v: q's three chunks share one window)."""
    n = starts.numel()
    st = starts.tolist()
    step = st[1] - st[0] if n > 1 else 0
    if all(b - a == step for a, b in zip(st, st[1:])):
        return (G, n, M, w), (M * rs + R, step, rs, 1), out + st[0]
    g = torch.arange(G).view(G, 1, 1, 1)
    m = torch.arange(M).view(1, 1, M, 1)
    idx = (g * M + m) * rs + out + g * R + starts.view(1, n, 1, 1) + torch.arange(w).view(1, 1, 1, w)
    return idx.reshape(G * n, M, w)


def lora_b32_plan(b32: tuple, G: int, R: int, M: int, rs: int, out: int, kernel: bool = True) -> tuple:
    """What `add_lora_b32` needs for one projection at M rows per member, made once (a decode step's projection
    caches it per M, so a step allocates nothing and builds no views it can keep): fp32 buffers for x·A (G·n, M, w)
    and the product (G·n, M, c), where x·A sits in the base's product ye (G·M, rs) with `out` base columns
    (`xa_chunk_index`: a strided view of ye, written through a view of the buffer, or indices for a `take`), the
    product's (G, n, M, c) view and where it goes in ye (size, stride, first column). b32: Proj._b_chunks' result.
    Last, the C kernel's arguments (`cpu_kernels.kernel_args`) where it applies (kernel=True and the kernel
    loaded), else None."""
    B, starts, col0, c = b32
    n, w = starts.numel(), B.shape[1]
    xa, d = B.new_empty((B.shape[0], M, w)), B.new_empty((B.shape[0], M, c))
    idx = xa_chunk_index(G, R, M, rs, out, starts, w)
    src = idx.to(B.device) if isinstance(idx, torch.Tensor) else (xa.view(idx[0]), *idx)
    plan = (xa, src, B, d, d.view(G, n, M, c), ((G, n, M, c), (M * rs, c, rs, 1), col0))
    return plan + ((cpu_kernels.kernel_args(plan) if kernel else None),)


def add_lora_b32(ye: torch.Tensor, plan: tuple) -> None:
    """Add every member's (x·A)·B into the base's output columns of ye (G·M, rs), in place: one fp32 bmm over the
    chunks of B·scale (Proj._b_chunks), x·A converted to fp32 in one copy (from a strided view of ye, or a `take`),
    the sum formed in fp32 and rounded once into ye's dtype (as PEFT's result.to(dtype)). ye must be contiguous;
    plan: `lora_b32_plan(...)` for ye's shape (its buffers are reused, so one plan serves one call at a time).
    Where the plan carries the C kernel's arguments and ye is bf16, the kernel does the same in one pass with the
    same bits (`cpu_kernels`: checked against `add_lora_b32_ops` on this machine before it is used)."""
    if plan[6] is not None and ye.dtype == torch.bfloat16:
        cpu_kernels.run(ye, plan[2], plan[6])
    else:
        add_lora_b32_ops(ye, plan)


def lora_b32_products(ye: torch.Tensor, plan: tuple) -> torch.Tensor:
    """The fp32 products (x·A)·B of every chunk, x·A read from ye: the plan's buffer d (G·n, M, c), overwritten by
    the next call."""
    xa, src, B, d = plan[:4]
    if isinstance(src, torch.Tensor):
        xa.copy_(torch.take(ye, src))
    else:
        src[0].copy_(ye.as_strided(src[1], src[2], ye.storage_offset() + src[3]))
    return torch.bmm(xa, B, out=d)


def add_lora_b32_ops(ye: torch.Tensor, plan: tuple) -> None:
    """`add_lora_b32` as PyTorch ops: the C kernel's reference, and the way without it."""
    d4, (size, stride, col0) = plan[4], plan[5]
    lora_b32_products(ye, plan)
    y = ye.as_strided(size, stride, ye.storage_offset() + col0)
    # the same values as y.add_(d4), which converts y through temporaries (slightly slower in the decode step)
    y.copy_(d4.add_(y))


class Unsupported(ValueError):
    """The fast path cannot run this model exactly; the caller falls back to the reference path."""


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _is_lora(m) -> bool:
    return hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "lora_B")


def _base_linear(m) -> nn.Linear:
    b = m.base_layer if _is_lora(m) else m
    if type(b) is not nn.Linear:
        raise Unsupported(
            f"projection of type {type(b).__name__} (only nn.Linear and PEFT LoRA on nn.Linear)"
        )
    return b


@dataclass(frozen=True)
class Arch:
    """Everything two models must share to run as one batched group."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab_rows: int
    eps: float
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    dtype: torch.dtype


def describe(model, max_len: int | None = None) -> Arch:
    """The model's architecture signature; raises `Unsupported` with the reason when the fast path can't run it."""
    cfg = text_config(model)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise Unsupported(f"model_type {mt!r} (fast path supports {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"hidden_act {cfg.hidden_act!r}")
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        raise Unsupported("pretraining_tp > 1")
    sw = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    uses_sw = sw is not None and (
        mt == "mistral"
        or "sliding_attention" in layer_types
        or (mt == "qwen2" and getattr(cfg, "use_sliding_window", False))
    )
    if uses_sw and (max_len is None or sw < max_len):
        raise Unsupported(f"sliding-window attention (window {sw}) shorter than the decode length {max_len}")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise Unsupported(f"{type(model).__name__} has no .model.layers / rotary_emb")
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if rope_type in _SEQ_DEPENDENT_ROPE:
        raise Unsupported(f"rope_type {rope_type!r} depends on the sequence length")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not nn.Embedding or type(head) is not nn.Linear or head.bias is not None:
        raise Unsupported("embedding / LM head are adapted or not plain (LoRA on them is not supported)")
    if getattr(model, "logits_scaling", None) or getattr(cfg, "final_logit_softcapping", None):
        raise Unsupported("logit post-processing")
    L0 = inner.layers[0]
    att, mlp = L0.self_attn, L0.mlp
    for extra in ("q_norm", "k_norm"):
        if getattr(att, extra, None) is not None:
            raise Unsupported(f"attention with {extra}")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if (
        _base_linear(att.q_proj).out_features != heads * hd
        or _base_linear(att.k_proj).out_features != kv * hd
    ):
        raise Unsupported("projection shapes do not match the config's heads × head_dim")
    for L in inner.layers:
        for n in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(getattr(L, n), "variance_epsilon"):
                raise Unsupported(f"{n} is not an RMSNorm")
    w = head.weight
    return Arch(
        model_type=mt,
        layers=len(inner.layers),
        hidden=cfg.hidden_size,
        heads=heads,
        kv_heads=kv,
        head_dim=hd,
        inter=_base_linear(mlp.gate_proj).out_features,
        vocab_rows=w.shape[0],
        eps=float(L0.input_layernorm.variance_epsilon),
        tied=head.weight is emb.weight,
        qkv_bias=any(_base_linear(getattr(att, p)).bias is not None for p in ("q_proj", "k_proj", "v_proj")),
        o_bias=_base_linear(att.o_proj).bias is not None,
        mlp_bias=any(
            _base_linear(getattr(mlp, p)).bias is not None for p in ("gate_proj", "up_proj", "down_proj")
        ),
        dtype=w.dtype,
    )


def lora_parts(m, adapter: str | None):
    """(A (r, in), B (out, r), scaling) of `adapter` on a projection, or None; raises for variants we can't run."""
    if adapter is None or not _is_lora(m) or adapter not in m.lora_A:
        return None
    if getattr(m, "merged", False):
        raise Unsupported("merged LoRA adapters")
    if adapter in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(adapter, False):
        raise Unsupported("LoRA variants (DoRA, …)")
    A, B = m.lora_A[adapter], m.lora_B[adapter]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or B.bias is not None or A.bias is not None:
        raise Unsupported("LoRA with biases or non-linear adapters")
    return A.weight, B.weight, float(m.scaling[adapter])


class Proj:
    """One projection, or several sharing their input (q|k|v, gate|up), for the G members of a group.

    `parts[g][j]` is member g's j-th module (nn.Linear or PEFT LoRA Linear); `adapters[g]` its adapter name.
    Call with x (G, M, in) -> (G, M, sum of out).
    """

    def __init__(self, parts, adapters, shared: bool, copy: bool, device, dtype, lora_precision: str = "auto",
                 pack: bool = True):
        G = len(parts)
        self.G, self.shared, self.copy, self.dtype = G, shared, copy, dtype
        bases = [[_base_linear(m) for m in p] for p in parts]
        self.outs = [b.out_features for b in bases[0]]
        out, inp = sum(self.outs), bases[0][0].in_features
        srcs = bases[:1] if shared else bases
        has_bias = any(b.bias is not None for bs in srcs for b in bs)
        cpu = in_out_copies(device)
        packed = pack and copy and cpu and mkldnn_packing(dtype)
        self.P = self.b_P = None  # oneDNN-packed (out[+G·R], in) copies, one per member (shared: one)
        self.a_in_base = False  # each member's LoRA A rides in the base's product
        if copy:
            W = torch.empty((len(srcs), out, inp), device=device, dtype=dtype)
            bias = torch.zeros((len(srcs), out), device=device, dtype=dtype) if has_bias else None
            for g, bs in enumerate(srcs):
                o = 0
                for b in bs:
                    W[g, o : o + b.out_features].copy_(b.weight)
                    if b.bias is not None:
                        bias[g, o : o + b.out_features].copy_(b.bias)
                    o += b.out_features
            self.b = None if bias is None else (bias[0] if shared else bias)
            # Layout: on the CPU oneDNN-packed copies where this PyTorch build has them (see CPU_FORMS; packed below,
            # once the LoRA terms are known), else (in, out) copies — MKL's few-row matmuls measured 1.7-2.2x faster
            # that way at M = 1..3 than nn.Linear's (out, in); on CUDA the nn.Linear layout (cuBLAS' M=1 kernels).
            self.W = None
            if packed:
                self.Wt, to_pack = None, W
            elif shared:
                if cpu:
                    self.Wt = W[0].t().contiguous()  # (in, out)
                else:
                    self.W, self.Wt = W[0], None  # (out, in): F.linear, like the HF module
            else:
                self.Wt = W.transpose(1, 2).contiguous() if cpu else W.transpose(1, 2)  # (G, in, out)
            del W
        else:
            self.b = self.W = self.Wt = None
        in_place = all(
            b.weight.device == torch.device(device) and b.weight.dtype == dtype for bs in srcs for b in bs
        )
        if not copy and not in_place:
            raise Unsupported("weights='refs' needs every weight on the decode device in the group dtype")
        self.refs = [[(b.weight, b.bias) for b in bs] for bs in srcs] if in_place else None
        # many rows on the CPU: the models' own weights (see CPU_FEW_ROWS)
        self.many_rows_refs = copy and in_place and torch.device(device).type == "cpu"
        self.few_rows = cpu_few_rows(dtype)
        # batched LoRA: A (G, in, R), B (G, R, out), per-output-column scale (G, 1, out); zeros where absent
        found = [[lora_parts(m, a) for m in p] for p, a in zip(parts, adapters)]
        self.lora = lora_full = None
        self.b32 = None  # CPU, shared, model-dtype LoRA: B·scale in fp32 chunks for (x·A)·B (see _b_chunks)
        self.Wt_ext = self.W_ext = self.b_ext = None
        if any(x is not None for f in found for x in f):
            ldt = next(x[0].dtype for f in found for x in f if x is not None)
            R = max(sum(x[0].shape[0] for x in f if x is not None) for f in found)
            A = torch.zeros((G, inp, R), device=device, dtype=ldt)
            Bm = torch.zeros((G, R, out), device=device, dtype=ldt)
            S = torch.zeros((G, 1, out), device=device, dtype=ldt)
            spans: list = [None] * len(self.outs)  # rows of module j's adapters, over all members
            for g, f in enumerate(found):
                r0, o0 = 0, 0
                for j, (x, n_out) in enumerate(zip(f, self.outs)):
                    if x is not None:
                        a, bw, s = x
                        r = a.shape[0]
                        A[g, :, r0 : r0 + r].copy_(a.t())
                        Bm[g, r0 : r0 + r, o0 : o0 + n_out].copy_(bw.t())
                        S[g, 0, o0 : o0 + n_out] = s
                        sp = spans[j]
                        spans[j] = (r0, r0 + r) if sp is None else (min(sp[0], r0), max(sp[1], r0 + r))
                        r0 += r
                    o0 += n_out
            # With a half-precision model the low-rank terms run in the model dtype (fp32 accumulation inside
            # the GEMM, the scale folded into B, the add fused into one baddbmm). PEFT computes them in the
            # adapters' fp32, but fp32 GEMMs this thin (K = hidden, N = rank) are slow: measured on an H200
            # (bench/gpu_profile.sh) they took 6.2 of 8.6 ms per step at batch 16; on a 2-core AVX-512-bf16 CPU
            # (bench/profile_decode.py, SmolLM2 shape, batch 1) the step went from 60 to 49 ms this way. The
            # rounding this adds is far below the bf16 noise the decode-logits calibration measures. fp32 models:
            # PEFT's order (exact parity).
            self.lora_lowp = lora_precision == "model" or (
                lora_precision == "auto" and dtype in (torch.bfloat16, torch.float16))
            if self.lora_lowp:
                self.lora = (A.to(dtype), (Bm * S).to(dtype), None)
            else:
                self.lora = (A, Bm, S)
            # Shared base on the CPU with the low-rank terms in the model dtype: every member's A rides along in
            # the base's (in, out) product as G x R extra columns (each row computes all members' x·A: for the
            # embedded default 48 columns next to 576-3,072), one small matmul fewer per projection and step.
            # On CUDA the same with the (out, in) copy: A's G x R rows join the base's rows, so the thin x·A GEMMs
            # (K = hidden, N = rank: a handful of CTAs looping over K, ~10 us each, four per layer — measured on an
            # H200 with bench/gpu_profile.sh) ride in the base's GEMM, which has the parallelism to hide them.
            if self.lora_lowp and shared and copy and (self.Wt is not None or self.W is not None):
                if self.Wt is not None:
                    self.Wt_ext = torch.cat([self.Wt, self.lora[0].permute(1, 0, 2).reshape(inp, -1)], 1).contiguous()
                    self.Wt = None
                else:
                    self.W_ext = torch.cat([self.W, self.lora[0].permute(0, 2, 1).reshape(-1, inp)]).contiguous()
                    self.W = None
                if self.b is not None:
                    self.b_ext = torch.cat([self.b, self.b.new_zeros(G * self.lora[0].shape[2])])
                self.a_in_base = True
            lora_full = (Bm, S, spans)
        if packed:
            mats = list(to_pack)  # (out, in) per member
            b_P = None if self.b is None else list(self.b.unsqueeze(0) if shared else self.b)
            if self.lora is not None and self.lora_lowp and shared:  # A's rows join the base (as Wt_ext above)
                R = self.lora[0].shape[2]
                mats[0] = torch.cat([mats[0], self.lora[0].permute(0, 2, 1).reshape(G * R, inp)])
                if b_P is not None:
                    b_P[0] = torch.cat([b_P[0], b_P[0].new_zeros(G * R)])
                self.a_in_base = True
            self.P = [mkldnn_pack(m) for m in mats]
            self.b_P = b_P
            del to_pack, mats
        self._b32_plans: dict = {}  # M -> lora_b32_plan(...)
        if self.a_in_base and cpu and lora_precision == "auto":  # "model": the B products in the model dtype too
            Bm, S, spans = lora_full
            self.b32 = self._b_chunks(Bm * S, spans, self.outs)

    @staticmethod
    def _b_chunks(BS: torch.Tensor, spans: list, outs: list[int]):
        """B·scale in fp32 for the CPU's (x·A)·B products (see `_finish_lora`), cut into equal chunks so that one
        batched product covers every adapted module of the projection: chunk k is `c` output columns of one module
        (c = the gcd of the modules' widths; q|k|v of SmolLM2: 576 | 192 | 192 -> 3 + 1 + 1 chunks of 192) with the
        `w` rows of x·A that module's adapters take, over all members (spans[j]: min start, max end; None where no
        member adapts module j; w = the widest span; a narrower module's window takes rows of its neighbours, whose
        B entries in its columns are zeros). Returns (B (G·n, w, c), each chunk's first x·A row (n,), the first
        adapted column, c) — or None where the adapted columns would need more than MAX_B_CHUNKS chunks (the caller
        then keeps the model-dtype product). One product per projection rather than one per module: fewer, bigger
        ops (`python bench/cpu_lora_b.py`)."""
        adapted = [j for j, sp in enumerate(spans) if sp is not None]
        j0, j1 = adapted[0], adapted[-1]
        c = math.gcd(*outs[j0 : j1 + 1])
        col0 = sum(outs[:j0])
        n = sum(outs[j0 : j1 + 1]) // c
        if n > MAX_B_CHUNKS:
            return None
        R = BS.shape[1]
        w = max(sp[1] - sp[0] for sp in spans if sp is not None)
        G = BS.shape[0]
        B = BS.new_zeros((G, n, w, c), dtype=torch.float32)
        starts, k, o0 = [], 0, col0
        for j in range(j0, j1 + 1):
            r0 = 0 if spans[j] is None else min(spans[j][0], R - w)  # unadapted in between: zero chunks
            for _ in range(outs[j] // c):
                if spans[j] is not None:
                    B[:, k] = BS[:, r0 : r0 + w, o0 : o0 + c]
                starts.append(r0)
                k, o0 = k + 1, o0 + c
        return B.view(G * n, w, c), torch.tensor(starts), col0, c

    def _b32_plan(self, M: int, rs: int, out: int) -> tuple:
        """`lora_b32_plan` for this projection at M rows per member, cached."""
        plan = self._b32_plans.get(M)
        if plan is None:
            plan = self._b32_plans[M] = lora_b32_plan(self.b32, self.G, self.lora[0].shape[2], M, rs, out,
                                                      kernel=self.dtype == torch.bfloat16)
        return plan

    @property
    def forms(self) -> tuple[str, ...]:
        """The formulations this projection can run (see CPU_FORMS)."""
        own = ("packed",) if self.P is not None else ("copies",) if self.copy else ()
        return own + (("w_xt", "linear") if self.refs is not None else ())

    def default_form(self, x: torch.Tensor) -> str:
        if self.P is not None:
            return "packed"
        rows = x.shape[1] * (self.G if self.shared else 1)
        return "copies" if self.copy and not (self.many_rows_refs and rows > self.few_rows) else "linear"

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN's linear on the packed copies; with A in the base, the low-rank terms finish here too."""
        G, M, inp = x.shape
        if self.shared:
            ye = mkldnn_linear(x.reshape(G * M, inp), self.P[0], None if self.b_P is None else self.b_P[0])
        else:
            return torch.stack([mkldnn_linear(x[g], P, None if self.b_P is None else self.b_P[g])
                                for g, P in enumerate(self.P)])
        if not self.a_in_base:
            return ye.view(G, M, -1)
        return self._finish_lora(ye, G, M)

    def _finish_lora(self, ye: torch.Tensor, G: int, M: int) -> torch.Tensor:
        """ye (G·M, out + G·R): the base's product with every member's x·A as extra columns -> (G, M, out).

        Row block g keeps its own member's R columns of x·A (a strided view, no copy) and adds (x·A_g)·B_g in place
        into the base's columns: one batched GEMM with beta = 1, no copy of the output — or, in a CPU decode step,
        one fp32 bmm over the chunks of B (`b32`) added into their columns."""
        R = self.lora[0].shape[2]
        rs = ye.shape[1]
        out, o = rs - G * R, ye.storage_offset()
        y = ye.as_strided((G, M, out), (M * rs, rs, 1), o)
        if self.b32 is None or M > CPU_FP32_B_ROWS:
            # member g's x·A_g: row block g, columns out + g·R ... (a strided view, no copy)
            return y.baddbmm_(ye.as_strided((G, M, R), (M * rs + R, rs, 1), o + out), self.lora[1])
        # CPU decode steps (few rows per member, see CPU_FP32_B_ROWS): one fp32 product over the chunks of B
        add_lora_b32(ye, self._b32_plan(M, rs, out))
        return y

    def _w_xt(self, x: torch.Tensor) -> torch.Tensor:
        """W·xᵀ on the models' own (out, in) weights, transposed back to (rows, out)."""
        G, M, inp = x.shape

        def one(x2, parts):
            yt = torch.cat([w_xt(w, x2) for w, _ in parts]) if len(parts) > 1 else w_xt(parts[0][0], x2)
            y = yt.t().contiguous()
            if any(b is not None for _, b in parts):
                y += torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
            return y

        if self.shared:
            return one(x.reshape(G * M, inp), self.refs[0]).view(G, M, -1)
        return torch.stack([one(x[g], r) for g, r in enumerate(self.refs)])

    def __call__(self, x: torch.Tensor, form: str | None = None) -> torch.Tensor:
        """x (G, M, in) -> (G, M, sum of out); `form` (one of `forms`) overrides the default choice."""
        if form is None or form not in self.forms:
            form = self.default_form(x)
        if form == "packed":
            y = self._packed(x)
            if self.lora is None or self.a_in_base:
                return y
        elif self.lora is not None and (self.Wt_ext is not None or self.W_ext is not None) and form == "copies":
            G, M, inp = x.shape
            x2 = x.reshape(G * M, inp)
            if self.W_ext is not None:
                ye = F.linear(x2, self.W_ext, self.b_ext)
            else:
                ye = torch.mm(x2, self.Wt_ext) if self.b_ext is None else torch.addmm(self.b_ext, x2, self.Wt_ext)
            return self._finish_lora(ye, G, M)
        elif form == "copies":
            if self.shared and self.W is not None:
                y = F.linear(x, self.W, self.b)  # all G×M rows through the one base: (G, M, out)
            elif self.shared:
                G, M, _ = x.shape
                x2 = x.reshape(G * M, -1)
                y = (torch.mm(x2, self.Wt) if self.b is None else torch.addmm(self.b, x2, self.Wt)).view(
                    G, M, -1
                )
            elif self.b is None:
                y = torch.bmm(x, self.Wt)  # (G, M, out)
            else:
                y = torch.baddbmm(self.b.unsqueeze(1), x, self.Wt)
        elif form == "w_xt":
            y = self._w_xt(x)
        elif self.shared:
            r = self.refs[0]
            y = F.linear(x, *r[0]) if len(r) == 1 else torch.cat([F.linear(x, w, b) for w, b in r], -1)
        else:
            y = torch.stack(
                [
                    torch.cat([F.linear(x[g], w, b) for w, b in r], -1)
                    if len(r) > 1
                    else F.linear(x[g], *r[0])
                    for g, r in enumerate(self.refs)
                ]
            )
        if self.lora is not None:
            A, Bm, S = self.lora
            if self.lora_lowp:
                y = torch.baddbmm(y.reshape(Bm.shape[0], -1, Bm.shape[2]), torch.bmm(x.to(A.dtype), A), Bm)
            else:
                d = torch.bmm(torch.bmm(x.to(A.dtype), A), Bm) * S  # (G, M, out)
                y = (y + d).to(y.dtype)
        return y


class Group:
    """G specialists of one architecture on one device, decoded as one batch (see the module docstring)."""

    def __init__(self, members, device, weights: str, max_batch: int, max_len: int, attention: str = "bmm",
                 lora_precision: str = "auto", cpu_matmul: str = "auto", kv_cache_dtype: str = "auto"):
        """members: [(hf_model, adapter_name | None)]; weights: 'copy' or 'refs'; attention (decode step): 'bmm'
        (scores in the cache's dtype — kv_cache_dtype — before an fp32 softmax: with the model dtype, like HF
        eager attention) or 'sdpa' (PyTorch's fused kernel: fp32 scores and softmax, like HF's default sdpa
        attention on CUDA); cpu_matmul: how the
        decode step's matmuls run on the CPU — 'auto' (oneDNN-packed copies where available; fp32: the form
        measured per batch size, see CPU_FORMS), 'rule' (plain copies and the fixed rule of CPU_FEW_ROWS, as
        before packing), or one of CPU_FORMS wherever available ('copies' also means plain copies)."""
        if kv_cache_dtype not in ("auto", "model", "float32"):
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: use auto, model or float32")
        if attention not in ("bmm", "sdpa"):
            raise ValueError(f"attention={attention!r}: use bmm or sdpa")
        if cpu_matmul not in ("auto", "rule") + CPU_FORMS:
            raise ValueError(f"cpu_matmul={cpu_matmul!r}: use auto, rule or one of {', '.join(CPU_FORMS)}")
        self.attention = attention
        self.cpu_matmul = cpu_matmul
        self.cpu_forms: dict[int, dict] = {}  # batch size -> {"proj": form, "head": form, "ms": timings}
        self.mixed_head = False  # set by the decoder: the LM head runs once per prompt on mixed hidden states
        models = [m for m, _ in members]
        adapters = [a for _, a in members]
        self.G = G = len(members)
        self.shared = all(m is models[0] for m in models)
        if not self.shared and len({id(m) for m in models}) != G:
            raise ValueError("a stacked group needs distinct models (share a base via LoRA instead)")
        self.arch = a = describe(models[0], max_len)
        for m in models[1:]:
            if describe(m, max_len) != a:
                raise ValueError("members of a group must have identical architectures")
        self.device = torch.device(device)
        # on the CPU every op follows the HF modules exactly (fp32 parity); on CUDA RMSNorm is one fused kernel
        self.fused_norm = self.device.type == "cuda" and hasattr(F, "rms_norm")
        dt, copy = a.dtype, weights == "copy"
        self.copy = copy
        self.rep = a.heads // a.kv_heads
        self.scaling = a.head_dim**-0.5
        dev = self.device

        def stack_vec(get):  # (G, 1, 1, H): tiny per-member vectors are always copied
            return torch.stack([get(m).detach().to(dev, dt) for m in models]).view(G, 1, 1, -1)

        # oneDNN-packed copies on the CPU unless the fixed rule / plain copies are asked for (see CPU_FORMS)
        pack = copy and dev.type == "cpu" and cpu_matmul in ("auto", "packed") and mkldnn_packing(dt)
        self.layers = []
        for i in range(a.layers):
            Ls = [m.model.layers[i] for m in models]
            self.layers.append(
                {
                    "ln1": stack_vec(lambda m, i=i: m.model.layers[i].input_layernorm.weight),
                    "ln2": stack_vec(lambda m, i=i: m.model.layers[i].post_attention_layernorm.weight),
                    "qkv": Proj(
                        [[L.self_attn.q_proj, L.self_attn.k_proj, L.self_attn.v_proj] for L in Ls],
                        adapters,
                        self.shared,
                        copy,
                        dev,
                        dt,
                        lora_precision,
                        pack,
                    ),
                    "o": Proj([[L.self_attn.o_proj] for L in Ls], adapters, self.shared, copy, dev, dt,
                              lora_precision, pack),
                    "gu": Proj([[L.mlp.gate_proj, L.mlp.up_proj] for L in Ls], adapters, self.shared, copy, dev,
                               dt, lora_precision, pack),
                    "down": Proj([[L.mlp.down_proj] for L in Ls], adapters, self.shared, copy, dev, dt,
                                 lora_precision, pack),
                }
            )
        self.norm = stack_vec(lambda m: m.model.norm.weight)
        src = models[:1] if self.shared else models
        embs = [m.get_input_embeddings().weight for m in src]
        heads = [m.get_output_embeddings().weight for m in src]
        if copy:
            self.emb = torch.stack([e.detach().to(dev, dt) for e in embs])  # (G', V, H)
            self.head = self.emb if a.tied else torch.stack([h.detach().to(dev, dt) for h in heads])
            # the LM head as the right operand (G', H, V): contiguous for fp32 on the CPU (see CPU_FEW_ROWS), a view
            # elsewhere (bf16 on the CPU: the (V, H) head itself, as F.linear)
            cpu32 = dev.type == "cpu" and dt == torch.float32
            self.head_P = [mkldnn_pack(h) for h in self.head] if pack else None
            if pack:
                self.head_t = None
            else:
                self.head_t = self.head.transpose(1, 2).contiguous() if cpu32 else self.head.transpose(1, 2)
            if (cpu32 or pack) and not a.tied:
                self.head = None
        else:
            self.head_P = None
            for t in embs + heads:
                if t.device != dev or t.dtype != dt:
                    raise Unsupported(
                        "weights='refs' needs every weight on the decode device in the group dtype"
                    )
        if all(t.device == dev and t.dtype == dt for t in embs + heads):
            self.emb_refs, self.head_refs = embs, heads
        else:
            self.emb_refs = self.head_refs = None
        rot = [m.model.rotary_emb for m in models]
        self.inv_freq = torch.stack([r.inv_freq.detach().float().to(dev) for r in rot]).view(G, 1, 1, -1)
        att = [float(getattr(r, "attention_scaling", 1.0)) for r in rot]
        self.att_scale = (
            None if all(s == 1.0 for s in att) else torch.tensor(att, device=dev).view(G, 1, 1, 1)
        )
        self.max_batch, self.max_len = max_batch, max_len
        shape = (max_batch, G, a.kv_heads, max_len, a.head_dim)
        # The decode step's attention dtype (and the cache's). "auto": on the CPU, bf16 / fp16 models keep their
        # keys and values in fp32 (the values the model computed, exactly: widening rounds nothing) and attend in
        # fp32 — oneDNN's half-precision batched matmuls this small cost a fixed ~40-130 us each, and the
        # attention length, so the shape, changes every step; the fp32 ones were 1.15-2.9x faster at 1-12 rows on
        # a 2-core AVX-512-bf16 VM (`python bench/cpu_attention.py`; bench/results/cpu_attention_bf16.json). The cache takes twice the bytes; scores are not
        # rounded to the model dtype (closer to fp32 than HF's eager bf16 attention). CUDA keeps the model dtype
        # (bandwidth-bound there). "model" / "float32" force one.
        half_cpu = dev.type == "cpu" and dt in (torch.bfloat16, torch.float16)
        self.kv_dtype = torch.float32 if kv_cache_dtype == "float32" or (
            kv_cache_dtype == "auto" and half_cpu) else dt
        self.k_cache = [torch.zeros(shape, device=dev, dtype=self.kv_dtype) for _ in range(a.layers)]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=self.kv_dtype) for _ in range(a.layers)]

    # ------------------------------------------------------------------ pieces
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _embed(self, ids):  # ids (G, B, T) -> (G, B, T, H)
        if self.copy:
            if self.shared:
                return F.embedding(ids, self.emb[0])
            V = self.emb.shape[1]
            off = (torch.arange(self.G, device=ids.device) * V).view(self.G, 1, 1)
            return F.embedding(ids + off, self.emb.view(-1, self.emb.shape[-1]))
        if self.shared:
            return F.embedding(ids, self.emb_refs[0])
        return torch.stack([F.embedding(ids[g], w) for g, w in enumerate(self.emb_refs)])

    @property
    def head_forms(self) -> tuple[str, ...]:
        own = ("packed",) if self.head_P is not None else ("copies",) if self.copy else ()
        return own + (("w_xt", "linear") if self.head_refs is not None else ())

    def head_of_mix(self, h: torch.Tensor) -> torch.Tensor:
        """A shared group's LM head on B mixed hidden states (B, H) -> logits (B, V): one row per prompt (the
        decoder sets `mixed_head`, so the CPU's measured choice of head formulation is made for B rows)."""
        return self._head(h.unsqueeze(0), self.forms_for(h.shape[0])[1], rows=h.shape[0])[0]

    def _head(self, h, form: str | None = None, rows: int | None = None):  # h (G, B, H) -> logits (G, B, V)
        if self.head_P is not None and form in (None, "packed", "copies"):
            G, B, H = h.shape
            if self.shared:
                return mkldnn_linear(h.reshape(G * B, H), self.head_P[0], None).view(G, B, -1)
            return torch.stack([mkldnn_linear(h[g], P, None) for g, P in enumerate(self.head_P)])
        if form in ("w_xt", "linear") and self.head_refs is not None:
            G, B, H = h.shape
            if form == "linear":
                return F.linear(h, self.head_refs[0]) if self.shared else torch.stack(
                    [F.linear(h[g], w) for g, w in enumerate(self.head_refs)])
            if self.shared:
                return w_xt(self.head_refs[0], h.reshape(G * B, H)).t().reshape(G, B, -1)
            return torch.stack([w_xt(w, h[g]).t() for g, w in enumerate(self.head_refs)])
        if form == "copies" and self.copy:
            if self.shared:
                G, B, H = h.shape
                return torch.mm(h.reshape(G * B, H), self.head_t[0]).view(G, B, -1)
            return torch.bmm(h, self.head_t)
        rows = rows or h.shape[1] * (self.G if self.shared else 1)
        cpu = self.device.type == "cpu"
        if self.copy and cpu and self.arch.dtype != torch.float32:  # h·Wᵀ with the (V, H) head (CPU_FEW_ROWS)
            return F.linear(h, self.head[0]) if self.shared else torch.stack(
                [F.linear(h[g], w) for g, w in enumerate(self.head)])
        if self.copy and not (cpu and self.head_refs is not None and rows > CPU_FEW_ROWS):
            if self.shared:  # h (G, B, H): all G×B rows through the one head
                G, B, H = h.shape
                return torch.mm(h.reshape(G * B, H), self.head_t[0]).view(G, B, -1)
            return torch.bmm(h, self.head_t)
        if self.device.type == "cpu":
            # W·hᵀ rather than h·Wᵀ: MKL runs the (V, H) x (H, rows) product 1.2-2.1x faster for a tall LM head
            # at 8-64 rows (bench/cpu_head.py on the 2-core VM: 33.8 -> 16.4 ms at 8 rows of SmolLM2's 49k x 576
            # head; at 1-3 rows the (H, V) copy above is used)
            if self.shared:
                G, B, H = h.shape
                return torch.mm(self.head_refs[0], h.reshape(G * B, H).t()).t().reshape(G, B, -1)
            return torch.stack([torch.mm(w, h[g].t()).t() for g, w in enumerate(self.head_refs)])
        if self.shared:
            return F.linear(h, self.head_refs[0])
        return torch.stack([F.linear(h[g], w) for g, w in enumerate(self.head_refs)])

    def _norm(self, x, w):  # HF LlamaRMSNorm, batched over members
        if self.fused_norm:  # one fp32-accumulating kernel instead of seven (same math, CUDA only)
            return w * F.rms_norm(x, (x.shape[-1],), eps=self.arch.eps)
        dt = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.arch.eps)
        return w * x.to(dt)

    def _rope(self, pos, dtype):  # pos (G, B, T) -> cos, sin (G, B, T, 1, D)
        freqs = pos[..., None].float() * self.inv_freq  # (G, B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.att_scale is not None:
            cos, sin = cos * self.att_scale, sin * self.att_scale
        return cos.to(dtype).unsqueeze(3), sin.to(dtype).unsqueeze(3)

    @staticmethod
    def _rotate(x, cos, sin):
        h = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin

    def _layer_qkv(self, Lw, x, cos, sin, form=None):
        """x (G, B, T, H) -> q (G, B, T, Hq, D), k, v (G, B, T, Hkv, D), RoPE applied (to q and k at once)."""
        a = self.arch
        G, B, T, _ = x.shape
        h = self._norm(x, Lw["ln1"])
        qkv = Lw["qkv"](h.view(G, B * T, -1), form)  # (G, B*T, Dq + 2 Dkv)
        dqk = (a.heads + a.kv_heads) * a.head_dim
        qk = self._rotate(qkv[..., :dqk].view(G, B, T, a.heads + a.kv_heads, a.head_dim), cos, sin)
        v = qkv[..., dqk:].view(G, B, T, a.kv_heads, a.head_dim)
        return qk[:, :, :, : a.heads], qk[:, :, :, a.heads :], v

    def _layer_rest(self, Lw, x, attn, form=None):
        """Residual adds, o_proj and the SwiGLU MLP. attn (G, B*T, Hq*D)."""
        G, B, T, H = x.shape
        x = x + Lw["o"](attn, form).reshape(G, B, T, H)
        h = self._norm(x, Lw["ln2"])
        gu = Lw["gu"](h.view(G, B * T, H), form)  # (G, B*T, 2I)
        I = self.arch.inter
        return x + Lw["down"](F.silu(gu[..., :I]) * gu[..., I:], form).view(G, B, T, H)

    # ------------------------------------------------------------------ CPU matmul forms
    def forms_for(self, B: int) -> tuple[str | None, str | None]:
        """(projection form, LM-head form) of a decode step with batch B; None: the fixed rule."""
        if self.device.type != "cpu" or self.cpu_matmul == "rule":
            return None, None
        if self.cpu_matmul != "auto":
            return self.cpu_matmul, self.cpu_matmul
        if self.arch.dtype != torch.float32 or B * (self.G if self.shared else 1) > CPU_TUNE_MAX_ROWS:
            return None, None
        if B not in self.cpu_forms:
            self.cpu_forms[B] = f = self._tune(B)
            log.debug("CPU matmuls at batch %d: projections %s, LM head %s (ms: %s)", B, f["proj"], f["head"], f["ms"])
        f = self.cpu_forms[B]
        return f["proj"], f["head"]

    def _tune(self, B: int) -> dict:
        """Time each available form on this group's own weights (all layers: the step's real memory traffic)."""
        a, G, dev = self.arch, self.G, self.device
        gen = torch.Generator().manual_seed(0)

        def rand(n):
            return torch.randn((G, B, n), generator=gen).to(dev, a.dtype)

        xh, xa, xi = rand(a.hidden), rand(a.heads * a.head_dim), rand(a.inter)
        L0 = self.layers[0]

        def sweep(form):
            for Lw in self.layers:
                Lw["qkv"](xh, form), Lw["o"](xa, form), Lw["gu"](xh, form), Lw["down"](xi, form)

        rows = B * (G if self.shared else 1)
        head_rows = B if self.mixed_head else rows
        xhead = xh[:1] if self.mixed_head else xh
        head_default = "packed" if self.head_P is not None else (
            "copies" if self.copy and not (self.head_refs is not None and head_rows > CPU_FEW_ROWS) else "w_xt")
        out = {"ms": {}}
        with torch.no_grad():
            for part, forms, default, run in (
                ("proj", L0["qkv"].forms, L0["qkv"].default_form(xh), sweep),
                ("head", self.head_forms, head_default, lambda f: self._head(xhead, f, rows=head_rows)),
            ):
                ms = {f: math.inf for f in forms}
                for f in forms:  # warm-up
                    run(f)
                for _ in range(3):  # interleaved, best of three
                    for f in forms:
                        t = time.perf_counter()
                        run(f)
                        ms[f] = min(ms[f], (time.perf_counter() - t) * 1e3)
                best = min(ms, key=ms.get) if ms else default
                keep = default in ms and ms[best] >= CPU_TUNE_MARGIN * ms[default]
                out[part] = default if keep else best
                out["ms"][part] = {f: round(t, 3) for f, t in ms.items()}
        return out

    # ------------------------------------------------------------------ prefill / decode
    def prefill(self, ids, mask, row0: int = 0, slot0: int = 0, logits: bool = True):
        """ids, mask (G, B, T) left-padded; fills cache rows [row0, row0 + B), slots [slot0, slot0 + T) (a row
        prefilled on its own goes to the end of the batch's slot range: slot0 = the batch's T - this T); returns
        (hidden, logits) at the last slot: (G, B, H), (G, B, V) — logits None when not asked for."""
        a = self.arch
        G, B, T = ids.shape
        rows, slots = slice(row0, row0 + B), slice(slot0, slot0 + T)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions that ignore left padding
        cos, sin = self._rope(pos, a.dtype)
        ar = torch.arange(T, device=ids.device)
        causal = ar.view(1, T) <= ar.view(T, 1)  # (Tq, Tk)
        allowed = (causal & mask.bool().view(G * B, 1, 1, T)) | torch.eye(
            T, dtype=torch.bool, device=ids.device
        )
        x = self._embed(ids)
        for i, Lw in enumerate(self.layers):
            q, k, v = self._layer_qkv(Lw, x, cos, sin)
            self.k_cache[i][rows, :, :, slots] = k.permute(1, 0, 3, 2, 4)  # (B, G, Hkv, T, D)
            self.v_cache[i][rows, :, :, slots] = v.permute(1, 0, 3, 2, 4)
            qh = q.permute(0, 1, 3, 2, 4).reshape(G * B, a.heads, T, a.head_dim)  # (GB, Hq, T, D)
            kh = k.permute(0, 1, 3, 2, 4).reshape(G * B, a.kv_heads, T, a.head_dim)
            vh = v.permute(0, 1, 3, 2, 4).reshape(G * B, a.kv_heads, T, a.head_dim)
            if self.rep > 1:
                kh = kh.repeat_interleave(self.rep, dim=1)
                vh = vh.repeat_interleave(self.rep, dim=1)
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=allowed, scale=self.scaling
            )  # (GB, Hq, T, D)
            o = o.view(G, B, a.heads, T, a.head_dim).permute(0, 1, 3, 2, 4).reshape(G, B * T, -1)
            x = self._layer_rest(Lw, x, o)
        h = self._norm(x[:, :, -1:], self.norm)[:, :, 0]  # (G, B, H) the LM head's input
        return h, self._head(h) if logits else None

    def decode(self, tok, pos, pad, cur, t_attn: int, logits: bool = True):
        """One step: tok (B,) new token for every member, pos (G, B) its positions, pad (B, G) left padding,
        cur (1,) the cache slot to write; attends over slots [0, t_attn). Returns (G, B, H), (G, B, V) (logits
        None when not asked for)."""
        a = self.arch
        G, B = pos.shape
        D, Hkv, kd = a.head_dim, a.kv_heads, self.kv_dtype
        cos, sin = self._rope(pos.unsqueeze(-1), a.dtype)  # (G, B, 1, 1, D)
        x = self._embed(tok.view(1, B, 1).expand(G, B, 1))  # (G, B, 1, H)
        ar = torch.arange(t_attn, device=tok.device)
        allowed = (ar >= pad.unsqueeze(-1)) & (ar <= cur)  # (B, G, T_attn): this row's real tokens so far
        if (
            self.attention == "sdpa"
        ):  # boolean mask per (row, member, kv head), broadcast over its query heads
            mask = (
                allowed.view(B, G, 1, 1, t_attn)
                .expand(B, G, Hkv, 1, t_attn)
                .reshape(B * G * Hkv, 1, 1, t_attn)
            )
        else:
            bias = torch.zeros((B, G, Hkv, 1, t_attn), device=tok.device, dtype=kd)
            bias = bias.masked_fill(~allowed.view(B, G, 1, 1, t_attn), NEG_INF).view(B * G * Hkv, 1, t_attn)
        pf, hf = self.forms_for(B)
        # the CPU (no graph capture) writes the new keys / values at a host-known slot: one converting copy per
        # cache instead of a conversion and an index_copy_ (same values)
        slot = int(cur) if self.device.type == "cpu" else None
        for i, Lw in enumerate(self.layers):
            q, k, v = self._layer_qkv(Lw, x, cos, sin, pf)  # (G, B, 1, heads, D)
            kc, vc = self.k_cache[i][:B], self.v_cache[i][:B]  # contiguous (B, G, Hkv, T_max, D)
            if slot is None:
                kc.index_copy_(3, cur, k.permute(1, 0, 3, 2, 4).to(kd))
                vc.index_copy_(3, cur, v.permute(1, 0, 3, 2, 4).to(kd))
            else:
                kc.select(3, slot).copy_(k.squeeze(2).transpose(0, 1))
                vc.select(3, slot).copy_(v.squeeze(2).transpose(0, 1))
            kv_k = kc[:, :, :, :t_attn].view(B * G * Hkv, t_attn, D)  # a view: the cache is never copied
            kv_v = vc[:, :, :, :t_attn].view(B * G * Hkv, t_attn, D)
            qh = _contiguous_as(q.reshape(G, B, Hkv, self.rep, D).transpose(0, 1), kd).view(B * G * Hkv, self.rep, D)
            if self.attention == "sdpa":
                # GQA without copying the cache: a kv head's `rep` query heads are SDPA's query positions
                o = F.scaled_dot_product_attention(
                    qh.unsqueeze(1), kv_k.unsqueeze(1), kv_v.unsqueeze(1), attn_mask=mask, scale=self.scaling
                ).squeeze(1)  # (BGHkv, rep, D)
            else:
                s = torch.baddbmm(bias, qh, kv_k.transpose(1, 2), alpha=self.scaling)  # scale·qKᵀ + mask
                p = torch.softmax(s, dim=-1, dtype=torch.float32).to(kd)  # (BGHkv, rep, T)
                o = torch.bmm(p, kv_v)  # (BGHkv, rep, D)
            o = _contiguous_as(o.view(B, G, a.heads * D).transpose(0, 1), a.dtype)  # (G, B, Hq*D)
            x = self._layer_rest(Lw, x, o, pf)
        h = self._norm(x, self.norm)[:, :, 0]
        return h, self._head(h, hf) if logits else None
