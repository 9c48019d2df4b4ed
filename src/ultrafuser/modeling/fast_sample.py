"""In-graph sampling for the fast decoder: a pick that needs no host sync and can be captured in a CUDA graph.

Temperature → top-k → top-p with the semantics of transformers' logits warpers (the reference path's `_pick`
applies the same three), then a Gumbel-max draw whose noise is a counter-based hash of (row seed, step, token id):
seeded, reproducible, and independent of which other rows share the batch. It is a different random stream than
the reference's per-row `torch.Generator`, so sampled tokens differ from the reference path's (greedy ones do not).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors (values stay below 2**63, so no overflow on any backend)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x68E31DA4) & _M32
    return x ^ (x >> 15)


def _uniform(seed32: torch.Tensor, step: torch.Tensor, V: int) -> torch.Tensor:
    """u (B, V) in (0, 1), a pure function of (row seed, step, token id): batch-independent and graph-safe."""
    v = torch.arange(V, device=seed32.device)
    h = _hash32(_hash32(seed32 ^ 0x2545F491) ^ step)  # (B,)
    h = _hash32((h.unsqueeze(1) + v * 0x9E3779B) ^ 0x632BE59B)  # (B, V)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def device_sample(z, temp, top_k, top_p, seed32, step) -> torch.Tensor:
    """Pick per row from fused logits z (B, V): greedy where temp == 0, else temperature → top-k → top-p
    (as transformers' warpers) and a Gumbel-max draw. temp/top_p (B,) float, top_k (B,) long (0 = off),
    seed32 (B,) long, step (1,) long. No host sync; capturable in a CUDA graph."""
    V = z.shape[1]
    greedy = z.argmax(-1)
    s = z / torch.where(temp > 0, temp, torch.ones_like(temp)).unsqueeze(1)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    kth = s.sort(-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))  # (B, 1)
    s = s.masked_fill(s < kth, float("-inf"))
    sa, idx = s.sort(-1)  # ascending, as TopPLogitsWarper
    remove = sa.softmax(-1).cumsum(-1) <= (1 - top_p).unsqueeze(1)
    remove[:, -1] = False
    s = s.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    u = _uniform(seed32, step, V)
    sampled = (s - torch.log(-torch.log(u))).argmax(-1)
    return torch.where(temp > 0, sampled, greedy)
