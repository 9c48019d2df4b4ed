"""The fused model (paper Eq. 1), top to bottom: gate, fused forward, decoding step, save / load.

For every target position i and specialist k:

    h_k = final hidden state of specialist k (the vector its LM head reads)      (B, J, H_k)
    o_k = logits of specialist k, cut to the shared vocabulary                    (B, J, V)
    s_k = g(P_k h_k)        g: shared MLP  d -> 512 -> ReLU -> 1                  (B, J)
    w   = softmax_k(s)                                                            (B, J, N)
    z   = sum_k w_k * o_k   fused logits; next-token distribution softmax(z)      (B, J, V)

`P_k` is the identity when all specialists have the same hidden size; otherwise each specialist gets a
learned linear projection to the largest hidden size (an addition of ours: the paper's specialists
all share one architecture). The gate's last layer starts at zero, so an untrained learned gate is
exactly uniform logit averaging — a safe starting point that the paper's stage 1 then moves away from.

Fixed-weight modes for baselines and ablations use the same code path: `uniform` (plain logit
averaging) and `onehot` (one specialist alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ultrafuser.config import FORMAT_VERSION, FUSED_CONFIG_NAME, GATE_WEIGHTS_NAME, FuseConfig, GateConfig
from ultrafuser.data.conversation import IGNORE_INDEX, Aligned, FusedBatch, align_conversation, collate
from ultrafuser.modeling.specialists import (
    LoadError,
    Specialist,
    check_tokenizers,
    load_specialists,
    new_cache,
    resolve_model_path,
)
from ultrafuser.modeling.templates import validate_messages


class Gate(nn.Module):
    """One MLP shared by all specialists: scores each specialist's hidden state at each position."""

    def __init__(self, hidden_sizes: Sequence[int], inner_size: int = 512):
        super().__init__()
        self.hidden_sizes = list(hidden_sizes)
        d = max(hidden_sizes)
        same = len(set(hidden_sizes)) == 1
        self.proj = None if same else nn.ModuleList(nn.Linear(h, d, bias=False) for h in hidden_sizes)
        self.mlp = nn.Sequential(nn.Linear(d, inner_size), nn.ReLU(), nn.Linear(inner_size, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, hiddens: Sequence[torch.Tensor]) -> torch.Tensor:
        """N × (B, J, H_k) -> scores (B, J, N)."""
        dtype = self.mlp[0].weight.dtype
        dev = self.mlp[0].weight.device
        scores = []
        for k, h in enumerate(hiddens):
            x = h.to(device=dev, dtype=dtype)  # (B, J, H_k)
            if self.proj is not None:
                x = self.proj[k](x)  # (B, J, d)
            scores.append(self.mlp(x).squeeze(-1))  # (B, J)
        return torch.stack(scores, dim=-1)  # (B, J, N)


@dataclass
class FusedOutput:
    logits: torch.Tensor  # (B, J, V) fused logits, fp32
    gate_weights: torch.Tensor  # (B, J, N)
    loss: torch.Tensor | None = None
    specialist_logits: list[torch.Tensor] | None = None  # N × (B, J, V), when asked for


class FusedModel(nn.Module):
    """N specialists + a gate. Follows Hugging Face conventions at the boundary (`logits`, `labels`, `loss`,
    `save_pretrained` / `from_pretrained`)."""

    def __init__(self, config: FuseConfig, specialists: list[Specialist], vocab_size: int, eos_token_id: int):
        super().__init__()
        self.config = config
        self.specialists = specialists
        # Register each distinct underlying model once (LoRA specialists share their base).
        uniq: list[nn.Module] = []
        for s in specialists:
            if not any(s.model is m for m in uniq):
                uniq.append(s.model)
        self.models = nn.ModuleList(uniq)
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.gate = Gate([s.hidden_size for s in specialists], config.gate.inner_size) if config.gate.mode == "learned" else None
        first = specialists[0].device
        if self.gate is not None:
            self.gate.to(first)
        self.stop_token_ids = self._stop_ids()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: FuseConfig, base_dir: str | os.PathLike | None = None) -> FusedModel:
        eos_text = config.eos_token
        specs = load_specialists(config.specialists, base_dir=base_dir, eos_text=None)
        ref = specs[config.response_tokenizer].tokenizer
        eos_text = eos_text or ref.eos_token
        if eos_text is None:
            raise LoadError("the response tokenizer has no eos token; set eos_token in the fused config")
        eos_id = ref.convert_tokens_to_ids(eos_text)
        for s in specs:
            s.renderer.eos_text = eos_text
        vocab = check_tokenizers([s.tokenizer for s in specs], config.domains, [s.vocab_rows for s in specs])
        if eos_id is None or eos_id >= vocab:
            raise LoadError(f"eos token {eos_text!r} (id {eos_id}) is outside the shared vocabulary of {vocab}")
        return cls(config, specs, vocab, eos_id)

    @property
    def domains(self) -> list[str]:
        return self.config.domains

    @property
    def response_tokenizer(self):
        return self.specialists[self.config.response_tokenizer].tokenizer

    @property
    def context_length(self) -> int:
        """The fused context is the smallest specialist's."""
        return min(s.context_length for s in self.specialists)

    def _stop_ids(self) -> set[int]:
        ids = {self.eos_token_id}
        for s in self.specialists:
            gc = getattr(s.model, "generation_config", None)
            e = getattr(gc, "eos_token_id", None) if gc is not None else None
            for x in [e] if isinstance(e, int) else (e or []):
                if x < self.vocab_size:
                    ids.add(int(x))
        return ids

    @contextlib.contextmanager
    def gate_mode(self, spec: str | GateConfig):
        """Temporarily run with another gate: `uniform`, `onehot:DOMAIN` or `learned` (baselines and
        ablations through the same code path, without reloading the specialists)."""
        gate = GateConfig.parse(spec) if isinstance(spec, str) else spec
        if gate.mode == "learned" and self.gate is None:
            raise ValueError("this fused model has no learned gate")
        if gate.mode == "onehot" and gate.onehot_domain not in self.domains:
            raise ValueError(f"onehot domain {gate.onehot_domain!r} is not one of {self.domains}")
        saved = self.config
        self.config = saved.model_copy(update={"gate": gate.model_copy(update={"inner_size": saved.gate.inner_size})})
        try:
            yield self
        finally:
            self.config = saved

    # ------------------------------------------------------------------ inputs
    def align(self, messages: list[dict]) -> Aligned:
        """The core's aligned-input function bound to this model's templates and tokenizers."""
        return align_conversation(
            messages, [s.renderer for s in self.specialists], self.response_tokenizer, self.eos_token_id
        )

    def encode_prompt(self, prompt: list[dict] | str, use_template: bool = True) -> Aligned:
        """A generation prompt for every specialist: chat messages (or a plain user string) rendered with
        each template, or with `use_template=False` the raw text fed to every specialist as-is."""
        if not use_template:
            if not isinstance(prompt, str):
                raise ValueError("use_template=False needs the prompt as plain text")
            ids = [s.tokenizer(prompt, add_special_tokens=True)["input_ids"] for s in self.specialists]
            return Aligned(input_ids=ids, target_positions=[[] for _ in ids], targets=[])
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        validate_messages(prompt, final="user")  # a prompt ends where the next reply starts
        ex = self.align(prompt)
        # earlier replies are context here, not targets: generation reads the last position of each row
        return Aligned(input_ids=ex.input_ids, target_positions=[[] for _ in ex.input_ids], targets=[])

    def collate(self, examples: Sequence[Aligned], padding_side: str = "right") -> FusedBatch:
        return collate(examples, [s.pad_token_id for s in self.specialists], padding_side)

    # ------------------------------------------------------------------ forward
    def gate_weights(self, hiddens: Sequence[torch.Tensor]) -> torch.Tensor:
        """N × (B, J, H_k) -> w (B, J, N), summing to 1 over specialists."""
        present = next(h for h in hiddens if h is not None)
        B, J = present.shape[:2]
        N = len(hiddens)
        dev = self.specialists[0].device
        mode = self.config.gate.mode
        if mode == "learned":
            return torch.softmax(self.gate(hiddens).float(), dim=-1)  # (B, J, N)
        if mode == "uniform":
            return torch.full((B, J, N), 1.0 / N, device=dev)
        w = torch.zeros((B, J, N), device=dev)
        w[..., self.domains.index(self.config.gate.onehot_domain)] = 1.0
        return w

    def mix(self, hiddens: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse: z = sum_k w_k * o_k over the shared vocabulary. Returns (z (B, J, V) fp32, w (B, J, N))."""
        w = self.gate_weights(hiddens)  # (B, J, N)
        dev = w.device
        z = None
        for k, o in enumerate(logits):
            if o is None:  # a specialist a fixed one-hot gate does not use was not run
                continue
            term = w[..., k : k + 1] * o[..., : self.vocab_size].to(dev, torch.float32)  # (B, J, V)
            z = term if z is None else z + term
        return z, w

    def run_specialists(self, batch: FusedBatch, caches=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hiddens, logits = [], []
        only = self.domains.index(self.config.gate.onehot_domain) if self.config.gate.mode == "onehot" else None
        for k, s in enumerate(self.specialists):
            if only is not None and k != only:  # weight 0: its output cannot matter, so it is not computed
                hiddens.append(None)
                logits.append(None)
                continue
            h, o = s.forward(
                batch.input_ids[k],
                batch.attention_mask[k],
                batch.position_ids[k],
                batch.gather_index[k],
                cache=None if caches is None else caches[k],
            )
            hiddens.append(h)  # (B, J, H_k)
            logits.append(o)  # (B, J, V_k)
        return hiddens, logits

    def forward(self, batch: FusedBatch, return_specialist_logits: bool = False) -> FusedOutput:
        batch = batch.to([s.device for s in self.specialists])
        hiddens, logits = self.run_specialists(batch)
        z, w = self.mix(hiddens, logits)
        loss = None
        if batch.labels is not None:
            loss = fused_loss(z, batch.labels.to(z.device))
        spec_logits = [None if o is None else o[..., : self.vocab_size] for o in logits]
        return FusedOutput(z, w, loss, spec_logits if return_specialist_logits else None)

    # ------------------------------------------------------------------ decoding (straightforward path)
    @torch.no_grad()
    def start_decoding(self, prompts: Sequence[Aligned]) -> DecodeState:
        """Prefill every specialist's cache with left-padded prompts; return the state and first outputs."""
        batch = self.collate(prompts, padding_side="left").to([s.device for s in self.specialists])
        caches = [new_cache(s.model) for s in self.specialists]
        hiddens, logits = self.run_specialists(batch, caches)
        z, w = self.mix(hiddens, logits)
        return DecodeState(caches, batch.attention_mask, [p[:, -1:] for p in batch.position_ids], z[:, -1], w[:, -1])

    @torch.no_grad()
    def decode_step(self, state: DecodeState, tokens: torch.Tensor) -> DecodeState:
        """Append `tokens` (B,) to every specialist and compute the next fused logits (B, V)."""
        ids, masks, pos = [], [], []
        for k, s in enumerate(self.specialists):
            m = torch.cat([state.attention_mask[k], torch.ones_like(state.attention_mask[k][:, :1])], dim=1)  # (B, L+1)
            p = state.last_position[k] + 1  # (B, 1)
            ids.append(tokens.view(-1, 1).to(s.device))
            masks.append(m)
            pos.append(p)
        gather = [torch.zeros_like(p) for p in pos]  # (B, 1): the single new position
        batch = FusedBatch(ids, masks, pos, gather, None)
        hiddens, logits = self.run_specialists(batch, state.caches)
        z, w = self.mix(hiddens, logits)
        return DecodeState(state.caches, masks, pos, z[:, -1], w[:, -1])

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write `ultrafuser.json` (+ `gate.safetensors` for a learned gate), atomically."""
        save_fused_dir(out_dir, self.config, self.gate.state_dict() if self.gate is not None else None,
                       extra={"vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id,
                              "hidden_sizes": [s.hidden_size for s in self.specialists]})

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> FusedModel:
        config, meta = read_fused_config(model_dir)
        model = cls.from_config(config, base_dir=model_dir)
        if model.gate is not None:
            state = load_gate_weights(model_dir, meta)
            try:
                model.gate.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise LoadError(f"gate weights in {str(model_dir)!r} do not match the specialists: {e}") from e
            model.gate.to(model.specialists[0].device)
        return model


@dataclass
class DecodeState:
    caches: list
    attention_mask: list[torch.Tensor]  # N × (B, L_k)
    last_position: list[torch.Tensor]  # N × (B, 1)
    logits: torch.Tensor  # (B, V) fused logits for the next token
    weights: torch.Tensor  # (B, N) gate weights that produced them


def fused_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax(z) against the shared reply ids, mean over reply tokens."""
    return F.cross_entropy(z.reshape(-1, z.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _portable_ref(ref: str | None, out_dir: Path) -> str | None:
    """Store paths inside the fused directory relative to it; other local paths absolute; hub ids as-is."""
    if ref is None or ref.startswith("embedded:"):
        return ref
    p = Path(ref)
    if not p.exists():
        return ref
    p = p.resolve()
    try:
        return "./" + str(p.relative_to(out_dir.resolve()))
    except ValueError:
        return str(p)


def save_fused_dir(out_dir, config: FuseConfig, gate_state: dict | None, extra: dict,
                   extra_files: dict[str, Path] | None = None) -> None:
    """Write a fused-model directory atomically: a temp dir next to it, then rename over the old one."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        specs = [s.model_copy(update={"path": _portable_ref(s.path, out), "adapter": _portable_ref(s.adapter, out)})
                 for s in config.specialists]
        cfg = config.model_copy(update={"specialists": specs})
        meta = {"format_version": FORMAT_VERSION, "config": json.loads(cfg.model_dump_json()), **extra}
        if gate_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in gate_state.items()}, str(tmp / GATE_WEIGHTS_NAME))
            meta["gate_sha256"] = sha256_file(tmp / GATE_WEIGHTS_NAME)
        # keep files that already live in the target dir (e.g. fine-tuned specialists) unless replaced
        if out.is_dir():
            for child in out.iterdir():
                if child.name not in (FUSED_CONFIG_NAME, GATE_WEIGHTS_NAME) and not (tmp / child.name).exists():
                    shutil.move(str(child), str(tmp / child.name))
        for name, src in (extra_files or {}).items():
            shutil.copytree(src, tmp / name) if Path(src).is_dir() else shutil.copy2(src, tmp / name)
        (tmp / FUSED_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Put a fully written directory `tmp` in place of `out` by renames (never a half-written `out`)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def read_fused_config(model_dir) -> tuple[FuseConfig, dict]:
    from pydantic import ValidationError

    from ultrafuser.config import format_validation_error

    p = Path(model_dir) / FUSED_CONFIG_NAME
    if not p.is_file():
        raise LoadError(f"{str(model_dir)!r} is not a fused-model directory (no {FUSED_CONFIG_NAME}); create one "
                        "with `ultrafuser fuse --specialist DOMAIN=PATH ... --out DIR`")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{str(p)!r} is not valid JSON ({e}); the directory is damaged") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{str(p)!r} has format_version {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    try:
        return FuseConfig.model_validate(meta["config"]), meta
    except (ValidationError, KeyError) as e:
        msg = format_validation_error(e, str(p)) if isinstance(e, ValidationError) else f"{p}: missing {e}"
        raise LoadError(msg) from None


def load_gate_weights(model_dir, meta: dict) -> dict[str, torch.Tensor]:
    """Load gate weights from safetensors only, after checking the checksum recorded at save time.

    A pickled, truncated or altered file is refused before any of its bytes are interpreted as objects.
    """
    from safetensors.torch import load_file

    p = Path(model_dir) / GATE_WEIGHTS_NAME
    if not p.is_file():
        raise LoadError(f"{str(model_dir)!r} has a learned gate but no {GATE_WEIGHTS_NAME}; re-run `ultrafuser fuse` or training")
    want = meta.get("gate_sha256")
    if want is None or sha256_file(p) != want:
        raise LoadError(
            f"{str(p)!r} does not match the checksum recorded in {FUSED_CONFIG_NAME} (tampered, corrupted or replaced);"
            " refusing to load it. Restore it from the training output or re-create the directory."
        )
    try:
        return load_file(str(p))
    except Exception as e:
        raise LoadError(f"{str(p)!r} is not a valid safetensors file ({e}); refusing to load it") from e


def fused_model_refs(model_dir) -> list[str]:
    """The resolved specialist paths of a fused directory (for tools that only need to know them)."""
    config, _ = read_fused_config(model_dir)
    return [resolve_model_path(s.path, model_dir) for s in config.specialists]


def fresh_gate_state(config: FuseConfig, hidden_sizes: Sequence[int], seed: int = 0) -> dict | None:
    if config.gate.mode != "learned":
        return None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Gate(hidden_sizes, config.gate.inner_size).state_dict()


__all__ = ["DecodeState", "FusedModel", "FusedOutput", "Gate", "GateConfig", "fused_loss"]
