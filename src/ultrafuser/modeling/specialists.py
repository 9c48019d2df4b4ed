"""Loading specialists, checking that their tokenizers agree, and running one specialist.

A specialist is a Hugging Face causal LM (local dir or hub id) or a base model plus a PEFT LoRA adapter.
Specialists that name the same base (same path, revision, dtype, device) share one model in memory: the
base is loaded once, each adapter is added to it under the specialist's domain name, and a specialist
with no adapter runs the base with adapters switched off.

Safety: weights load from safetensors only (`use_safetensors=True`: a directory holding only pickled
`.bin` weights is refused, nothing is unpickled); `trust_remote_code` stays off unless the config asks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ultrafuser.config import ConfigError, SpecialistConfig
from ultrafuser.modeling.templates import PromptRenderer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
# Text whose tokenisation every specialist must agree on, beyond the vocabulary table itself (catches
# tokenizers with the same vocabulary but different normalisers or pre-tokenisers).
_PROBE = "Hello, world! def f(x):\n    return x ** 2  # 3.14159 — naïve café 12345 ∑ \t\t end."


class TokenizerMismatchError(ConfigError):
    """Two specialists' tokenizers map the same strings to different ids."""


class LoadError(ConfigError):
    """A specialist or fused model cannot be loaded; the message names the path and the fix."""


def resolve_model_path(ref: str, base_dir: str | os.PathLike | None = None) -> str:
    """A local directory, a path relative to a fused-model directory (`./…`), `embedded:NAME`, or a hub id."""
    if ref.startswith("embedded:"):
        from ultrafuser import embedded  # builds the embedded default's plain model once, then caches it

        return str(embedded.resolve(ref.split(":", 1)[1]))
    p = Path(ref)
    if base_dir is not None and ref.startswith(("./", "../")):
        p = Path(base_dir) / ref
    if p.exists():
        if not p.is_dir():
            raise LoadError(f"specialist path {ref!r} is a file; give the model's directory")
        return str(p.resolve())
    looks_local = ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or os.sep in ref.replace("/", "")
    if looks_local:
        raise LoadError(f"specialist path {ref!r} does not exist; give a model directory or a hub id (org/name)")
    return ref  # a hub id; transformers resolves it (offline: from the local cache only)


@dataclass
class Specialist:
    """One specialist: its (possibly shared) model, adapter name, tokenizer and template."""

    config: SpecialistConfig
    model: torch.nn.Module  # the Hugging Face causal LM (LoRA layers injected in place when adapters exist)
    adapter: str | None
    tokenizer: object
    renderer: PromptRenderer
    peft_model: object | None = None  # the PeftModel wrapper when this model carries adapters
    _tuner_layers: list = field(default_factory=list, repr=False)

    @property
    def domain(self) -> str:
        return self.config.domain

    @property
    def hidden_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[1]

    @property
    def vocab_rows(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def context_length(self) -> int:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        return int(getattr(cfg, "max_position_embeddings", 1 << 30))

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Switch the shared model to this specialist's adapter (or to no adapter) for the duration.

        Sets PEFT's per-layer active-adapter flags directly: PEFT's public `set_adapter` /
        `disable_adapter` also flip `requires_grad`, which would silently change what trains.
        """
        if not self._tuner_layers:
            yield
            return
        saved = [(m._active_adapter, m._disable_adapters) for m in self._tuner_layers]
        for m in self._tuner_layers:
            if self.adapter is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [self.adapter]
                m._disable_adapters = False
        try:
            yield
        finally:
            for m, (a, d) in zip(self._tuner_layers, saved):
                m._active_adapter, m._disable_adapters = a, d

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor,  # (B, T)
        gather_index: torch.Tensor,  # (B, J) positions whose outputs are needed
        cache=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the specialist; return (hidden (B, J, H), logits (B, J, V_k)) at the gathered positions only.

        The hidden state is exactly the vector this model's LM head reads (captured by a pre-hook on the
        LM head, which also cuts the sequence down to the gathered positions, so the LM head — the
        biggest matmul at large vocabularies — runs only where its logits are needed). Model-specific
        logit post-processing (soft-capping, scaling) still applies.
        """
        captured: dict[str, torch.Tensor] = {}

        def gather_then_project(_module, args):
            h = args[0]  # (B, T, H)
            idx = gather_index.unsqueeze(-1).expand(-1, -1, h.size(-1))  # (B, J, H)
            captured["h"] = h.gather(1, idx)  # (B, J, H)
            return (captured["h"],) + tuple(args[1:])

        head = self.model.get_output_embeddings()
        handle = head.register_forward_pre_hook(gather_then_project)
        kwargs = {_cache_kwarg(self.model): cache} if cache is not None else {}
        try:
            with self.active():
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=cache is not None,
                    **kwargs,
                )
        finally:
            handle.remove()
        return captured["h"], out.logits  # (B, J, H), (B, J, V_k)


def _cache_kwarg(model) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.x; accept both.
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _check_safetensors_dir(path: str, what: str) -> None:
    p = Path(path)
    if not p.is_dir():
        return  # hub id: transformers enforces use_safetensors
    if not any(p.glob("*.safetensors")) and not (p / "model.safetensors.index.json").exists():
        pickled = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = f" (found only pickled files {pickled}; they are never loaded)" if pickled else ""
        raise LoadError(
            f"{what} {path!r} has no safetensors weights{hint}. Convert it once with transformers in a trusted "
            "environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )


def load_tokenizer(path: str, cfg: SpecialistConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise LoadError(f"cannot load the tokenizer of specialist {cfg.domain!r} from {path!r}: {e}") from e


def load_specialists(
    configs: Sequence[SpecialistConfig], base_dir: str | os.PathLike | None = None, eos_text: str | None = None
) -> list[Specialist]:
    """Load every specialist, sharing one base model among specialists that name the same base."""
    from transformers import AutoModelForCausalLM

    groups: dict[tuple, dict] = {}
    specs: list[Specialist] = []
    for cfg in configs:
        path = resolve_model_path(cfg.path, base_dir)
        key = (path, cfg.revision, cfg.dtype, cfg.device, cfg.trust_remote_code)
        if key not in groups:
            _check_safetensors_dir(path, f"specialist {cfg.domain!r} path")
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path,
                    dtype=_DTYPES[cfg.dtype],
                    use_safetensors=True,
                    trust_remote_code=cfg.trust_remote_code,
                    revision=cfg.revision,
                )
            except Exception as e:
                raise LoadError(f"cannot load specialist {cfg.domain!r} from {cfg.path!r}: {e}") from e
            model.to(cfg.device).eval().requires_grad_(False)
            groups[key] = {"model": model, "peft": None, "tokenizer": load_tokenizer(path, cfg)}
        g = groups[key]
        if cfg.adapter:
            _attach_adapter(g, cfg, base_dir)
        specs.append(
            Specialist(
                config=cfg,
                model=g["model"],
                adapter=cfg.domain if cfg.adapter else None,
                tokenizer=g["tokenizer"],
                renderer=PromptRenderer(cfg.template, g["tokenizer"], cfg.turn_separator, eos_text),
            )
        )
    for s in specs:
        g = next(g for g in groups.values() if g["model"] is s.model)
        s.peft_model = g["peft"]
        if g["peft"] is not None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            s._tuner_layers = [m for m in s.model.modules() if isinstance(m, BaseTunerLayer)]
    return specs


def _attach_adapter(group: dict, cfg: SpecialistConfig, base_dir) -> None:
    from peft import PeftModel

    apath = cfg.adapter
    if base_dir is not None and apath.startswith(("./", "../")):
        apath = str(Path(base_dir) / apath)
    p = Path(apath)
    if not (p / "adapter_config.json").is_file():
        raise LoadError(f"adapter of specialist {cfg.domain!r}: {cfg.adapter!r} has no adapter_config.json")
    if not (p / "adapter_model.safetensors").is_file():
        raise LoadError(
            f"adapter of specialist {cfg.domain!r}: {cfg.adapter!r} has no adapter_model.safetensors "
            "(pickled adapters are refused; re-save it with save_pretrained(safe_serialization=True))"
        )
    try:
        if group["peft"] is None:
            group["peft"] = PeftModel.from_pretrained(group["model"], str(p), adapter_name=cfg.domain)
        else:
            group["peft"].load_adapter(str(p), adapter_name=cfg.domain)
    except Exception as e:
        raise LoadError(f"cannot load adapter {cfg.adapter!r} of specialist {cfg.domain!r}: {e}") from e
    group["model"].requires_grad_(False)


# --------------------------------------------------------------------------------------------- tokenizers


def check_tokenizers(tokenizers: Sequence, domains: Sequence[str], vocab_rows: Sequence[int] | None = None) -> int:
    """Refuse specialists whose tokenizers disagree; return the size of the shared vocabulary.

    The specialists must map the same token strings to the same ids over their common prefix. Extra
    trailing rows are allowed (CodeLlama's 32016 vs Llama-2's 32000): the fused model works over the
    common prefix `min(rows)` and never emits an id past it. Anything else is refused with the first
    differing ids and their strings named.
    """
    ref = tokenizers[0]
    ref_vocab = ref.convert_ids_to_tokens(list(range(len(ref))))
    for k in range(1, len(tokenizers)):
        tok = tokenizers[k]
        n = min(len(ref), len(tok))
        other = tok.convert_ids_to_tokens(list(range(n)))
        for i in range(n):
            if ref_vocab[i] != other[i]:
                j = ref.convert_tokens_to_ids(other[i])
                raise TokenizerMismatchError(
                    f"specialists {domains[0]!r} and {domains[k]!r} have incompatible tokenizers: id {i} is "
                    f"{ref_vocab[i]!r} in {domains[0]!r} but {other[i]!r} in {domains[k]!r}"
                    + (f" (which {domains[0]!r} has as id {j})" if j not in (None, ref.unk_token_id) else "")
                    + ". Fusion needs one shared tokenizer (paper §1.1): use specialists fine-tuned from the same "
                    "base vocabulary."
                )
        a, b = ref(_PROBE, add_special_tokens=False)["input_ids"], tok(_PROBE, add_special_tokens=False)["input_ids"]
        if a != b:
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            xa = a[i] if i < len(a) else None
            xb = b[i] if i < len(b) else None
            raise TokenizerMismatchError(
                f"specialists {domains[0]!r} and {domains[k]!r} share a vocabulary but tokenize text differently: "
                f"at token {i} of a probe text, {domains[0]!r} gives id {xa} "
                f"({ref.convert_ids_to_tokens(xa) if xa is not None else None!r}) and {domains[k]!r} gives id {xb} "
                f"({tok.convert_ids_to_tokens(xb) if xb is not None else None!r}); their normalisers or "
                "pre-tokenizers differ."
            )
    lengths = [len(t) for t in tokenizers]
    if vocab_rows is None:
        return min(lengths)
    if len(set(lengths)) == 1:
        # Same tokenizer everywhere: rows past it (padding rows, as in Qwen2.5) are shared and harmless.
        return min(vocab_rows)
    # Some tokenizer has extra tokens: only ids every tokenizer knows are fused.
    return min(min(vocab_rows), min(lengths))


def read_model_config(path: str, cfg: SpecialistConfig) -> dict:
    """The specialist's `config.json` as a dict, without loading any weights (for fuse and plan)."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise LoadError(f"cannot read the model config of specialist {cfg.domain!r} at {cfg.path!r}: {e}") from e
    d = c.get_text_config().to_dict() if hasattr(c, "get_text_config") else c.to_dict()
    return json.loads(json.dumps(d, default=str))
