"""Stage 1 cache of the frozen specialists' outputs (`stage1.cache_hidden_states`).

In stage 1 the specialists do not change, so what the gate needs from them for an example is fixed: at
each reply position, each specialist's final hidden state h_k (J, H_k) and its logits o_k (J, V_k). The
logits are the big part (V = 49,152 for SmolLM2, 32,000 for Llama-2: one example of 500 reply tokens
and 3 specialists is ~290 MB in fp32), so they are not stored. The cache keeps only the hidden states
(the vectors the LM head reads, ~3.5 MB per such example for H = 576) and recomputes the logits with each
specialist's own LM head, `o_k = head_k(h_k)`, which is exactly how the model computes them (checked on
the first example: a model whose logits are post-processed after the head, e.g. soft-capped, is refused).
What is saved is each specialist's transformer body, run once per distinct example instead of once per
draw: the speed-up is about draws / distinct examples on the body's share of the compute, so it helps
when stage 1 revisits examples (small data, many steps) and saves nothing when every example is drawn
once.

Each entry is computed for one example alone (batch of 1, no padding), so its value does not depend on
which other examples shared its micro-batch: a resumed run recomputes exactly the same values. Losses
with the cache equal those without it up to float rounding (padding and batch shape change the
summation order; the test allows 1e-5 relative).

The cache lives in memory (on the CPU), per process; its size is estimated before stage 1 from the
exact examples stage 1 will draw and refused above `stage1.cache_max_gb`.
"""

from __future__ import annotations

import torch

from ultrafuser.config import ConfigError


class HiddenCache:
    def __init__(self, model, autocast_ctx):
        self.model = model
        self.autocast = autocast_ctx
        self.store: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0
        self._checked = False

    @staticmethod
    def estimate_bytes(model, n_targets: list[int]) -> int:
        elem = [s.model.get_output_embeddings().weight.element_size() for s in model.specialists]
        per_token = sum(s.hidden_size * e for s, e in zip(model.specialists, elem))
        return per_token * sum(n_targets)

    def _compute(self, example) -> list[torch.Tensor]:
        m = self.model
        batch = m.collate([example.aligned()]).to([s.device for s in m.specialists])
        with torch.no_grad(), self.autocast():
            hiddens, logits = m.run_specialists(batch)
            if not self._checked:
                for s, h, o in zip(m.specialists, hiddens, logits):
                    again = self.head(s, h)
                    if again.shape != o.shape or not torch.allclose(again.float(), o.float(), rtol=1e-4, atol=1e-4):
                        raise ConfigError(
                            f"stage1.cache_hidden_states: specialist {s.domain!r} post-processes its logits after the "
                            "LM head, so they cannot be recomputed from cached hidden states; set "
                            "stage1.cache_hidden_states=false"
                        )
                self._checked = True
        return [h[0].detach().to("cpu") for h in hiddens]  # N × (J, H_k)

    @staticmethod
    def head(spec, h: torch.Tensor) -> torch.Tensor:
        with spec.active():
            return spec.model.get_output_embeddings()(h)

    def hiddens(self, keys: list[tuple[str, int]], examples: list) -> list[torch.Tensor]:
        """Padded hidden states N × (B, J, H_k) for a micro-batch (zeros past each example's replies)."""
        rows = []
        for key, ex in zip(keys, examples):
            got = self.store.get(key)
            if got is None:
                got = self.store[key] = self._compute(ex)
                self.misses += 1
            else:
                self.hits += 1
            rows.append(got)
        J = max(r[0].shape[0] for r in rows)
        out = []
        for k, s in enumerate(self.model.specialists):
            h = torch.zeros((len(rows), J, rows[0][k].shape[-1]), dtype=rows[0][k].dtype)  # (B, J, H_k)
            for b, r in enumerate(rows):
                h[b, : r[k].shape[0]] = r[k]
            out.append(h.to(s.device))
        return out

    def logits(self, hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
        """N × (B, J, V_k) from cached hidden states, through each specialist's LM head."""
        return [self.head(s, h) for s, h in zip(self.model.specialists, hiddens)]
