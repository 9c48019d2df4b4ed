"""Fast fused decoding: the same tokens as `FusedModel.start_decoding/decode_step`, at a fraction of the cost.

    dec = FastFusedDecoder(model, max_batch=16, max_len=1024)
    out = dec.generate(prompts, SamplingParams(max_new_tokens=128))     # like generation.generate
    for events in dec.stream(prompts, params): ...                        # like generation.stream
    for events in fast.stream(model, prompts, params): ...                # fast path when supported, else reference

What it does differently from the straightforward path (see `fast_llama.py` for the decoder itself):

- specialists are partitioned into *groups* that run as one batch: specialists of identical architecture on one
  device are stacked (one `bmm` per projection), LoRA specialists sharing a base run all their rows through the
  base weights once plus batched low-rank deltas; the gate and the fusion are the core's own `FusedModel.mix`;
- KV caches are static buffers, allocated once for (max_batch, max_len); without CUDA graphs (the CPU) rows
  that finished leave the batch (their cache rows compacted away), since a step there costs about its rows;
- on CUDA the whole step — every group, the gate, the fusion and the greedy / sampling pick, plus the position
  and cache-slot increments — is captured as one CUDA graph per (batch, attention-length bucket, pick mode) and
  the step's token is fed back on the device, so the host enqueues step t+1 before reading token t: exactly one
  host sync per step (an event wait for the token ids);
- with specialists on several devices, each device replays its own graph (they run concurrently), the hidden
  states and logits move to the fusing device, and the picked token moves back; on the CPU, groups can run in
  threads (`threads=True`), which is how the per-device path is tested without GPUs.

Sampling: on the CPU the pick is the reference's own `_pick` with the same per-row seeded generators, so sampled
tokens are identical too. On CUDA the default is an in-graph sampler (temperature → top-k → top-p with the
Hugging Face warpers' semantics, then Gumbel-max with a counter-based hash of (seed, step, token)): seeded and
independent of the batch, but a different random stream than the reference; `sampler="reference"` gives the
reference's exact samples at one extra sync per step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ultrafuser.data.conversation import Aligned
from ultrafuser.modeling.fast_llama import CPU_FORMS, Group, Unsupported, _is_lora, describe
from ultrafuser.modeling.fast_sample import _M32, device_sample
from ultrafuser.modeling.generation import (
    Completion,
    SamplingParams,
    TokenEvent,
    _pick,
    collect,
    prepare_rows,
    row_limits,
)

log = logging.getLogger(__name__)

MIN_BUCKET = 32  # the finest step of the default growing attention buckets (see attention_length)


def attention_length(filled: int, bucket: int | None, max_len: int) -> int:
    """The slots a decode step attends over when `filled` are filled: rounded up to a multiple of `bucket`, or with
    bucket=None to a multiple of 1/8 of filled's power of two (at least MIN_BUCKET: 32 up to 511 filled slots, 64
    up to 1,023, 128 up to 2,047, ...): from 256 filled slots on at most 1/8 of the slots read are padding, and the
    number of lengths (CUDA graphs) grows with the log of the context: 8 per doubling. Capped at max_len.

    Why: a captured graph's attention has a fixed length, and the cache reads are the step's second-biggest bytes
    at batch 16 (three 7B specialists without grouped-query attention: 9.7 GB of caches next to a 13.5 GB base at
    384 slots); a fixed bucket of 128 read 384 slots for every step from 257 to 384 filled — 20 % more than the
    filled ones on average."""
    step = bucket if bucket else max(MIN_BUCKET, (1 << (filled.bit_length() - 1)) // 8)
    return min(max_len, -(-filled // step) * step)

__all__ = [
    "FastFusedDecoder",
    "Unsupported",
    "device_sample",
    "fast_decoder_for",
    "generate",
    "maybe_stream",
    "reference_stream",
    "release",
    "stream",
]


_GREEDY = SamplingParams()  # the default request, as in generation.stream


# --------------------------------------------------------------------------------------------- state


class _BatchState:
    """Static buffers for one batch size (graphs read and write only these)."""

    def __init__(self, dec: FastFusedDecoder, B: int):
        self.B = B
        fd = dec.fuse_device
        N = len(dec.model.specialists)
        V = dec.model.vocab_size
        long = {"dtype": torch.long}
        self.tok = {d: torch.zeros(B, device=d, **long) for d in dec.runner_devices | {fd}}
        self.pos, self.pad, self.cur, self.hout, self.lout, self.hm, self.lm = [], [], [], [], [], [], []
        for g in dec.groups:
            a, dev = g.arch, g.device
            self.pos.append(torch.zeros((g.G, B), device=dev, **long))
            self.pad.append(torch.zeros((B, g.G), device=dev, **long))
            self.cur.append(torch.zeros(1, device=dev, **long))
            self.hout.append(torch.zeros((g.G, B, a.hidden), device=dev, dtype=a.dtype))
            remote = dev != fd
            self.hm.append(torch.zeros_like(self.hout[-1], device=fd) if remote else self.hout[-1])
            if g in dec.head_after_mix:  # its members' logits are never formed (see FastFusedDecoder._fuse)
                self.lout.append(None)
                self.lm.append(None)
                continue
            self.lout.append(torch.zeros((g.G, B, a.vocab_rows), device=dev, dtype=a.dtype))
            self.lm.append(torch.zeros_like(self.lout[-1], device=fd) if remote else self.lout[-1])
        self.cur_host = [0] * len(dec.groups)
        self.z = torch.zeros((B, V), device=fd)
        self.w = torch.zeros((B, N), device=fd)
        self.temp = torch.zeros(B, device=fd)
        self.top_p = torch.ones(B, device=fd)
        self.top_k = torch.zeros(B, device=fd, **long)
        self.seed = torch.zeros(B, device=fd, **long)
        self.step = torch.zeros(1, device=fd, **long)
        self.graphs: dict = {}
        # host ring of the last two steps' token ids (and gate weights) for the pipelined loop
        pin = _is_cuda(fd)
        self.tok_host = torch.zeros((2, B), dtype=torch.long, pin_memory=pin)
        self.w_host = torch.zeros((2, B, N), pin_memory=pin)
        self.events = [torch.cuda.Event(), torch.cuda.Event()] if pin else None

    def mutable(self) -> list[torch.Tensor]:
        return list(self.tok.values()) + self.pos + self.cur + [self.step]


def _is_cuda(d) -> bool:
    return torch.device(d).type == "cuda"


def _norm_device(d) -> torch.device:
    """`cuda` -> `cuda:<current>` so that devices compare equal to tensors' devices."""
    d = torch.device(d)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


# --------------------------------------------------------------------------------------------- decoder


class FastFusedDecoder:
    """Static-cache, batched, graph-captured decoding for a `FusedModel` (see the module docstring).

    max_batch / max_len: the largest batch and prompt+generation length (in each group's padded slots).
    devices: a device per specialist (default: where it lives; weights are copied when it differs).
    groups: an explicit partition of specialist indices (default: by shared base, then by architecture+device).
    weights: "copy" (stacked, fused q|k|v and gate|up copies: fastest), "refs" (read the models' own weights:
      no extra memory) or "auto" (copy where it fits: always on the CPU, on CUDA when free memory allows).
    cuda_graphs: default on when everything is on CUDA; "emulate" runs the graph code path (warm-up, state
      snapshot/restore, one "graph" per device and key, attention buckets) eagerly on any device — for tests.
    threads: run groups concurrently in threads on the CPU (default: only when the groups are on different
      devices). pipeline: enqueue step t+1 before reading token t (default: with CUDA graphs).
    sampler: "reference" (host `_pick`, identical samples to the reference path), "device" (in-graph, see
      `device_sample`) or "auto" (reference on the CPU, device on CUDA). bucket: attention-length granularity
      of the captured graphs (one graph per bucket; the step attends over the filled slots rounded up to it): an
      int for a fixed step, or None (default) for steps of 1/8 of the length's power of two, at least
      MIN_BUCKET — 32 slots below 512, 64 below 1,024, ... —, so that past 256 slots at most 1/8 of the slots
      read are padding and a long generation captures 8 graphs per doubling of its length (see
      `attention_length`; the fixed 128 before 2026-11-27 read 384 slots for every step from 257 to 384). Without
      graphs the step attends over exactly the filled slots.
    decode_attention: "bmm" (scores in the cache's dtype — see kv_cache_dtype —, fp32 softmax), "sdpa"
      (PyTorch's fused attention, fp32 scores: closer to HF's sdpa path in bf16 on CUDA) or "auto" (default: sdpa
      on CUDA — 1-5 % faster steps with 7B shapes on an H100 and an H200, docs/benchmarks.md, runs 7-8 —, bmm
      on the CPU, where PyTorch's fused attention was no faster for a decode step's few rows).
    lora_precision: "auto" (LoRA terms in the model dtype for bf16/fp16 models — PEFT's fp32 terms are slow thin
      GEMMs on CUDA and on the CPU — else in the adapters' dtype, as PEFT), "adapter" (always PEFT's way) or
      "model" (always the model dtype, scale folded into B, one fused add).
    cpu_matmul: how the decode step's matmuls run on the CPU: "auto" (copies packed for oneDNN's linear where
      the PyTorch build has it; for fp32 groups the formulation is measured on the group's own weights the first
      time each batch size up to fast_llama.CPU_TUNE_MAX_ROWS rows per matmul decodes: the fastest differs between
      CPUs and BLAS builds, by 2-3x on some), "rule" (plain copies and the fixed rule, as before packing), or a
      formulation forced wherever available: "packed", "copies", "w_xt", "linear" (see fast_llama.CPU_FORMS).
      `cpu_matmul_choices()` reports what was chosen and measured.
    mix_before_head: members of a shared group (one base + LoRA adapters) have one LM head, and the fusion is
      linear in the logits, so their gate-weighted hidden states go through the head once per prompt instead of
      each member's through it (default); False forms every member's logits, as the reference does.
    kv_cache_dtype: the KV cache's and the decode attention's dtype: "auto" (fp32 for bf16 / fp16 models on the
      CPU, where half-precision attention matmuls this small are slow — see fast_llama.Group —, else the model
      dtype), "model" or "float32".
    """

    def __init__(
        self,
        model,
        max_batch: int = 8,
        max_len: int = 1024,
        *,
        devices: Sequence | None = None,
        groups: Sequence[Sequence[int]] | None = None,
        weights: str = "auto",
        cuda_graphs: bool | str | None = None,
        threads: bool | None = None,
        pipeline: bool | None = None,
        sampler: str = "auto",
        bucket: int | None = None,
        decode_attention: str = "auto",
        lora_precision: str = "auto",
        cpu_matmul: str = "auto",
        mix_before_head: bool = True,
        kv_cache_dtype: str = "auto",
    ):
        self.mix_before_head = bool(mix_before_head)
        self.kv_cache_dtype = kv_cache_dtype  # checked by each Group
        if cpu_matmul not in ("auto", "rule") + CPU_FORMS:
            raise ValueError(f"cpu_matmul={cpu_matmul!r}: use auto, rule or one of {', '.join(CPU_FORMS)}")
        self.cpu_matmul = cpu_matmul
        if weights not in ("auto", "copy", "refs"):
            raise ValueError(f"weights={weights!r}: use auto, copy or refs")
        if lora_precision not in ("auto", "adapter", "model"):
            raise ValueError(f"lora_precision={lora_precision!r}: use auto, adapter or model")
        self.lora_precision = lora_precision
        if sampler not in ("auto", "reference", "device"):
            raise ValueError(f"sampler={sampler!r}: use auto, reference or device")
        self.model = model
        specs = model.specialists
        self.devices = [
            _norm_device(d) for d in (devices if devices is not None else [s.device for s in specs])
        ]
        if len(self.devices) != len(specs):
            raise ValueError(f"devices: {len(self.devices)} given for {len(specs)} specialists")
        self.fuse_device = _norm_device(specs[0].device)  # where FusedModel.mix puts the fused logits
        all_cuda = all(_is_cuda(d) for d in self.devices) and _is_cuda(self.fuse_device)
        self.emulate = cuda_graphs == "emulate"
        self.use_graphs = self.emulate or (all_cuda if cuda_graphs is None else bool(cuda_graphs))
        if self.use_graphs and not (all_cuda or self.emulate):
            raise ValueError("cuda_graphs=True needs every specialist and the gate on CUDA devices")
        self.pipeline = self.use_graphs if pipeline is None else bool(pipeline)
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
            raise ValueError(f"bucket={bucket!r}: give a positive number of slots, or None for growing buckets")
        # may be changed between requests (graphs are keyed by their attention length)
        self.bucket = bucket if self.use_graphs else 1
        self.max_batch = max_batch
        self.max_len = int(math.ceil(max_len / (self.bucket or MIN_BUCKET)) * (self.bucket or MIN_BUCKET))
        self.sampler = (
            sampler if sampler != "auto" else ("device" if all_cuda and self.use_graphs else "reference")
        )
        self._weights_arg = weights
        self._groups_arg = groups
        if decode_attention not in ("auto", "bmm", "sdpa"):
            raise ValueError(f"decode_attention={decode_attention!r}: use auto, bmm or sdpa")
        self.decode_attention = decode_attention
        self._build()
        n_dev = len({g.device for g in self.groups})
        self.threads = (n_dev > 1 and not all_cuda) if threads is None else bool(threads)
        self._pool = ThreadPoolExecutor(len(self.groups)) if self.threads and len(self.groups) > 1 else None
        self._states: dict[int, _BatchState] = {}
        self._graph_pools: dict = {}

    # ------------------------------------------------------------------ construction
    def _partition(self) -> list[list[int]]:
        specs = self.model.specialists
        if self._groups_arg is not None:
            parts = [list(p) for p in self._groups_arg]
            flat = sorted(i for p in parts for i in p)
            if flat != list(range(len(specs))):
                raise ValueError(f"groups {parts} must partition the specialist indices 0..{len(specs) - 1}")
            return parts
        by_model: dict = {}
        for k, s in enumerate(specs):
            by_model.setdefault((id(s.model), str(self.devices[k])), []).append(k)
        parts, singles = [], {}
        for ks in by_model.values():
            if len(ks) > 1 or sum(s.model is specs[ks[0]].model for s in specs) > 1:
                parts.append(ks)  # a shared base (LoRA specialists)
            else:
                k = ks[0]
                key = (describe(specs[k].model, self.max_len), str(self.devices[k]))
                singles.setdefault(key, []).append(k)
        parts += list(singles.values())
        return sorted(parts, key=min)

    def _weights_mode(self, ks: list[int]) -> str:
        if self._weights_arg != "auto":
            return self._weights_arg
        dev = self.devices[ks[0]]
        models = {id(self.model.specialists[k].model): self.model.specialists[k].model for k in ks}
        if any(p.device != dev for m in models.values() for p in m.parameters()):
            return "copy"
        if not _is_cuda(dev):
            return "copy"
        need = sum(
            p.numel() * p.element_size()
            for m in models.values()
            for n, p in m.named_parameters()
            if "lora_" not in n
        )
        free, _ = torch.cuda.mem_get_info(dev)
        return "copy" if need * 1.15 + (2 << 30) < free else "refs"

    def _build(self) -> None:
        specs = self.model.specialists
        for s in specs:
            describe(s.model, self.max_len)
            if not s._tuner_layers and (s.adapter is not None or any(_is_lora(m) for m in s.model.modules())):
                # the reference would run whatever adapter PEFT has active: not a state we can mirror
                raise Unsupported(
                    f"specialist {s.domain!r}: LoRA layers whose adapter state it does not manage"
                )
        self.groups: list[Group] = []
        self.members: list[list[int]] = []
        for ks in self._partition():
            devs = {str(self.devices[k]) for k in ks}
            if len(devs) != 1:
                raise ValueError(f"group {ks} spans devices {sorted(devs)}")
            mode = self._weights_mode(ks)
            g = Group(
                [(specs[k].model, specs[k].adapter) for k in ks],
                self.devices[ks[0]],
                mode,
                self.max_batch,
                self.max_len,
                attention=self.decode_attention if self.decode_attention != "auto" else (
                    "sdpa" if _is_cuda(self.devices[ks[0]]) else "bmm"),
                lora_precision=self.lora_precision,
                cpu_matmul=self.cpu_matmul,
                kv_cache_dtype=self.kv_cache_dtype,
            )
            self.groups.append(g)
            self.members.append(ks)
        self.slot = {k: (gi, j) for gi, ks in enumerate(self.members) for j, k in enumerate(ks)}
        # shared groups (one base + adapters) whose members' logits are mixed as hidden states before one LM head
        # (see _fuse); only on the fusing device, where the gate weights are
        self.head_after_mix = [
            g for g in self.groups
            if self.mix_before_head and g.shared and g.G > 1 and g.device == self.fuse_device
        ]
        for g in self.groups:
            g.mixed_head = g in self.head_after_mix
        self._mix_groups = [  # (group, its index, its members as an index tensor: no host copy in a graph)
            (g, gi, torch.tensor(self.members[gi], device=self.fuse_device))
            for gi, g in enumerate(self.groups) if g in self.head_after_mix
        ]
        self.runner_devices = {g.device for g in self.groups}
        self._fingerprint = self._current_fingerprint()
        self._states = {}

    def _current_fingerprint(self):
        seen, fp = set(), []
        for s in self.model.specialists:
            if id(s.model) in seen:
                continue
            seen.add(id(s.model))
            fp += [(p.data_ptr(), p._version) for p in s.model.parameters()]
        return tuple(fp)

    def refresh(self) -> None:
        """Re-read the specialists' weights (done automatically when they changed in place or moved)."""
        self._build()

    @property
    def weight_modes(self) -> list[str]:
        return ["copy" if g.copy else "refs" for g in self.groups]

    def describe_groups(self) -> list[dict]:
        return [
            {
                "specialists": [self.model.specialists[k].domain for k in ks],
                "device": str(g.device),
                "shared_base": g.shared,
                "weights": "copy" if g.copy else "refs",
            }
            for ks, g in zip(self.members, self.groups)
        ]

    def cpu_matmul_choices(self) -> list[dict]:
        """Per group: the matmul forms chosen (and the ms measured) per batch size so far (cpu_matmul="auto")."""
        return [
            {"specialists": [self.model.specialists[k].domain for k in ks], "by_batch": dict(g.cpu_forms)}
            for ks, g in zip(self.members, self.groups)
        ]

    # ------------------------------------------------------------------ one step, in pieces
    def _run_groups(self, st: _BatchState, gis: list[int], t_attn: list[int]) -> None:
        """Decode one token in the given groups (all on one device) and advance their positions."""
        for gi in gis:
            g = self.groups[gi]
            h, lg = g.decode(st.tok[g.device], st.pos[gi], st.pad[gi], st.cur[gi], t_attn[gi],
                             logits=g not in self.head_after_mix)
            st.hout[gi].copy_(h)
            if lg is not None:
                st.lout[gi].copy_(lg)
            st.pos[gi].add_(1)
            st.cur[gi].add_(1)

    def _fuse(self, st: _BatchState, pick: str) -> None:
        """Gate + fusion (the core's `mix`) and the pick; writes z, w and (unless the host picks) the token."""
        hs, ls = [None] * len(self.slot), [None] * len(self.slot)
        for k, (gi, j) in self.slot.items():
            hs[k] = st.hm[gi][j].unsqueeze(1)  # (B, 1, H)
            ls[k] = None if st.lm[gi] is None else st.lm[gi][j].unsqueeze(1)  # (B, 1, V_k)
        if not self.head_after_mix:
            z, w = self.model.mix(hs, ls)  # (B, 1, V) fp32, (B, 1, N)
            z, w = z[:, 0], w[:, 0]
        else:
            # Members of a shared group have one LM head W, and the fusion is linear in the logits, so their part
            # of the fused logits, sum_j w_j (h_j W), is (sum_j w_j h_j) W: the gate-weighted hidden states (fp32,
            # then the model dtype) go through the head once per prompt instead of once per member — the same
            # sum up to rounding (fp32 greedy tokens identical in tests/modeling/test_fast.py).
            if any(o is not None for o in ls):
                z, w = self.model.mix(hs, ls)
                z = z[:, 0]
            else:
                z, w = None, self.model.gate_weights(hs)
            w = w[:, 0]
            V = self.model.vocab_size
            for g, gi, ix in self._mix_groups:
                wg = w.index_select(1, ix).t().unsqueeze(-1)  # (G, B, 1) the members' gate weights
                hmix = (wg * st.hm[gi].float()).sum(0).to(g.arch.dtype)  # (B, H)
                term = g.head_of_mix(hmix)[:, :V].float()
                z = term if z is None else z + term
        st.z.copy_(z)
        st.w.copy_(w)
        fd = self.fuse_device
        if pick == "greedy":
            st.tok[fd].copy_(z.argmax(-1))
        elif pick == "device":
            st.tok[fd].copy_(device_sample(z, st.temp, st.top_k, st.top_p, st.seed, st.step))
        st.step.add_(1)

    def _to_fuse_device(self, st: _BatchState) -> None:
        for gi, g in enumerate(self.groups):
            if st.hm[gi] is not st.hout[gi]:
                st.hm[gi].copy_(st.hout[gi], non_blocking=True)
                if st.lm[gi] is not None:
                    st.lm[gi].copy_(st.lout[gi], non_blocking=True)

    def _tok_to_runners(self, st: _BatchState) -> None:
        src = st.tok[self.fuse_device]
        for t in st.tok.values():
            if t is not src:
                t.copy_(src, non_blocking=True)

    def _runners(self) -> list[tuple]:
        """[(device, key, [group index])]: one graph per device (per group when emulating with threads, so that the
        multi-device sequence runs on one CPU)."""
        out: dict = {}
        for gi, g in enumerate(self.groups):
            key = (str(g.device), gi) if (self.emulate and self.threads) else (str(g.device),)
            out.setdefault(key, (g.device, key, []))[2].append(gi)
        return list(out.values())

    def _t_attn(self, st: _BatchState) -> list[int]:
        # attend over the filled slots, rounded up to the bucket (one captured graph per bucket)
        return [attention_length(c + 1, self.bucket, self.max_len) for c in st.cur_host]

    def _eager_step(self, st: _BatchState, pick: str) -> None:
        t_attn = self._t_attn(st)
        if self._pool is not None:
            futs = [self._pool.submit(self._run_groups, st, [gi], t_attn) for gi in range(len(self.groups))]
            for f in futs:
                f.result()
        else:
            self._run_groups(st, list(range(len(self.groups))), t_attn)
        self._to_fuse_device(st)
        self._fuse(st, pick)
        self._tok_to_runners(st)
        st.cur_host = [c + 1 for c in st.cur_host]

    def _capture(self, st: _BatchState, key, device, fn) -> torch.cuda.CUDAGraph:
        g = st.graphs.get(key)
        if g is not None:
            return g
        if self.emulate:  # the same warm-up / restore sequence, replayed eagerly
            snap = [t.clone() for t in st.mutable()]
            fn()
            for t, s in zip(st.mutable(), snap):
                t.copy_(s)
            st.graphs[key] = g = _EagerGraph(fn)
            return g
        if device not in self._graph_pools:
            self._graph_pools[device] = torch.cuda.graph_pool_handle()
        snap = [t.clone() for t in st.mutable()]
        cur = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            fn()  # warm-up (lazy inits, cuBLAS workspaces); its state changes are undone below
        cur.wait_stream(side)
        for t, s in zip(st.mutable(), snap):
            t.copy_(s)
        side.wait_stream(cur)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._graph_pools[device], stream=side):
            fn()
        cur.wait_stream(side)
        st.graphs[key] = g
        return g

    def _graph_step(self, st: _BatchState, pick: str) -> None:
        t_attn = self._t_attn(st)
        runners = self._runners()
        fd = self.fuse_device
        if len(runners) == 1 and runners[0][0] == fd:  # the common case: the whole step is one graph
            gis = runners[0][2]

            def whole():
                self._run_groups(st, gis, t_attn)
                self._fuse(st, pick)

            with _on_device(fd):
                self._capture(st, ("all", tuple(t_attn), pick, self._gate_key()), fd, whole).replay()
        else:
            for d, key, gis in runners:  # each device's graph runs concurrently with the others
                with _on_device(d):
                    self._capture(
                        st,
                        key + tuple(t_attn[gi] for gi in gis),
                        d,
                        lambda gis=gis: self._run_groups(st, gis, t_attn),
                    ).replay()
            self._to_fuse_device(st)
            with _on_device(fd):
                self._capture(st, ("fuse", pick, self._gate_key()), fd, lambda: self._fuse(st, pick)).replay()
            self._tok_to_runners(st)
        st.cur_host = [c + 1 for c in st.cur_host]

    def _gate_key(self) -> tuple:
        g = self.model.config.gate  # FusedModel.gate_mode(...) may switch it between requests
        return (g.mode, g.onehot_domain)

    def _step(self, st: _BatchState, pick: str) -> None:
        (self._graph_step if self.use_graphs else self._eager_step)(st, pick)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, st: _BatchState, prompts: Sequence[Aligned], pick: str) -> None:
        B = len(prompts)
        jobs = []
        for gi, (g, ks) in enumerate(zip(self.groups, self.members)):
            T = max(len(p.input_ids[k]) for p in prompts for k in ks)
            ids = torch.zeros((g.G, B, T), dtype=torch.long)
            mask = torch.zeros((g.G, B, T), dtype=torch.long)
            for j, k in enumerate(ks):
                pad_id = self.model.specialists[k].pad_token_id
                ids[j].fill_(pad_id)
                for b, p in enumerate(prompts):
                    seq = p.input_ids[k]
                    ids[j, b, T - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                    mask[j, b, T - len(seq) :] = 1
            lens = mask.sum(-1)  # (G, B)
            st.pos[gi].copy_(lens)  # the next token's position = number of real tokens
            st.pad[gi].copy_((T - lens).t())
            st.cur[gi].fill_(T)
            st.cur_host[gi] = T
            row_T = lens.max(0).values.tolist()  # each row's own length (the longest of its members' prompts)
            # Without CUDA graphs (the CPU) prompts of different lengths are prefilled one row at a time when the
            # left padding would add more than a tenth to the work: compute there scales with padded tokens (the
            # embedded default's code prompts, 108-289 tokens, padded to 289: 1.8x the real work)
            per_row = not self.use_graphs and B > 1 and B * T > 1.1 * sum(row_T)
            if per_row:  # (rows, first slot) pieces of the batch, each prefilled without its padding
                parts = [(ids[:, b : b + 1, T - tb :], mask[:, b : b + 1, T - tb :], b, T - tb)
                         for b, tb in enumerate(row_T)]
            else:
                parts = [(ids, mask, 0, 0)]
            jobs.append((gi, [(i.to(g.device, non_blocking=True), m.to(g.device, non_blocking=True), r, s)
                              for i, m, r, s in parts]))

        def run(job):  # one group's pieces, in order
            gi, parts = job
            for ids, mask, row0, slot0 in parts:
                g = self.groups[gi]
                h, lg = g.prefill(ids, mask, row0, slot0, logits=g not in self.head_after_mix)
                n = ids.shape[1]
                st.hout[gi][:, row0 : row0 + n].copy_(h)
                if lg is not None:
                    st.lout[gi][:, row0 : row0 + n].copy_(lg)

        if self._pool is not None:
            list(self._pool.map(run, jobs))
        else:
            for j in jobs:
                run(j)
        st.step.zero_()
        self._to_fuse_device(st)
        self._fuse(st, pick)
        self._tok_to_runners(st)

    # ------------------------------------------------------------------ generation
    def _state(self, B: int) -> _BatchState:
        if self._current_fingerprint() != self._fingerprint:
            log.info("specialist weights changed since the fast decoder was built: re-reading them")
            self._build()
        if B not in self._states:
            self._states[B] = _BatchState(self, B)
        return self._states[B]

    def capacity_error(self, prompts: Sequence[Aligned], new_tokens: int) -> str | None:
        """Why this request does not fit the decoder's static buffers, or None."""
        if len(prompts) > self.max_batch:
            return f"batch {len(prompts)} > max_batch {self.max_batch}"
        for ks in self.members:
            T = max(len(p.input_ids[k]) for p in prompts for k in ks)
            if T + new_tokens - 1 > self.max_len:
                return f"{T} prompt slots + {new_tokens} new tokens > max_len {self.max_len}"
        return None

    @torch.no_grad()
    def stream(
        self,
        prompts: Sequence[Aligned],
        params: SamplingParams | Sequence[SamplingParams] = _GREEDY,
        *,
        return_weights: bool = False,
        should_stop=None,
    ) -> Iterator[list[TokenEvent]]:
        """Same contract and events as `generation.stream` (stop tokens and strings, lengths, aborts, weights)."""
        model = self.model
        for p in prompts:
            for s, n in zip(model.specialists, p.lengths):
                if n == 0:
                    raise ValueError(
                        f"a prompt is empty for specialist {s.domain!r}; give it at least one token"
                    )
        plist, rows, gens, row_limit = prepare_rows(model, prompts, params)  # the reference's setup, shared
        limit = max(row_limit)
        err = self.capacity_error(prompts, limit)
        if err:
            raise ValueError(f"request does not fit this FastFusedDecoder: {err}")
        domains = model.domains
        B = len(prompts)
        st = self._state(B)
        greedy = all(p.temperature == 0 for p in plist)
        pick = "greedy" if greedy else ("host" if self.sampler == "reference" else "device")
        if pick == "device":
            fd = self.fuse_device
            st.temp.copy_(torch.tensor([p.temperature for p in plist], device=fd))
            st.top_k.copy_(torch.tensor([p.top_k for p in plist], device=fd))
            st.top_p.copy_(torch.tensor([p.top_p for p in plist], device=fd))
            st.seed.copy_(
                torch.tensor(
                    [(g.initial_seed() & _M32) ^ ((g.initial_seed() >> 32) & _M32) for g in gens], device=fd
                )
            )

        pipelined = self.pipeline and pick != "host"

        live = list(range(B))  # the request row of each of the state's rows (rows leave it when compacted)

        def host_pick():
            # the reference's own pick, with each row's own generator
            ids = _pick(st.z, [plist[b] for b in live], [gens[b] for b in live])
            st.tok[self.fuse_device].copy_(ids)
            self._tok_to_runners(st)

        def enqueue_copy(i):  # device token (and weights) of step i -> pinned host slot i % 2
            st.tok_host[i % 2].copy_(st.tok[self.fuse_device], non_blocking=True)
            if return_weights:
                st.w_host[i % 2].copy_(st.w, non_blocking=True)
            if st.events is not None:
                st.events[i % 2].record()

        self._prefill(st, prompts, pick)
        if pick == "host":
            host_pick()
        if pipelined:
            enqueue_copy(0)
        for step in range(limit):
            if pipelined:
                if step + 1 < limit:
                    self._step(st, pick)  # step+1 is computed while the host handles token `step`
                    enqueue_copy(step + 1)
                if st.events is not None:
                    st.events[step % 2].synchronize()  # the one host sync of this step
                next_ids = st.tok_host[step % 2].tolist()
                wts = st.w_host[step % 2] if return_weights else None
            else:
                next_ids = st.tok[self.fuse_device].tolist()
                wts = st.w.cpu() if return_weights else None
            events = []
            for i, b in enumerate(live):
                row = rows[b]
                if row.done:
                    continue
                tid = int(next_ids[i])
                is_stop = tid in model.stop_token_ids and not plist[b].ignore_eos
                w = {d: float(wts[i, k]) for k, d in enumerate(domains)} if return_weights else None
                text = row.push(tid, is_stop)
                if not row.done and len(row.ids) >= row_limit[b]:
                    text += row.finish("length")
                if not row.done and should_stop is not None and should_stop(b):
                    text += row.finish("abort")
                events.append(TokenEvent(b, tid, text, w, row.finish_reason if row.done else None, is_stop))
            if events:
                yield events
            if all(r.done for r in rows):
                return
            if not pipelined:
                keep = [i for i, b in enumerate(live) if not rows[b].done]
                if not self.use_graphs and len(live) - len(keep) >= max(1, len(live) // 8) and limit - step > 8:
                    st = self._compact(st, keep)
                    live = [live[i] for i in keep]
                self._step(st, pick)
                if pick == "host":
                    host_pick()

    def _compact(self, st: _BatchState, keep: list[int]) -> _BatchState:
        """The state of a smaller batch holding only rows `keep` (ascending) of `st`, their cache rows moved to the
        front. Without CUDA graphs a step costs about its rows (the CPU), so rows that finished early stop costing
        (an evaluation batch's replies end at very different lengths)."""
        n = len(keep)
        new = self._states.get(n)
        if new is None:
            new = self._states[n] = _BatchState(self, n)
        for gi, g in enumerate(self.groups):
            ix = torch.tensor(keep, device=g.device)
            c = st.cur_host[gi]  # the filled cache slots
            for cache in g.k_cache + g.v_cache:
                cache[:n, :, :, :c] = cache[ix, :, :, :c]  # the gather copies first: overlapping rows are safe
            new.pos[gi].copy_(st.pos[gi][:, ix])
            new.pad[gi].copy_(st.pad[gi][ix])
            new.cur[gi].copy_(st.cur[gi])
        new.cur_host = list(st.cur_host)
        for d, t in st.tok.items():
            new.tok[d].copy_(t[torch.tensor(keep, device=d)])
        fd = self.fuse_device
        ix = torch.tensor(keep, device=fd)
        for name in ("temp", "top_k", "top_p", "seed"):
            getattr(new, name).copy_(getattr(st, name)[ix])
        new.step.copy_(st.step)
        return new

    # ------------------------------------------------------------------ teacher-forced steps (parity checks)
    @torch.no_grad()
    def start_decoding(self, prompts: Sequence[Aligned]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `FusedModel.start_decoding`: prefill; return (fused logits (B, V), gate weights (B, N)) — copies."""
        err = self.capacity_error(prompts, 1)
        if err:
            raise ValueError(f"request does not fit this FastFusedDecoder: {err}")
        self._forced = st = self._state(len(prompts))
        self._prefill(st, prompts, "host")
        return st.z.clone(), st.w.clone()

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `FusedModel.decode_step`: append `tokens` (B,) and return the next (logits, weights)."""
        st = self._forced
        if max(st.cur_host) >= self.max_len:
            raise ValueError(f"max_len {self.max_len} reached")
        st.tok[self.fuse_device].copy_(tokens)
        self._tok_to_runners(st)
        self._step(st, "host")
        return st.z.clone(), st.w.clone()

    def generate(
        self,
        prompts: Sequence[Aligned],
        params: SamplingParams | Sequence[SamplingParams] = _GREEDY,
        return_weights: bool = False,
    ) -> list[Completion]:
        """Same as `generation.generate`: one `Completion` (text, token_ids, finish_reason, …) per prompt."""
        return collect(self.stream(prompts, params, return_weights=return_weights), prompts)

    def generate_ids(self, prompts: Sequence[Aligned], params: SamplingParams = _GREEDY) -> list[list[int]]:
        return [c.token_ids for c in self.generate(prompts, params)]


class _EagerGraph:
    """Stands in for a captured graph in `cuda_graphs="emulate"` mode."""

    def __init__(self, fn):
        self.replay = fn


def _on_device(d):
    import contextlib

    return torch.cuda.device(d) if _is_cuda(d) else contextlib.nullcontext()




# --------------------------------------------------------------------------------------------- automatic choice

# The cached decoder lives on the model itself (it refers back to the model, so a weak-key table would never free
# either); the model and its decoder go away together.
_ATTR, _NO = "_ultrafuser_fast_decoder", "_ultrafuser_fast_unsupported"


def fast_decoder_for(model, batch: int, length: int) -> FastFusedDecoder | None:
    """A cached `FastFusedDecoder` for `model` big enough for (batch, length), or None where the fast path does
    not support the model (the reason is logged once at INFO and kept in `model._ultrafuser_fast_unsupported`)."""
    if model.__dict__.get(_NO):
        return None
    dec = model.__dict__.get(_ATTR)
    if dec is not None and dec.max_batch >= batch and dec.max_len >= length:
        return dec
    mb = max(batch, dec.max_batch if dec else 1)
    ml = max(int(math.ceil(length / 256) * 256), dec.max_len if dec else 0)
    model.__dict__.pop(_ATTR, None)
    dec = None  # free the old static caches before allocating bigger ones
    try:
        dec = FastFusedDecoder(model, max_batch=mb, max_len=ml)
    except Unsupported as e:
        log.info("fast decoding unavailable for this fused model (%s); using the reference path", e)
        model.__dict__[_NO] = str(e)
        return None
    model.__dict__[_ATTR] = dec
    return dec


def release(model) -> None:
    """Drop the cached fast decoders of `model` (static caches and weight copies), one-hot views' included."""
    model.__dict__.pop(_ATTR, None)
    model.__dict__.pop(_NO, None)
    model.__dict__.pop("_ultrafuser_onehot_views", None)


def reference_stream(model, prompts, params=_GREEDY, **kw) -> Iterator[list[TokenEvent]]:
    """The core's straightforward path (`generation.stream(fast=False)`), never the fast one."""
    from ultrafuser.modeling import generation

    return generation.stream(model, prompts, params, fast=False, **kw)


def maybe_stream(
    model, prompts: Sequence[Aligned], params=_GREEDY, *, return_weights: bool = False, should_stop=None
) -> Iterator[list[TokenEvent]] | None:
    """The fast path's event iterator when it supports this model and request, else None."""
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if not prompts or any(m.training for m in model.models):
        return None  # specialists in training mode (dropout): the reference path
    if model.config.gate.mode == "onehot":
        if return_weights:
            return None  # the reference reports the one-hot weights of every specialist
        # a one-hot baseline is that specialist alone: decode it through a one-specialist view of the model
        view = _onehot_view(model)
        k = view._ultrafuser_onehot_index
        only = [_only(p, k) for p in prompts]
        if row_limits(view, only, plist) != row_limits(model, prompts, plist):
            return None  # the fused context (the smallest specialist's) binds: the reference keeps its limit
        model, prompts = view, only
    if any(n == 0 for p in prompts for n in p.lengths):
        return None  # empty prompts: whatever the reference path does with them
    new = max(row_limits(model, prompts, plist))
    if new <= 0:
        return None  # the reference path raises PromptTooLongError with its message
    length = max(max(p.lengths) for p in prompts) + new
    dec = fast_decoder_for(model, len(prompts), length)
    if dec is None or dec.capacity_error(prompts, new):
        return None
    return dec.stream(prompts, params, return_weights=return_weights, should_stop=should_stop)


def _onehot_view(model):
    """A one-specialist FusedModel sharing `model`'s specialist (same modules, no copies), cached per domain;
    its fast decoder is cached on it like any model's."""
    from ultrafuser.config import GateConfig
    from ultrafuser.modeling.fused import FusedModel

    dom = model.config.gate.onehot_domain
    views = model.__dict__.setdefault("_ultrafuser_onehot_views", {})
    if dom not in views:
        k = model.domains.index(dom)
        cfg = model.config.model_copy(update={"specialists": [model.config.specialists[k]],
                                              "gate": GateConfig(mode="uniform"), "response_tokenizer": 0})
        view = FusedModel(cfg, [model.specialists[k]], model.vocab_size, model.eos_token_id)
        view.stop_token_ids = model.stop_token_ids
        view.__dict__["_ultrafuser_onehot_index"] = k
        views[dom] = view
    return views[dom]


def _only(p: Aligned, k: int) -> Aligned:
    return Aligned(input_ids=p.input_ids[k : k + 1], target_positions=p.target_positions[k : k + 1],
                   targets=p.targets)


def stream(model, prompts: Sequence[Aligned], params=_GREEDY, **kw) -> Iterator[list[TokenEvent]]:
    """`generation.stream` (which takes the fast path by itself where supported; `fast=True` insists on it)."""
    from ultrafuser.modeling import generation

    return generation.stream(model, prompts, params, **kw)


def generate(model, prompts: Sequence[Aligned], params=_GREEDY, return_weights: bool = False,
             fast: bool | None = None) -> list[Completion]:
    return collect(stream(model, prompts, params, return_weights=return_weights, fast=fast), prompts)
