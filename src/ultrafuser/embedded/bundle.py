"""The embedded default's bundled math and code data (train / held-out), from the project's generators.

    ultrafuser embedded build-data --out data/embedded

Held-out sets use another seed and share no problem with the training sets (exact question / task match is
removed: the generators are templated, so a 13-gram filter would remove every problem of a family, which
is not what "held out" means here). They are in-distribution: the same template families as training.
Deterministic: the same command writes byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

SIZES = {"math": (1200, 60), "code": (800, 40)}


def build(out_dir: str, seed: int = 1) -> dict:
    from ultrafuser.data.generators.code_tasks import generate_code
    from ultrafuser.data.generators.math_problems import generate_math
    from ultrafuser.data.records import write_records

    gens = {"math": generate_math, "code": generate_code}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for domain, (n_train, n_held) in SIZES.items():
        train = gens[domain](n_train, seed=seed, split="train", held_out_templates=[])
        seen = {r.messages[0].content if hasattr(r.messages[0], "content") else r.messages[0]["content"] for r in train}
        held_pool = gens[domain](n_held * 2, seed=seed + 1000, split="train", held_out_templates=[])
        held = [r for r in held_pool if _question(r) not in seen][:n_held]
        write_records(train, out / f"{domain}-train.jsonl")
        write_records(held, out / f"{domain}-heldout.jsonl")
        counts[domain] = {"train": len(train), "heldout": len(held), "held_out_removed_as_seen": n_held * 2 - len(
            [r for r in held_pool if _question(r) not in seen])}
    return counts


def _question(r) -> str:
    m = r.messages[0]
    return m.content if hasattr(m, "content") else m["content"]
