"""End-to-end training on tiny models: the loss goes down, the output loads, NaN stops, the stage-1 cache
is exact, the data is read and length-limited as documented, configs fail clearly."""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from trainkit import make_records, read_jsonl, run_inproc, train_config

from ultrafuser.config import ConfigError, DataConfig, TrainConfig, load_yaml
from ultrafuser.data.loading import load_training_data
from ultrafuser.modeling.fused import FusedModel, fused_loss
from ultrafuser.training.loop import EXIT_NONFINITE, token_ce


def train_loss(model_dir, data_file) -> float:
    model = FusedModel.from_pretrained(model_dir)
    data = load_training_data(DataConfig(train=[data_file], max_length=128), model.align, model.domains)
    exs = [e.aligned() for d in data.domains for e in data.examples[d]]
    with torch.no_grad():
        return float(model(model.collate(exs)).loss)


def test_step_loss_is_the_fused_token_mean(fused_dir):
    model = FusedModel.from_pretrained(fused_dir)
    batch = model.collate([model.align([m.model_dump() for m in r.messages]) for r in make_records()[:5]])
    out = model(batch)
    ce = token_ce(out.logits, batch.labels)
    n = (batch.labels != -100).sum()
    assert torch.allclose(ce.sum() / n, out.loss, rtol=1e-6, atol=0)
    assert torch.allclose(out.loss, fused_loss(out.logits, batch.labels))


def test_short_run_lowers_the_loss_and_writes_a_loadable_fused_dir(tmp_path, shared_dir, data_file, capsys):
    """Stage 1 + stage 2 (full) on a shared-base group (text = base, code/math = LoRA on it)."""
    out = tmp_path / "run"
    cfg = train_config(out, shared_dir, data_file, stage1__steps=4, stage2__steps=5, stage2__trainable="full",
                       stage2__lr=3e-3, save_every=100)
    before = train_loss(shared_dir, data_file)
    assert run_inproc(cfg) == 0
    after = train_loss(out / "final", data_file)
    assert after < before - 0.05, (before, after)
    # the fused dir points inside itself, relatively, and holds exactly what was trained
    meta = json.loads((out / "final" / "ultrafuser.json").read_text())
    assert [(s["path"], s["adapter"]) for s in meta["config"]["specialists"]] == [
        ("./specialists/text", None), ("./specialists/text", "./adapters/code"), ("./specialists/text", "./adapters/math")]
    ckpt = load_file(str(out / "checkpoints" / "step-00000009" / "model.safetensors"))
    reloaded = dict(FusedModel.from_pretrained(out / "final").named_parameters())
    assert set(reloaded) == set(ckpt)
    assert all(torch.equal(reloaded[k], ckpt[k]) for k in ckpt)
    m = read_jsonl(out / "metrics.jsonl")
    assert [x["stage"] for x in m] == [1] * 4 + [2] * 5
    assert set(m[0]["gate"]) == {"text", "code", "math"} and math.isclose(sum(m[0]["gate"]["code"].values()), 1.0, rel_tol=1e-6)
    assert (out / "config.yaml").is_file() and (out / "stage1" / "gate.safetensors").is_file()
    # the FSDP / ZeRO-3 export path (from gathered full weights into a fresh CPU model) writes the same model
    from ultrafuser.training.loop import export_from_state

    other = cfg.model_copy(update={"output_dir": str(tmp_path / "gathered")})
    export_from_state(other, 2, {k: v.detach().clone() for k, v in reloaded.items()}, shared_dir, {})
    again = dict(FusedModel.from_pretrained(tmp_path / "gathered" / "final").named_parameters())
    assert set(again) == set(ckpt) and all(torch.equal(again[k], ckpt[k]) for k in ckpt)
    from ultrafuser.cli import main

    capsys.readouterr()
    assert main(["generate", str(out / "final"), "--prompt", "hi", "--max-new-tokens", "3", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert 1 <= len(lines) <= 3 and set(lines[0]) == {"id", "text", "weights"}


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_stops_the_run_naming_step_stage_and_examples(tmp_path, fused_dir, data_file, monkeypatch, caplog,
                                                                  where):
    out = tmp_path / "run"
    monkeypatch.setenv("ULTRAFUSER_FAULT", f"{where}@2=nan")
    assert run_inproc(train_config(out, fused_dir, data_file)) == EXIT_NONFINITE
    msg = caplog.text
    assert f"non-finite {'loss' if where == 'loss' else 'gradient'} at step 2 (stage 1)" in msg
    ids = read_jsonl(out / "samples.jsonl")[0]["ids"]  # step 1's ids are logged; step 2's are named in the error
    assert "examples" in msg and any(len(x) == 24 for x in msg.replace("'", " ").split())
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1] and ids
    for c in (out / "checkpoints").iterdir():
        for f in c.glob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(str(f)).values() if t.is_floating_point())


def test_stage1_hidden_state_cache_gives_the_same_losses(tmp_path, fused_dir, data_file, caplog):
    caplog.set_level(logging.INFO, logger="ultrafuser.training")
    common = {"stage1__steps": 5, "stage2__steps": 0, "save_every": 100}
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert run_inproc(train_config(plain, fused_dir, data_file, **common)) == 0
    assert run_inproc(train_config(cached, fused_dir, data_file, stage1__cache_hidden_states=True, **common)) == 0
    a, b = read_jsonl(plain / "metrics.jsonl"), read_jsonl(cached / "metrics.jsonl")
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5), (x["loss"], y["loss"])
        for d in x["gate"]:
            for s in x["gate"][d]:
                assert math.isclose(x["gate"][d][s], y["gate"][d][s], rel_tol=1e-5)
    assert "reuses" in caplog.text and "stage 1 cache" in caplog.text


def test_data_from_jsonl_parquet_and_a_saved_dataset_is_the_same(tmp_path, fused_dir):
    pytest.importorskip("pyarrow")
    import datasets

    from ultrafuser.data.records import write_records

    recs = make_records(counts=(3, 2, 2))
    write_records(recs, tmp_path / "a.jsonl")
    write_records(recs, tmp_path / "a.parquet")
    datasets.load_dataset("parquet", data_files=str(tmp_path / "a.parquet"), split="train").save_to_disk(str(tmp_path / "ds"))
    model = FusedModel.from_pretrained(fused_dir)
    got = [load_training_data(DataConfig(train=[str(tmp_path / x)], max_length=128), model.align, model.domains)
           for x in ("a.jsonl", "a.parquet", "ds")]
    assert got[0].hash == got[1].hash == got[2].hash
    for g in got[1:]:
        for d in g.domains:
            assert [e.id for e in g.examples[d]] == [e.id for e in got[0].examples[d]]
            assert all((a.targets == b.targets).all() for a, b in zip(g.examples[d], got[0].examples[d]))


def test_too_long_examples_are_counted_and_never_cut_inside_a_reply(fused_dir):
    model = FusedModel.from_pretrained(fused_dir)
    recs = make_records(counts=(6, 6, 6), multi_turn_every=1)  # every conversation has 2 turns
    lengths = {r.id: max(model.align([m.model_dump() for m in r.messages]).lengths) for r in recs}
    first_turn = {r.id: max(model.align([m.model_dump() for m in r.messages[:2]]).lengths) for r in recs}
    limit = sorted(lengths.values())[len(lengths) // 2]
    import tempfile

    from ultrafuser.data.records import write_records

    with tempfile.TemporaryDirectory() as d:
        write_records(recs, f"{d}/x.jsonl")
        drop = load_training_data(DataConfig(train=[f"{d}/x.jsonl"], max_length=limit), model.align, model.domains)
        trunc = load_training_data(DataConfig(train=[f"{d}/x.jsonl"], max_length=limit, too_long="truncate_turns"),
                                   model.align, model.domains)
    too_long = [i for i, n in lengths.items() if n > limit]
    assert sum(drop.report.too_long_dropped.values()) == len(too_long) > 0
    assert sum(drop.report.kept.values()) == len(recs) - len(too_long)
    assert "dropped" in drop.report.summary()
    fits_cut = [i for i in too_long if first_turn[i] <= limit]
    assert sum(trunc.report.truncated.values()) == len(fits_cut)
    by_id = {e.id: e for d in trunc.domains for e in trunc.examples[d]}
    rec = {r.id: r for r in recs}
    for i in fits_cut:  # cut to whole turns: exactly the first turn's alignment, its reply complete
        want = model.align([m.model_dump() for m in rec[i].messages[:2]])
        assert by_id[i].targets.tolist() == want.targets
        assert by_id[i].max_len <= limit


def test_bf16_autocast_runs_on_cpu(tmp_path, fused_dir, data_file):
    out = tmp_path / "run"
    cfg = train_config(out, fused_dir, data_file, precision="bf16", stage1__steps=1, stage2__steps=1, save_every=100)
    assert run_inproc(cfg) == 0
    m = read_jsonl(out / "metrics.jsonl")
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m)


def test_cli_train_runs_and_reports_errors_with_exit_code_2(tmp_path, fused_dir, data_file, capsys):
    from ultrafuser.cli import main

    p = tmp_path / "run.yaml"
    p.write_text(f"model: {fused_dir}\ndata: {{train: [{data_file}], max_length: 128}}\noutput_dir: {tmp_path}/o\n"
                 "precision: fp32\nstage1: {steps: 1, per_domain: 2}\n")
    assert main(["train", str(p), "stage1.micro_batch=3", "log_every=1"]) == 0
    assert (tmp_path / "o" / "final" / "ultrafuser.json").is_file()
    assert "micro_batch: 3" in (tmp_path / "o" / "config.yaml").read_text()  # the resolved config, overrides applied
    capsys.readouterr()
    assert main(["train", str(p), f"output_dir={tmp_path}/fresh", "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["train", str(p), "stage1.bogus=1"]) == 2
    assert "stage1.bogus: unknown key" in capsys.readouterr().err


def test_config_errors_are_clear(tmp_path, fused_dir, data_file):
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {fused_dir}\ndata: {{train: {data_file}}}\noutput_dir: {tmp_path}/o\nstage1: {{stepz: 3}}\n")
    with pytest.raises(ConfigError, match=r"stage1\.stepz: unknown key"):
        load_yaml(p, TrainConfig)
    cfg = load_yaml(p, TrainConfig, ["stage1={steps: 3}"])
    assert cfg.stage1.per_domain == 64 and cfg.stage1.lr == 2e-5 and cfg.stage2.per_domain == 32  # paper defaults
    from ultrafuser.data.sampler import SamplerError

    # the tiny data has 4 math records, one of which is longer than max_length=128 and dropped
    with pytest.raises(SamplerError, match=r"stage1\.per_domain=5 .*'math' has 3"):
        run_inproc(train_config(tmp_path / "o", fused_dir, data_file, stage1__per_domain=5))
    with pytest.raises(ConfigError, match="context length"):
        run_inproc(train_config(tmp_path / "o2", fused_dir, data_file, data__max_length=4096))
