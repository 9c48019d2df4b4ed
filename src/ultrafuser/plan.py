"""`ultrafuser plan CONFIG`: what a training run will need, printed before anything downloads or allocates.

For each stage of a `TrainConfig` it prints the parameters of every specialist, the memory per GPU (weights,
gradients, optimizer states, activations, the fused head's buffers, sharding buffers), whether that fits,
the tokens per step and an estimated time per step; a run that cannot fit is refused (exit code 2) with the
cheapest change that makes it fit. Importable without torch; the benchmark (`bench/train.py`) calls
`estimate()` with the same formulas and compares them with the measured peak.

Parameters come from the specialist's local `config.json` (a model directory, or the Hugging Face cache for a
hub id), else from `KNOWN_ARCHITECTURES` below (public config.json values, keyed by hub id).

Memory per GPU (bytes; P = a base model's parameters, S = GPUs when sharded (fsdp / zero3), else 1;
e = 2 bytes per activation element in bf16, 4 in fp32; T = micro_batch x max_length tokens per specialist;
J = target tokens of a micro-batch, taken = T (every position a target: the worst case); V = vocabulary;
under zero3 a GPU's whole share of a step is one micro-batch: DeepSpeed steps on every backward):
  weights       e_w * P / S for each distinct base model (e_w = 2 for bf16/fp16 weights, 4 for float32)
  gradients     full fine-tuning: e_w * P / S                      (kept across micro-batches)
  optimizer     full, --optimizer adamw (default): 12 * P / S for bf16 weights (fp32 master + fp32 Adam m, v; the
                layout of DeepSpeed's bf16 optimizer and of FSDP mixed precision), 8 * P / S for fp32 weights;
                adamw-8bit: 6 * P / S; adamw-param-dtype: 4 * P / S (m, v in bf16, no master copy: what
                `ultrafuser train` does today with bf16 specialists)
  trainable     gate and LoRA parameters, kept in fp32: 16 bytes each (weight, grad, m, v)
  activations   stage 1: none saved (frozen specialists run under no_grad); working set of one layer
                stage 2: per layer and token, what autograd saves in a Hugging Face Llama/Qwen2 layer:
                  2 RMSNorms: fp32 copy of the input (4h) + the normalised bf16 (e*h, only if the norm trains)
                  linear inputs: e*(h + q + h + I) when weights train; with LoRA one fp32 copy of the input per
                  target module (PEFT casts to the fp32 adapter dtype); attention: e*(2q + 2kv) (q, k, v, out;
                  kv = q when k/v heads are repeated); MLP: 3*e*I (gate, SiLU, up)
                  with activation checkpointing: only e*h per layer (the layer input) + one layer recomputed
  fused head    per target token: bf16 logits of every specialist (e*V_k), fp32 copies saved for the gate's
                gradient (4V each), fused logits z (4V), log-softmax (4V) and their gradients:
                J * max(sum e*V_k + 4V*N + 12V, 4V*N + 16V) (N = 0 without a learned gate)
  sharding      fsdp / zero3: the root unit (embeddings + LM heads, gathered for the step) + 2 decoder layers (prefetch)
  fits          total <= (1 - headroom) * card memory (10 %: CUDA context, fragmentation, NCCL buffers)
Time per step = FLOPs / (GPUs x peak TFLOP/s x MFU), FLOPs = sum over specialists of c * N_k * tokens, N_k = parameters
without the input embedding, c = 2 (stage 1, forward only), 6 (full), 4 (LoRA: no weight gradients), +2 with
activation checkpointing (recomputed forward); tokens = per_domain x domains x average tokens per sequence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ultrafuser.config import FUSED_CONFIG_NAME, ConfigError, FuseConfig, TrainConfig, load_yaml

GiB = 1024**3
PEAK_TFLOPS_DEFAULT = 989.0  # H100 / H200 SXM dense bf16 (vendor datasheet)
MFU_DEFAULT = 0.35  # torchtitan trains Llama-3-8B at 33-39 % MFU on H100 (docs/performance.md)
HEADROOM_DEFAULT = 0.10


@dataclass(frozen=True)
class Arch:
    """The numbers of a decoder-only transformer that decide its size (Llama / Mistral / Qwen2 / Qwen3 layout)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_positions: int
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q, k, v projections have a bias
    o_bias: bool = False
    mlp_bias: bool = False
    head_dim: int | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k heads
    model_type: str = "llama"
    source: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.hd

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module in one layer, by its Hugging Face name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        n = sum(a * b for a, b in self.linear_shapes().values()) + 2 * h  # linears + 2 RMSNorms
        n += (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + h * self.o_bias + (2 * i + h) * self.mlp_bias
        return n + 2 * self.hd * self.qk_norm

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def params(self) -> int:
        """Exactly `sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())`."""
        head = 0 if self.tie_embeddings else self.embed_params
        return self.embed_params + self.num_layers * self.layer_params() + self.hidden_size + head

    def flop_params(self) -> int:
        """Parameters that do matmul work per token: all but the input embedding table (the LM head counts)."""
        return self.params() - (0 if self.tie_embeddings else self.embed_params)

    def lora_params(self, r: int, targets) -> int:
        shapes = self.linear_shapes()
        return self.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    @classmethod
    def from_config_dict(cls, d: dict, source: str) -> "Arch":
        d = d.get("text_config") or d  # multimodal wrappers keep the language model's numbers here
        try:
            heads = int(d["num_attention_heads"])
            rope = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or 10000.0
            mt = str(d.get("model_type", "llama"))
            return cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                vocab_size=int(d["vocab_size"]),
                max_positions=int(d.get("max_position_embeddings") or 1 << 30),
                rope_theta=float(rope),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=bool(d.get("attention_bias", mt == "qwen2")),
                o_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                head_dim=d.get("head_dim"),
                qk_norm=mt.startswith("qwen3"),
                model_type=mt,
                source=source,
            )
        except KeyError as e:
            raise ConfigError(
                f"{source}: config.json lacks {e}; plan understands Llama/Mistral/Qwen2/Qwen3-style "
                "decoders (hidden_size, intermediate_size, num_hidden_layers, ...)"
            ) from None


def _llama13(vocab: int, ctx: int, theta: float, src: str) -> Arch:
    return Arch(5120, 13824, 40, 40, 40, vocab, ctx, theta, source=src)


def _qwen7(ctx: int, theta: float, src: str) -> Arch:
    return Arch(3584, 18944, 28, 28, 4, 152064, ctx, theta, qkv_bias=True, model_type="qwen2", source=src)


# Built-in table: values from each model's public config.json on the Hugging Face Hub (hidden_size,
# intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size,
# max_position_embeddings, rope_theta, tie_word_embeddings). A local config.json always wins over this table.
_HUB = "public config.json"
KNOWN_ARCHITECTURES: dict[str, Arch] = {
    # the paper's trio (all Llama-2-13B shaped; the vocabularies differ in their tails: 32000 / 32016 / 32001)
    "openbmb/UltraLM-13b-v2.0": _llama13(32000, 4096, 1e4, _HUB),
    "codellama/CodeLlama-13b-Instruct-hf": _llama13(32016, 16384, 1e6, _HUB),
    # WizardMath: vocab 32001 = Llama-2's 32000 + [PAD]; its max_position_embeddings is not verified (4096 assumed,
    # as Llama-2-13B; some WizardLM-family V1.0 configs say 2048): the recipes use max_length 2048 either way.
    "WizardLMTeam/WizardMath-13B-V1.0": _llama13(32001, 4096, 1e4, _HUB + ", context unverified"),
    # the bases, for benches and users
    "meta-llama/Llama-2-7b-hf": Arch(4096, 11008, 32, 32, 32, 32000, 4096, 1e4, source=_HUB),
    "meta-llama/Llama-2-13b-hf": _llama13(32000, 4096, 1e4, _HUB),
    # a modern trio sharing one tokenizer (vocab 152064 rows), with different rope settings and contexts
    "Qwen/Qwen2.5-7B-Instruct": _qwen7(32768, 1e6, _HUB),
    "Qwen/Qwen2.5-Coder-7B-Instruct": _qwen7(32768, 1e6, _HUB),
    "Qwen/Qwen2.5-Math-7B-Instruct": _qwen7(4096, 1e4, _HUB),
    # the embedded default (design.md §4)
    "HuggingFaceTB/SmolLM2-135M-Instruct": Arch(
        576, 1536, 30, 9, 3, 49152, 8192, 1e5, tie_embeddings=True, source=_HUB
    ),
}
_ALIASES = {
    "WizardLM/WizardMath-13B-V1.0": "WizardLMTeam/WizardMath-13B-V1.0",
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


# ----------------------------------------------------------------------------------------------- specialists


@dataclass(frozen=True)
class SpecInfo:
    domain: str
    path: str
    arch: Arch
    base_key: str  # specialists with the same key share one model in memory (LoRA specialists on one base)
    weight_bytes: int = 2
    note: str = ""


def _hf_cache_config(repo: str) -> Path | None:
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    hub = Path(
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    )
    snaps = hub / ("models--" + repo.replace("/", "--")) / "snapshots"
    found = sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snaps.is_dir() else []
    return found[-1] if found else None


def resolve_arch(path: str, base_dir: Path | None = None) -> tuple[Arch, str]:
    """A specialist's architecture: local dir > Hugging Face cache > built-in table; else a ConfigError."""
    if path.startswith("embedded:"):
        smol = KNOWN_ARCHITECTURES["HuggingFaceTB/SmolLM2-135M-Instruct"]
        return smol, "embedded default (SmolLM2-135M-Instruct)"
    p = Path(path).expanduser()
    if base_dir is not None and path.startswith(("./", "../")):
        p = base_dir / path
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"specialist directory {str(p)!r} has no config.json")
        return Arch.from_config_dict(json.loads(cfg.read_text()), str(cfg)), f"local {cfg}"
    cached = _hf_cache_config(path)
    if cached is not None:
        return Arch.from_config_dict(json.loads(cached.read_text()), str(cached)), "Hugging Face cache"
    key = _ALIASES.get(path, path)
    for k, arch in KNOWN_ARCHITECTURES.items():
        if k.lower() == key.lower():
            return arch, "built-in table" + arch.source.replace(_HUB, "")
    raise ConfigError(
        f"specialist {path!r} is neither a local model directory nor a known architecture, so its size is unknown. "
        f"Fix: download its config (`huggingface-cli download {path} config.json --local-dir DIR`) and set the "
        f"specialist's path to DIR, or use one of the built-in ids: {', '.join(KNOWN_ARCHITECTURES)}"
    )


def _read_fused_dir(d: Path) -> FuseConfig:
    meta = json.loads((d / FUSED_CONFIG_NAME).read_text())
    return FuseConfig.model_validate(meta["config"])


def fuse_config_of(
    cfg: TrainConfig, config_path: Path | None, override: str | None = None, _seen: tuple = ()
) -> tuple[FuseConfig, Path | None, str]:
    """The FuseConfig a TrainConfig trains, its base directory, and where it came from.

    `model` may name a fused-model directory that does not exist yet because an earlier stage writes it:
    then the sibling YAML (same folder as CONFIG) whose `output_dir` is that directory supplies the specialists.
    """
    if override:
        o = Path(override)
        if o.is_dir():
            return _read_fused_dir(o), o, f"fused directory {o}"
        tc = load_yaml(o, TrainConfig)
        return fuse_config_of(tc, o, None, _seen + (str(o),))[0], None, f"--model {o}"
    if isinstance(cfg.model, FuseConfig):
        return cfg.model, None, "inline"
    ref = cfg.model
    for cand in [Path(ref)] + ([config_path.parent / ref] if config_path else []):
        if (cand / FUSED_CONFIG_NAME).is_file():
            return _read_fused_dir(cand), cand, f"fused directory {cand}"
    if config_path is not None:
        for sib in sorted(config_path.parent.glob("*.y*ml")):
            if sib.resolve() == config_path.resolve() or str(sib) in _seen:
                continue
            try:
                tc = load_yaml(sib, TrainConfig)
            except ConfigError:
                continue
            # the trainer writes the fused model to OUTPUT_DIR/stage1 (after stage 1) and OUTPUT_DIR/final
            outs = {os.path.normpath(os.path.join(tc.output_dir, x)) for x in ("", "stage1", "final")}
            if os.path.normpath(ref) in outs:
                fc, base, _ = fuse_config_of(tc, sib, None, _seen + (str(config_path),))
                return fc, base, f"{sib} (which writes {ref})"
    raise ConfigError(
        f"model {ref!r} is not a fused-model directory (no {FUSED_CONFIG_NAME}) and no YAML beside the config writes "
        "it; run the earlier stage first, or pass --model STAGE1_YAML_OR_FUSED_DIR"
    )


def specialists_of(fc: FuseConfig, base_dir: Path | None) -> list[SpecInfo]:
    out = []
    for s in fc.specialists:
        arch, src = resolve_arch(s.path, base_dir)
        key = f"{s.path}@{s.revision}:{s.dtype}:{s.device}"
        wb = _DTYPE_BYTES[s.dtype]
        note = src + ("; stored as float32: set dtype: bfloat16 to halve the weights" if wb == 4 else "")
        out.append(SpecInfo(s.domain, s.path, arch, key, wb, note))
    return out


# ----------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Setting:
    """One stage of one run on one kind of machine: everything the estimate depends on."""

    stage: int = 2
    trainable: str = "full"  # gate | full | lora
    sharding: str = "none"  # none | fsdp | zero3
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    micro_batch: int = 8
    checkpointing: bool = False
    lora_r: int = 16
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    per_domain: int = 32
    n_domains: int = 3
    max_length: int = 1024
    avg_tokens: int = 512
    act_bytes: int = 2  # 2 = bf16 activations, 4 = fp32
    gate_mode: str = "learned"
    gate_inner: int = 512
    kv_repeated: bool = True  # padded batches: HF repeats k/v heads before SDPA, so k, v are saved at q width
    adapter_bytes: int = 4  # PEFT keeps LoRA weights in fp32 on a bf16 base
    # AdamW layout for full fine-tuning: "adamw" = fp32 master weights + fp32 m, v for 16-bit weights (12 bytes per
    # parameter), "adamw-8bit" = fp32 master + 8-bit m, v (6), "adamw-param-dtype" = m, v in the weights' own dtype
    # and no master copy (4 for bf16: what `ultrafuser train` does today with bf16 specialists under FSDP / 1 GPU)
    optimizer: str = "adamw"
    steps: int = 0
    headroom: float = HEADROOM_DEFAULT
    peak_tflops: float = PEAK_TFLOPS_DEFAULT
    mfu: float = MFU_DEFAULT

    @property
    def shards(self) -> int:
        return self.gpus if self.sharding in ("fsdp", "zero3") else 1


@dataclass
class Estimate:
    memory: dict[str, float]  # bytes per GPU by component
    total: float
    usable: float
    micro_batch: int  # effective (never more than a GPU's share of the step)
    accumulation: int
    tokens_per_step_max: int
    tokens_per_step_avg: int
    flops_per_step: float
    seconds_per_step: float
    params: dict[str, int] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)  # component -> the formula that gave it

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def _layer_saved(a: Arch, s: Setting) -> float:
    """Bytes autograd keeps per token for one trainable decoder layer (see the module docstring)."""
    e, h, q, i = s.act_bytes, a.hidden_size, a.q_dim, a.intermediate_size
    kv = q if (s.kv_repeated and a.num_kv_heads < a.num_heads) else a.kv_dim
    full = s.trainable == "full"
    norms = 2 * (4 * h + (e * h if full else 0))
    if full:
        inputs = e * (h + q + h + i)
    else:  # LoRA: the frozen base saves nothing for its weights; each adapter keeps its own fp32 copy of the input
        fan_in = {
            "q_proj": h,
            "k_proj": h,
            "v_proj": h,
            "o_proj": q,
            "gate_proj": h,
            "up_proj": h,
            "down_proj": i,
        }
        shared = {
            "attn": ("q_proj", "k_proj", "v_proj"),
            "o": ("o_proj",),
            "mlp": ("gate_proj", "up_proj"),
            "down": ("down_proj",),
        }
        inputs = 0
        for names in shared.values():
            hit = [n for n in names if n in s.lora_targets]
            if hit:
                per = s.adapter_bytes * fan_in[hit[0]]
                inputs += per * (len(hit) if s.adapter_bytes != e else 1)
        inputs += s.adapter_bytes * s.lora_r * len([t for t in s.lora_targets if t in fan_in])
    return norms + inputs + e * (2 * q + 2 * kv) + 3 * e * i


def _optim_bytes(optimizer: str, weight_bytes: int) -> tuple[int, int]:
    """(fp32 master copy, Adam m + v) bytes per trainable parameter of a base model."""
    if optimizer == "adamw-param-dtype":
        return 0, 2 * weight_bytes
    master = 4 if weight_bytes < 4 else 0
    return master, (2 if optimizer == "adamw-8bit" else 8)


def estimate(specs: list[SpecInfo], s: Setting) -> Estimate:
    e, S = s.act_bytes, s.shards
    examples = s.per_domain * s.n_domains
    per_gpu = math.ceil(examples / s.gpus)
    # DeepSpeed's engine steps on every backward (gradient_accumulation_steps = 1 in configs/accelerate/ds_zero3.json):
    # under ZeRO-3 each GPU runs its whole share of the step as one micro-batch
    mb = per_gpu if s.sharding == "zero3" else max(1, min(s.micro_batch, per_gpu))
    accum = math.ceil(per_gpu / mb)
    T = mb * s.max_length  # tokens per specialist per micro-batch
    J = T  # target tokens: every position (worst case)
    n = len(specs)
    bases: dict[str, SpecInfo] = {}
    for sp in specs:
        bases.setdefault(sp.base_key, sp)
    full = s.stage == 2 and s.trainable == "full"
    lora = s.stage == 2 and s.trainable == "lora"
    P = {k: b.arch.params() for k, b in bases.items()}

    mem: dict[str, float] = {}
    how: dict[str, str] = {}
    ptot = sum(P.values())
    wb = max(b.weight_bytes for b in bases.values())
    sh = f" / {S} GPUs" if S > 1 else ""
    mem["weights"] = sum(P[k] * b.weight_bytes for k, b in bases.items()) / S
    how["weights"] = f"{_fmt_n(ptot)} params x {wb} bytes{sh}"
    mem["gradients"] = sum(P[k] * b.weight_bytes for k, b in bases.items()) / S if full else 0.0
    how["gradients"] = f"{_fmt_n(ptot)} x {wb} bytes{sh}" if full else "none: no weight of theirs trains"
    mem["optimizer"] = (
        sum(P[k] * sum(_optim_bytes(s.optimizer, b.weight_bytes)) for k, b in bases.items()) / S
    )
    mem["optimizer"] *= full
    master, mv = _optim_bytes(s.optimizer, wb)
    how["optimizer"] = (
        f"{_fmt_n(ptot)} x ({f'{master} fp32 master + ' if master else ''}{mv} Adam m, v) bytes{sh}"
        if full
        else "-"
    )
    hs = [sp.arch.hidden_size for sp in specs]
    d = max(hs)
    gate = (
        (d * s.gate_inner + 2 * s.gate_inner + 1 + (sum(hs) * d if len(set(hs)) > 1 else 0))
        if s.gate_mode == "learned"
        else 0
    )
    lora_p = sum(sp.arch.lora_params(s.lora_r, s.lora_targets) for sp in specs) if lora else 0
    mem["trainable (gate, LoRA)"] = 16 * gate + 16 * lora_p / S
    how["trainable (gate, LoRA)"] = (
        f"({_fmt_n(gate)} gate + {_fmt_n(lora_p)} LoRA) x 16 bytes (fp32 w, g, m, v)"
    )

    # activations kept for backward (stage 2) and the largest working set of one layer
    saved, work = 0.0, 0.0
    for sp in specs:
        a = sp.arch
        h, i = a.hidden_size, a.intermediate_size
        if full or lora:
            per_layer = _layer_saved(a, s)
            final = 4 * h + (e * h if full else 0)
            if s.checkpointing:
                saved += T * (a.num_layers * e * h + final)
                work = max(work, T * (per_layer + e * (4 * i + 4 * h)))
            else:
                saved += T * (a.num_layers * per_layer + final)
                work = max(work, T * e * (4 * i + 4 * h))
        else:  # frozen specialist under no_grad: one layer's temporaries
            work = max(work, T * (e * (3 * i + 3 * h) + 8 * h))
    mem["activations"] = saved
    how["activations"] = (
        "none kept: specialists run under no_grad"
        if not (full or lora)
        else f"{n} x {T:,} tokens x layers x per-layer bytes"
        + (" (checkpointed: layer inputs)" if s.checkpointing else "")
    )

    V = min(sp.arch.vocab_size for sp in specs)  # the fused vocabulary (common prefix)
    copies = n if gate else 0  # fp32 logits saved for the gate's gradient (learned gate only)
    # forward: every specialist's bf16 logits + the fp32 copies + z_prev, w*o and z_new while the last one is summed
    fwd = sum(e * sp.arch.vocab_size for sp in specs) + 4 * V * copies + (12 * V if n > 1 else 8 * V)
    # backward of the log-softmax: copies + z + log-softmax output + its gradient + the gradient of z
    bwd = 4 * V * copies + 16 * V
    gate_in = sum(
        4 * sp.arch.hidden_size + 4 * s.gate_inner for sp in specs
    )  # fp32 gate inputs, ReLU outputs
    head = J * (max(fwd, bwd) + gate_in)
    # later in backward, with most logit buffers freed: an LM head's weight gradient before it is accumulated
    lm_grad = J * (10 * V + gate_in) + (max(sp.arch.embed_params * e for sp in specs) if full else 0)
    mem["fused head + working set"] = max(head, lm_grad, work + J * 4 * V)
    how["fused head + working set"] = (
        f"{J:,} targets x vocab {V:,} x {max(fwd, bwd) / V:.0f} bytes (logits, fp32 copies, z, log-softmax)"
    )

    if S > 1:
        root = sum((b.arch.params() - b.arch.num_layers * b.arch.layer_params()) for b in bases.values())
        layer = max(b.arch.layer_params() for b in bases.values())
        mem["sharding buffers"] = 2.0 * (root + 2 * layer) * (1 - 1 / S)
        how["sharding buffers"] = "gathered bf16: embeddings + LM heads + 2 layers"
    else:
        mem["sharding buffers"] = 0.0
        how["sharding buffers"] = "-"

    total = sum(mem.values())
    tok_max = examples * s.max_length
    tok_avg = examples * min(s.avg_tokens, s.max_length)
    c = 2 if not (full or lora) else (6 if full else 4)
    c += 2 if (full or lora) and s.checkpointing else 0
    flops = sum(c * sp.arch.flop_params() * tok_avg for sp in specs) + 6 * gate * n * tok_avg
    secs = flops / (s.gpus * s.peak_tflops * 1e12 * s.mfu)
    params = {sp.domain: sp.arch.params() for sp in specs}
    params.update({"gate": gate, "lora": lora_p})
    return Estimate(
        mem,
        total,
        (1 - s.headroom) * s.gpu_memory_gib * GiB,
        mb,
        accum,
        tok_max,
        tok_avg,
        flops,
        secs,
        params,
        how,
    )


def cheapest_fix(specs: list[SpecInfo], s: Setting) -> tuple[str, Setting] | None:
    """The cheapest change that fits: fewest GPUs first, then fewest changes in the order LoRA (stage 2),
    activation checkpointing, a smaller micro-batch, more GPUs (sharded)."""

    def fits(x: Setting) -> bool:
        return estimate(specs, x).fits

    def smaller_mb(x: Setting) -> Setting:
        """The largest smaller micro-batch that fits; 1 if none does (more GPUs may then make it fit)."""
        top = min(x.micro_batch, math.ceil(x.per_domain * x.n_domains / x.gpus))
        for m in range(top - 1, 0, -1):
            if fits(dataclasses.replace(x, micro_batch=m)):
                return dataclasses.replace(x, micro_batch=m)
        return dataclasses.replace(x, micro_batch=1)

    steps: list[tuple[str, object]] = []
    if s.stage == 2 and s.trainable == "full":
        steps.append(("LoRA (stage2.trainable=lora)", lambda x: dataclasses.replace(x, trainable="lora")))
    if s.stage == 2 and not s.checkpointing:
        steps.append(
            (
                "activation checkpointing (stage2.gradient_checkpointing=true)",
                lambda x: dataclasses.replace(x, checkpointing=True),
            )
        )
    if s.sharding == "zero3":  # ZeRO-3 runs a GPU's whole share at once: a smaller micro-batch needs FSDP

        def to_fsdp(x: Setting) -> Setting:
            y = dataclasses.replace(x, sharding="fsdp")
            return y if fits(y) else smaller_mb(y)

        steps.append(("micro-batch", to_fsdp))
    elif s.micro_batch > 1:
        steps.append(("micro-batch", smaller_mb))
    best: tuple[int, int, str, Setting] | None = None
    for size in range(0, len(steps) + 1):
        for combo in _subsets(steps, size):
            x = s
            for _, f in combo:
                x = f(x)
            with_mb = any(nm == "micro-batch" for nm, _ in combo)
            extra = []
            if not fits(x):
                g = _min_gpus(specs, x)
                if g is None:
                    continue
                x = dataclasses.replace(x, gpus=g, sharding=x.sharding if x.sharding != "none" else "fsdp")
                if with_mb:  # with more GPUs a larger micro-batch may fit again
                    x = max(
                        (
                            dataclasses.replace(x, micro_batch=m)
                            for m in range(1, s.micro_batch)
                            if fits(dataclasses.replace(x, micro_batch=m))
                        ),
                        key=lambda y: y.micro_batch,
                        default=x,
                    )
                extra = [f"{g} GPUs with {x.sharding}"]
            mb_name = f"micro_batch={x.micro_batch}" + (
                " with fsdp (micro-batches accumulate)" if s.sharding == "zero3" else ""
            )
            names = [nm if nm != "micro-batch" else mb_name for nm, _ in combo]
            cand = (x.gpus, size + bool(extra), " + ".join(names + extra), x)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is not None and best[0] == s.gpus:
            break
    return None if best is None else (best[2], best[3])


def _subsets(items, k):
    if k == 0:
        yield []
        return
    for idx in range(len(items)):
        for rest in _subsets(items[idx + 1 :], k - 1):
            yield [items[idx]] + rest


def _min_gpus(specs, x: Setting, limit: int = 1024) -> int | None:
    shard = x.sharding if x.sharding != "none" else "fsdp"
    for g in list(range(x.gpus + 1, 17)) + list(range(24, limit + 1, 8)):
        if estimate(specs, dataclasses.replace(x, gpus=g, sharding=shard)).fits:
            return g
    return None


# ----------------------------------------------------------------------------------------------- the command


def settings_from(cfg: TrainConfig, stage: int, n_domains: int, args) -> Setting:
    st = cfg.stage1 if stage == 1 else cfg.stage2
    sharding = args.sharding or ("none" if args.gpus == 1 else "fsdp")
    fc = cfg.model if isinstance(cfg.model, FuseConfig) else None
    return Setting(
        stage=stage,
        trainable=st.trainable if stage == 2 else "gate",
        sharding=sharding,
        gpus=args.gpus,
        gpu_memory_gib=args.gpu_memory,
        micro_batch=args.micro_batch or st.micro_batch,
        checkpointing=st.gradient_checkpointing,
        lora_r=st.lora_r,
        lora_targets=tuple(st.lora_target_modules),
        per_domain=st.per_domain,
        n_domains=n_domains,
        max_length=cfg.data.max_length,
        avg_tokens=args.avg_tokens or min(512, cfg.data.max_length),
        act_bytes=4 if cfg.precision == "fp32" else 2,
        gate_mode=fc.gate.mode if fc else "learned",
        gate_inner=fc.gate.inner_size if fc else 512,
        steps=st.steps,
        peak_tflops=args.throughput_tflops,
        mfu=args.mfu,
        headroom=args.headroom,
        optimizer=args.optimizer,
    )


def plan(config_path: str, args) -> dict:
    cfg = load_yaml(config_path, TrainConfig, list(args.overrides or []))
    fc, base_dir, origin = fuse_config_of(cfg, Path(config_path), args.model)
    specs = specialists_of(fc, base_dir)
    n_domains = len(cfg.data.domains or fc.domains)
    context = min(sp.arch.max_positions for sp in specs)
    problems = []
    if cfg.data.max_length > context:
        short = min(specs, key=lambda sp: sp.arch.max_positions)
        problems.append(
            f"data.max_length={cfg.data.max_length} exceeds the fused context {context} "
            f"({short.domain}: {short.path}); set data.max_length<={context}"
        )
    stages = (
        [args.stage]
        if args.stage
        else [k for k in (1, 2) if (cfg.stage1, cfg.stage2)[k - 1].steps > 0] or [1, 2]
    )
    out = {
        "config": config_path,
        "model_from": origin,
        "specialists": [],
        "stages": [],
        "problems": problems,
        "notes": [],
    }
    for sp in specs:
        a = sp.arch
        out["specialists"].append(
            {
                "domain": sp.domain,
                "path": sp.path,
                "params": a.params(),
                "layers": a.num_layers,
                "hidden": a.hidden_size,
                "vocab": a.vocab_size,
                "context": a.max_positions,
                "rope_theta": a.rope_theta,
                "weight_bytes": sp.weight_bytes,
                "source": sp.note,
            }
        )
    rows = sorted({sp.arch.vocab_size for sp in specs})
    out["fused"] = {
        "vocab": min(rows),
        "vocab_rows": [sp.arch.vocab_size for sp in specs],
        "context": context,
        "max_length": cfg.data.max_length,
        "domains": n_domains,
    }
    for k in stages:
        s = settings_from(cfg, k, n_domains, args)
        est = estimate(specs, s)
        entry = {
            "stage": k,
            "trainable": s.trainable,
            "sharding": s.sharding,
            "gpus": s.gpus,
            "gpu_memory_gib": s.gpu_memory_gib,
            "checkpointing": s.checkpointing,
            "micro_batch": est.micro_batch,
            "accumulation": est.accumulation,
            "memory_gib": {m: round(v / GiB, 2) for m, v in est.memory.items()},
            "how": est.how,
            "optimizer": args.optimizer,
            "total_gib": round(est.total / GiB, 2),
            "usable_gib": round(est.usable / GiB, 2),
            "fits": est.fits,
            "trainable_params": est.params["gate"]
            + est.params["lora"]
            + (sum(sp.arch.params() for sp in specs) if s.trainable == "full" and k == 2 else 0),
            "tokens_per_step": {
                "max": est.tokens_per_step_max,
                "avg": est.tokens_per_step_avg,
                "avg_tokens_per_sequence": min(s.avg_tokens, s.max_length),
            },
            "flops_per_step": est.flops_per_step,
            "seconds_per_step": round(est.seconds_per_step, 3),
            "steps": s.steps,
            "stage_hours": round(s.steps * est.seconds_per_step / 3600, 2),
            "throughput_assumption": {"peak_tflops": s.peak_tflops, "mfu": s.mfu},
            "fix": None,
        }
        if (
            k == 2
            and s.trainable == "full"
            and s.optimizer == "adamw"
            and min(sp.weight_bytes for sp in specs) == 2
        ):
            out["notes"].append(
                "stage 2 is planned with fp32 master weights for the 16-bit specialists (16 bytes per parameter); "
                "`ultrafuser train` today keeps AdamW states in the weights' own dtype (8 bytes, and bf16 updates "
                "smaller than 2^-8 of a weight are lost): --optimizer adamw-param-dtype plans that"
            )
        if s.sharding == "zero3" and est.micro_batch > s.micro_batch:
            out["notes"].append(
                f"stage {k}: under ZeRO-3 each GPU runs its share ({est.micro_batch} examples) as one micro-batch "
                f"(DeepSpeed steps on every backward); run with stage{k}.micro_batch={est.micro_batch}"
            )
        if not est.fits:
            fix = cheapest_fix(specs, s)
            if fix is not None:
                fe = estimate(specs, fix[1])
                entry["fix"] = {
                    "change": fix[0],
                    "total_gib": round(fe.total / GiB, 2),
                    "usable_gib": round(fe.usable / GiB, 2),
                    "gpus": fix[1].gpus,
                }
            else:
                entry["fix"] = {
                    "change": "none found up to 1024 GPUs: use smaller specialists or quantised weights"
                }
        out["stages"].append(entry)
    return out


def _fmt_n(x: float) -> str:
    return f"{x / 1e9:.2f} B" if x >= 1e9 else f"{x / 1e6:.1f} M"


def render(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=120, highlight=False, soft_wrap=True)
    con.print(f"[bold]ultrafuser plan[/] {rep['config']}  (specialists from: {rep['model_from']})")
    t = Table(title="specialists", title_justify="left")
    for c in ("domain", "path", "params", "layers", "hidden", "vocab", "context", "rope θ"):
        t.add_column(c, no_wrap=True)
    t.add_column("size from", overflow="fold")
    for sp in rep["specialists"]:
        t.add_row(
            sp["domain"],
            sp["path"],
            _fmt_n(sp["params"]),
            str(sp["layers"]),
            str(sp["hidden"]),
            str(sp["vocab"]),
            str(sp["context"]),
            f"{sp['rope_theta']:g}",
            sp["source"],
        )
    con.print(t)
    f = rep["fused"]
    con.print(
        f"fused vocabulary: the first {f['vocab']:,} ids (rows {f['vocab_rows']}: fused over the common prefix); "
        f"fused context {f['context']:,} (the smallest); data.max_length {f['max_length']:,}; "
        f"{f['domains']} domains"
    )
    what = {
        "gate": "gate only, specialists frozen (no_grad)",
        "full": "all parameters",
        "lora": "gate + LoRA",
    }
    for st in rep["stages"]:
        con.print(
            f"\n[bold]stage {st['stage']}[/]: {what[st['trainable']]}; {st['gpus']} GPU x "
            f"{st['gpu_memory_gib']:g} GiB, sharding {st['sharding']}; micro-batch {st['micro_batch']} x "
            f"{st['accumulation']} accumulation per GPU; activation checkpointing "
            f"{'on' if st['checkpointing'] else 'off'}; optimizer {st['optimizer']}"
        )
        t = Table()
        t.add_column("per GPU")
        t.add_column("GiB", justify="right")
        t.add_column("how", overflow="fold")
        for k, v in st["memory_gib"].items():
            t.add_row(k, f"{v:.2f}", st["how"].get(k, ""))
        verdict = "[green]fits[/]" if st["fits"] else "[red]does NOT fit[/]"
        t.add_row("[bold]total[/]", f"[bold]{st['total_gib']:.2f}[/]", verdict)
        t.add_row(
            "usable", f"{st['usable_gib']:.2f}", "the card less headroom (CUDA context, fragmentation, NCCL)"
        )
        con.print(t)
        tk = st["tokens_per_step"]
        ta = st["throughput_assumption"]
        con.print(
            f"  trainable parameters {_fmt_n(st['trainable_params'])}; tokens per step {tk['avg']:,} "
            f"({tk['avg_tokens_per_sequence']} tokens per sequence assumed; at most {tk['max']:,}); "
            f"{st['flops_per_step']:.3g} FLOPs per step -> ~{st['seconds_per_step']:.2f} s per step at "
            f"{ta['peak_tflops']:g} TFLOP/s x {ta['mfu']:.0%} MFU per GPU; {st['steps']} steps ~ "
            f"{st['stage_hours']:.2f} h"
        )
        if st["fix"]:
            fx = st["fix"]
            extra = (
                f" -> {fx['total_gib']:.2f} of {fx['usable_gib']:.2f} GiB per GPU"
                if "total_gib" in fx
                else ""
            )
            con.print(f"  [bold]cheapest fix:[/] {fx['change']}{extra}")
    for note in rep.get("notes", []):
        con.print(f"[yellow]note:[/] {note}")
    for p in rep["problems"]:
        con.print(f"[red]problem:[/] {p}")


def run(args) -> int:
    rep = plan(args.config, args)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        render(rep)
    bad = [st for st in rep["stages"] if not st["fits"]]
    import sys

    for st in bad:
        fx = st["fix"] or {}
        print(
            f"error: stage {st['stage']} needs {st['total_gib']:.1f} GiB per GPU but {st['usable_gib']:.1f} GiB are "
            f"usable on {st['gpus']} x {st['gpu_memory_gib']:g} GiB; cheapest fix: {fx.get('change', 'none found')}",
            file=sys.stderr,
        )
    for p in rep["problems"]:
        print(f"error: {p}", file=sys.stderr)
    return 2 if bad or rep["problems"] else 0


def report(argv: list[str]) -> dict:
    """What `ultrafuser plan ARGV --json` prints, as a dict (for scripts and tests)."""
    ap = argparse.ArgumentParser(prog="ultrafuser")
    register(ap.add_subparsers())
    args = ap.parse_args(["plan", *argv])
    return plan(args.config, args)


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="memory, fit and time of a training run, before anything downloads or allocates",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
    )
    p.add_argument("config", help="a TrainConfig YAML (e.g. configs/recipes/paper-trio/stage1.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for `ultrafuser train`"
    )
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument(
        "--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory of one GPU (default 80)"
    )
    p.add_argument("--sharding", choices=["fsdp", "zero3", "none"], help="default: none on 1 GPU, else fsdp")
    p.add_argument("--stage", type=int, choices=[1, 2], help="default: every stage with steps > 0")
    p.add_argument(
        "--throughput-tflops",
        type=float,
        default=PEAK_TFLOPS_DEFAULT,
        metavar="X",
        help=f"peak dense bf16 TFLOP/s of one GPU (default {PEAK_TFLOPS_DEFAULT:g}: H100/H200 SXM)",
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=MFU_DEFAULT,
        help=f"assumed model-FLOPs utilisation (default {MFU_DEFAULT})",
    )
    p.add_argument(
        "--avg-tokens", type=int, help="average tokens per sequence for time (default min(512, max_length))"
    )
    p.add_argument("--micro-batch", type=int, help="override the stage's micro_batch")
    p.add_argument(
        "--headroom", type=float, default=HEADROOM_DEFAULT, help="fraction of the card kept free (0.10)"
    )
    p.add_argument("--model", help="take the specialists from this TrainConfig YAML or fused-model directory")
    p.add_argument(
        "--optimizer",
        choices=["adamw", "adamw-8bit", "adamw-param-dtype"],
        default="adamw",
        help="full fine-tuning's AdamW layout: adamw = fp32 master weights + fp32 moments (16 bytes per bf16 "
        "parameter in all); adamw-8bit = 8-bit moments (what-if: TrainConfig has no optimizer field yet); "
        "adamw-param-dtype = moments in the weights' dtype, no master copy (8 bytes; what `ultrafuser train` "
        "does today with bf16 specialists under FSDP or on one GPU)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.set_defaults(func=run)


__all__ = [
    "Arch",
    "KNOWN_ARCHITECTURES",
    "SpecInfo",
    "Setting",
    "Estimate",
    "estimate",
    "cheapest_fix",
    "resolve_arch",
    "plan",
    "report",
    "register",
]
