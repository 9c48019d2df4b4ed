"""Balanced sampling (paper §2.3): every optimizer step holds exactly `n` examples from each domain.

Each domain is walked in its own seeded random order, without repeats, until it is exhausted; then it is
re-walked in a fresh order (its *epoch* goes up, and the caller logs it). A small domain is therefore
re-walked more often than a large one, which is what "balanced" asks for.

A step never holds the same example twice: when a step crosses the end of a domain's walk, the examples
already taken from the old walk's tail are moved to the end of the new walk (they are `deferred`), so the
new walk still visits every example exactly once. The walk for (seed, domain, epoch, deferred) is a pure
function, so the whole sampler state is four small JSON values per domain:

    {"seed": 0, "domains": {"code": {"epoch": 2, "cursor": 17, "deferred": [4, 9]}, ...}}

Gradient accumulation and multiple processes only *split* a step (`plan_micro_batches`), they never change
which examples it holds: with P processes each process takes `n / P` of every domain's `n` (so `n` is the
global per-domain count, as in the paper's Algorithm 1), and cuts its share into micro-batches.

No torch here; numpy only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ultrafuser.config import ConfigError


class SamplerError(ConfigError):
    """The sampler cannot produce the asked-for steps; the message names the fix."""


@dataclass
class StepSample:
    """One optimizer step's examples: domain -> indices into that domain's examples (n each)."""

    indices: dict[str, list[int]]
    rewalked: list[str] = field(default_factory=list)  # domains whose walk restarted during this step


def _domain_key(domain: str) -> int:
    # A stable integer per domain name (Python's hash() is salted per process).
    return int.from_bytes(hashlib.sha256(domain.encode("utf-8")).digest()[:8], "little")


class BalancedSampler:
    """`sizes`: domain -> number of examples, in domain order. `seed`: the run's seed."""

    def __init__(self, sizes: Mapping[str, int], seed: int):
        if not sizes:
            raise SamplerError("the balanced sampler needs at least one domain with examples")
        empty = [d for d, n in sizes.items() if n <= 0]
        if empty:
            raise SamplerError(
                f"domain(s) {empty} have no training examples; add records with these domains or remove them "
                "from data.domains"
            )
        self.sizes = dict(sizes)
        self.seed = int(seed)
        self._state = {d: {"epoch": 0, "cursor": 0, "deferred": []} for d in self.sizes}
        self._orders: dict[str, tuple[tuple, np.ndarray]] = {}

    @property
    def domains(self) -> list[str]:
        return list(self.sizes)

    # ------------------------------------------------------------------ checks
    def check(self, n: int, where: str = "per_domain") -> None:
        """Refuse an `n` that cannot be served: a step would have to hold an example twice."""
        if n < 1:
            raise SamplerError(f"{where}={n} must be at least 1")
        small = {d: s for d, s in self.sizes.items() if s < n}
        if small:
            names = ", ".join(f"{d!r} has {s}" for d, s in small.items())
            raise SamplerError(
                f"{where}={n} examples per domain per step, but {names}: one step cannot hold {n} different "
                f"examples of a domain that has fewer (re-walking happens between steps, never inside one). "
                f"Lower {where} to at most {min(small.values())} or add data to the small domain(s)."
            )

    # ------------------------------------------------------------------ walking
    def order(self, domain: str) -> np.ndarray:
        """The current walk of `domain`: a permutation of range(size)."""
        st = self._state[domain]
        key = (st["epoch"], tuple(st["deferred"]))
        cached = self._orders.get(domain)
        if cached is not None and cached[0] == key:
            return cached[1]
        rng = np.random.default_rng([self.seed, _domain_key(domain), st["epoch"]])
        perm = rng.permutation(self.sizes[domain])
        if st["deferred"]:
            deferred = np.asarray(st["deferred"], dtype=perm.dtype)
            perm = np.concatenate([perm[~np.isin(perm, deferred)], deferred])
        self._orders[domain] = (key, perm)
        return perm

    def next_step(self, n: int) -> StepSample:
        """Take the next `n` examples of every domain (advances the state)."""
        self.check(n)
        out: dict[str, list[int]] = {}
        rewalked: list[str] = []
        for d in self.sizes:
            st = self._state[d]
            walk = self.order(d)
            take = walk[st["cursor"] : st["cursor"] + n].tolist()
            st["cursor"] += len(take)
            if len(take) < n:  # the walk ran out: start a new one, deferring what this step already holds
                st["epoch"] += 1
                st["deferred"] = list(take)
                st["cursor"] = 0
                rewalked.append(d)
                walk = self.order(d)
                need = n - len(take)
                take += walk[:need].tolist()
                st["cursor"] = need
            out[d] = take
        return StepSample(out, rewalked)

    def peek_steps(self, n: int, steps: int) -> list[StepSample]:
        """The next `steps` steps without advancing the state (e.g. to size a cache)."""
        saved = self.state_dict()
        try:
            return [self.next_step(n) for _ in range(steps)]
        finally:
            self.load_state_dict(saved)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain JSON: seed, and per domain its epoch, cursor and deferred indices."""
        return {
            "seed": self.seed,
            "sizes": dict(self.sizes),
            "domains": {d: {"epoch": s["epoch"], "cursor": s["cursor"], "deferred": list(s["deferred"])}
                        for d, s in self._state.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        unknown = sorted(set(state) - {"seed", "sizes", "domains"})
        if unknown:
            raise SamplerError(f"sampler state has unknown key(s) {unknown}")
        if int(state["seed"]) != self.seed:
            raise SamplerError(f"sampler state was made with seed {state['seed']}, this run uses seed {self.seed}")
        if dict(state.get("sizes", self.sizes)) != self.sizes:
            raise SamplerError(
                f"sampler state was made for domain sizes {dict(state['sizes'])}, the data now has {self.sizes}: "
                "the training data changed"
            )
        doms = state["domains"]
        if set(doms) != set(self.sizes):
            raise SamplerError(f"sampler state has domains {sorted(doms)}, the data has {sorted(self.sizes)}")
        new = {}
        for d, s in doms.items():
            bad = sorted(set(s) - {"epoch", "cursor", "deferred"})
            if bad:
                raise SamplerError(f"sampler state of domain {d!r} has unknown key(s) {bad}")
            epoch, cursor, deferred = int(s["epoch"]), int(s["cursor"]), [int(x) for x in s.get("deferred", [])]
            if epoch < 0 or not 0 <= cursor <= self.sizes[d] or any(not 0 <= x < self.sizes[d] for x in deferred):
                raise SamplerError(f"sampler state of domain {d!r} is out of range: {dict(s)}")
            new[d] = {"epoch": epoch, "cursor": cursor, "deferred": deferred}
        self._state = new


def plan_micro_batches(
    sample: StepSample, rank: int, world_size: int, micro_batch: int
) -> list[list[tuple[str, int]]]:
    """This process's share of a step, cut into micro-batches of at most `micro_batch` (domain, index) pairs.

    Process `rank` takes positions [rank*m, (rank+1)*m) of every domain's n indices (m = n / world_size),
    domain by domain; every process gets the same number of micro-batches.
    """
    out_items: list[tuple[str, int]] = []
    for d, idx in sample.indices.items():
        n = len(idx)
        if n % world_size:
            raise SamplerError(
                f"{n} examples per domain cannot be split evenly over {world_size} processes; "
                f"make per_domain a multiple of {world_size}"
            )
        m = n // world_size
        out_items += [(d, i) for i in idx[rank * m : (rank + 1) * m]]
    return [out_items[i : i + micro_batch] for i in range(0, len(out_items), micro_batch)]


def check_split(per_domain: int, n_domains: int, world_size: int, where: str) -> None:
    if per_domain % world_size:
        raise SamplerError(
            f"{where}={per_domain} is the global per-domain count per step and must split evenly over "
            f"{world_size} processes; use a multiple of {world_size}"
        )


__all__ = ["BalancedSampler", "SamplerError", "StepSample", "check_split", "plan_micro_batches"]
