"""Training a fused model (paper §2): stage 1 trains the gate, stage 2 the gate and the specialists.

- `loop`        the run, top to bottom: `run(TrainConfig)` and one optimizer step
- `stages`      what trains in each stage (declared, applied, asserted); LoRA adapters for stage 2
- `optim`       AdamW, cosine schedule with warm-up, precision
- `cache`       stage 1's cache of the frozen specialists' hidden states
- `checkpoint`  safetensors + JSON checkpoints: atomic, verified, rotated; exact resume
- `metrics`     the step log line, metrics.jsonl, samples.jsonl, progress bar, TensorBoard
- `export`      the trained fused-model directory
- `faults`      SIGTERM flag and fault injection for tests
- `cli`         `ultrafuser train CONFIG [key=value ...] [--resume] [--force]`

Data comes in through `ultrafuser.data.loading` and is drawn by `ultrafuser.data.sampler`.
"""
