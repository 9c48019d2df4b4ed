"""Tiny random models and tokenizers for tests: real Hugging Face classes, built in seconds, no network."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "Tom has 3 apples and buys 4 more. How many apples does he have? The answer is 7.",
    "import math\nprint(math.sqrt(16))\nfor i in range(10):\n    x = i * 2\n",
    "User: Assistant: ### Instruction: ### Response: [INST] [/INST] system user assistant",
    "Write a function that returns the sum of a list. Explain photosynthesis in simple words.",
    "0 1 2 3 4 5 6 7 8 9 10 12 24 48 100 1000 + - * / = ( ) [ ] { } : ; , . ! ? ' \"",
]


def make_tokenizer(extra_tokens: int = 0, vocab_size: int = 300, corpus_extra: tuple = ()):
    """A byte-level BPE tokenizer with ChatML specials; `extra_tokens` appends tokens at the end (like
    CodeLlama's 16 infilling tokens on top of Llama-2's 32000); `corpus_extra` changes the merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 3 + list(corpus_extra) * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML
    if extra_tokens:
        fast.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    return fast


def make_llama(out_dir, tokenizer, seed: int, hidden: int = 32, layers: int = 2, vocab_rows: int | None = None,
               max_positions: int = 256, tie: bool = False, bias: bool = False):
    """Save a tiny random LlamaForCausalLM (+ tokenizer) to `out_dir`; return the path. bias: random q/k/v/o and
    MLP biases (the Qwen2-style layout the fast path also reads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_rows or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default init so specialists differ visibly
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith(".bias"):
                p.normal_(0, 0.2)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def make_lora(base_dir, out_dir, seed: int, r: int = 4, targets=("q_proj", "v_proj", "up_proj")):
    """A random (non-zero) PEFT LoRA adapter on a tiny base; return the adapter path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    peft.save_pretrained(out_dir, safe_serialization=True)
    return str(out_dir)
