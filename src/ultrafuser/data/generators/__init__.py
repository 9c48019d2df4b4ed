"""Offline generators for the embedded default (no teacher needed), in the record format:

- `math_problems.generate_math`: grade-school multi-step word problems with step-by-step solutions and exact
  answers, each checked by an independent recomputation (`check_math_record`);
- `code_tasks.generate_code`: Python function tasks (HumanEval-style prompt, unit tests, reference solution).

Both are deterministic given (n, seed, split, held-out families) and keep some template families for held-out
evaluation only (`--split heldout`).
"""
