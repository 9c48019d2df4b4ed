"""Evaluation: tasks, scorers and the sandbox that runs model-written code.

- `sandbox`: `run_program` - the only place in UltraFuser that executes model-written code.
- `code`: HumanEval in instruction form, code extraction, pass@k, scoring samples in the sandbox.
- `mathans`: final-answer extraction and equivalence for GSM8K, MATH, SAT-Math and AQuA.
- `cli`: `ultrafuser eval ...` (today `eval score`).

Submodules are imported on use: importing `ultrafuser.eval` stays cheap.
"""
