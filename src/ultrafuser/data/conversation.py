"""Aligned inputs (paper §2.4): one conversation, N token sequences, one shared set of reply tokens.

Every specialist sees the conversation in its own template, so the prompts differ in length and content;
the assistant replies are tokenised **once** (with the response tokenizer, + the shared end-of-reply id)
and spliced into every specialist's sequence. So specialist k's sequence is

    P_k^1 ‖ R^1 ‖ P_k^2 ‖ R^2 ‖ … ‖ P_k^T ‖ R^T

and all specialists predict exactly the same reply ids. `target_positions[k][j]` is the index in
specialist k's sequence whose next-token prediction is `targets[j]`: that is what the fused model gathers
to mix the specialists' logits for the same target. Labels cover exactly the reply tokens (and their
end-of-reply ids); prompts are never trained on.

This is the one public function that training, evaluation and serving use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ultrafuser.modeling.templates import PromptRenderer

IGNORE_INDEX = -100


@dataclass
class Aligned:
    """One conversation aligned across specialists (plain Python lists; tensors are made by `collate`)."""

    input_ids: list[list[int]]  # per specialist: prompt segments and replies
    target_positions: list[list[int]]  # per specialist: where each target is predicted
    targets: list[int]  # shared reply ids (every reply + end-of-reply id), empty for a generation prompt
    reply_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each reply in targets

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def labels(self, k: int) -> list[int]:
        """Hugging Face-style labels for specialist k (same length as its input ids, -100 off replies)."""
        lab = [IGNORE_INDEX] * len(self.input_ids[k])
        for pos, t in zip(self.target_positions[k], self.targets):
            lab[pos + 1] = t
        return lab


def _encode_prompt(renderer: PromptRenderer, text: str, first: bool) -> list[int]:
    tok = renderer.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if first and tok.bos_token_id is not None and not text.startswith(tok.bos_token or "\0"):
        # Add BOS only where this tokenizer adds it by itself (Llama yes, GPT-2/ChatML models no).
        probe = tok("a", add_special_tokens=True)["input_ids"]
        if probe and probe[0] == tok.bos_token_id:
            ids = [tok.bos_token_id] + ids
    return ids


def align_conversation(
    messages: list[dict],
    renderers: Sequence[PromptRenderer],
    response_tokenizer,
    eos_token_id: int,
) -> Aligned:
    """Align a conversation across specialists.

    `messages` ends with an assistant reply (training/evaluation: all replies become targets) or with a
    user message (generation: the sequences end where the next reply starts; `targets` is empty).
    """
    per_spec_segments = [r.segments(messages) for r in renderers]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    reply_ids = [response_tokenizer(r, add_special_tokens=False)["input_ids"] + [eos_token_id] for r in replies]
    targets: list[int] = [t for r in reply_ids for t in r]
    spans, start = [], 0
    for r in reply_ids:
        spans.append((start, start + len(r)))
        start += len(r)

    input_ids, positions = [], []
    for renderer, segs in zip(renderers, per_spec_segments):
        ids: list[int] = []
        pos: list[int] = []
        for t, seg in enumerate(segs):
            ids += _encode_prompt(renderer, seg, first=(t == 0))
            if t < len(reply_ids):
                # the position *before* each reply token predicts it
                pos += range(len(ids) - 1, len(ids) - 1 + len(reply_ids[t]))
                ids += reply_ids[t]
        if len(ids) == 0:
            raise ValueError("a specialist's rendered prompt is empty")
        input_ids.append(ids)
        positions.append(pos)
    return Aligned(input_ids=input_ids, target_positions=positions, targets=targets, reply_spans=spans)


@dataclass
class FusedBatch:
    """A batch of aligned conversations as tensors, one set per specialist (shapes in comments)."""

    input_ids: list[torch.Tensor]  # N × (B, L_k)
    attention_mask: list[torch.Tensor]  # N × (B, L_k)
    position_ids: list[torch.Tensor]  # N × (B, L_k)
    gather_index: list[torch.Tensor]  # N × (B, J): positions whose outputs are mixed
    labels: torch.Tensor | None  # (B, J) shared targets, -100 on padding (None for generation)

    def to(self, devices: Sequence) -> FusedBatch:
        return FusedBatch(
            input_ids=[x.to(d) for x, d in zip(self.input_ids, devices)],
            attention_mask=[x.to(d) for x, d in zip(self.attention_mask, devices)],
            position_ids=[x.to(d) for x, d in zip(self.position_ids, devices)],
            gather_index=[x.to(d) for x, d in zip(self.gather_index, devices)],
            labels=None if self.labels is None else self.labels.to(devices[0]),
        )


def collate(examples: Sequence[Aligned], pad_token_ids: Sequence[int], padding_side: str = "right") -> FusedBatch:
    """Pad aligned examples into a `FusedBatch`.

    Right padding for training (targets are gathered by position); left padding for generation, where
    every row's last position predicts its next token.
    """
    import torch

    n = len(examples[0].input_ids)
    B = len(examples)
    ids_out, mask_out, pos_out, gather_out = [], [], [], []
    J = max((len(e.targets) for e in examples), default=0)
    for k in range(n):
        L = max(len(e.input_ids[k]) for e in examples)
        ids = torch.full((B, L), pad_token_ids[k], dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        gather = torch.zeros((B, max(J, 1)), dtype=torch.long)
        for b, e in enumerate(examples):
            seq = e.input_ids[k]
            off = 0 if padding_side == "right" else L - len(seq)
            ids[b, off : off + len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, off : off + len(seq)] = 1
            if e.targets:
                gather[b, : len(e.targets)] = torch.tensor(e.target_positions[k], dtype=torch.long) + off
            else:
                gather[b, 0] = L - 1 if padding_side == "left" else len(seq) - 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L) positions that ignore left padding
        ids_out.append(ids)
        mask_out.append(mask)
        pos_out.append(pos)
        gather_out.append(gather if J else gather[:, :1])
    labels = None
    if J:
        labels = torch.full((B, J), IGNORE_INDEX, dtype=torch.long)
        for b, e in enumerate(examples):
            labels[b, : len(e.targets)] = torch.tensor(e.targets, dtype=torch.long)
    return FusedBatch(ids_out, mask_out, pos_out, gather_out, labels)
