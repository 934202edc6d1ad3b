"""Finetuning on a local Ray cluster: 2 CPU workers, tiny models, ZeRO-2 and ZeRO-3, failures and resumes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from bootfinetune.config import TrainConfig
from bootfinetune.errors import FinetuneError
from bootfinetune.stages.finetune import finetune_models
from bootfinetune.stages.finetune_job import FinetuneJob, split_records
from bootfinetune.run.jsonio import read_json, read_jsonl, write_jsonl
from bootfinetune.training.render import collate, encode_prompt, encode_records
from bootfinetune.run.rundir import RunDir
from bootfinetune.testing.faults import FailOnce
from bootfinetune.testing.tiny_models import build_tiny_causal, build_tiny_t5, toy_records

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MANIFEST_FIELDS = {"key", "target", "predictors", "model_kind", "renderer", "data_hash", "epochs", "losses",
                   "best_epoch", "best_eval_loss", "eval_loss_before", "tokens_seen", "seconds", "truncated",
                   "starts", "history"}
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "manifest.json"}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    return {"llama": str(build_tiny_causal(root / "llama")),
            "gpt2": str(build_tiny_causal(root / "gpt2", arch="gpt2", chat_template=False)),
            "t5": str(build_tiny_t5(root / "t5"))}


def make_job(run: RunDir, key: str, target: str, n: int = 64, seed: int = 0) -> FinetuneJob:
    write_jsonl(run.data_file(key), toy_records(n, seed=seed, predictor=key))
    return FinetuneJob(key=key, target=target, predictors=(key,), train_file=run.data_file(key))


def options(target: str, **kw) -> TrainConfig:
    base = dict(target=target, bsize=8, lr=3e-3, epochs=2, max_length=256, num_workers=2, cpus_per_worker=1.0,
                eval_fraction=0.1, max_failures=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def gpt2_run(ray_cluster, targets, tmp_path_factory):
    """GPT-2-like (tied embeddings, no chat template), ZeRO-2, 2 workers: trained once, used by two tests."""
    run = RunDir(tmp_path_factory.mktemp("gpt2-run") / "run")
    job = make_job(run, "all", targets["gpt2"])
    config = options(targets["gpt2"], zero_stage=2)
    return run, job, config, finetune_models(run, [job], config)["all"].to_json()


def check_export(run: RunDir, job: FinetuneJob, config: TrainConfig, manifest: dict, kind: str) -> None:
    """The manifest is complete, the loss fell, and the export loads, generates and reproduces the eval loss."""
    assert MANIFEST_FIELDS <= set(manifest)
    assert manifest["engine"]["zero_stage"] == config.zero_stage and "given" in manifest["engine"]["reason"]
    timings = manifest["timings"]
    parts = ("ray_train_start_seconds",) * (len(manifest["starts"]) == 1) + (
        "setup_seconds", "train_seconds", "eval_seconds", "checkpoint_seconds", "ray_train_end_seconds")
    assert set(parts) | {"fit_seconds", "export_seconds"} <= set(timings), timings
    assert all(timings[k] >= 0 for k in parts) and sum(timings[k] for k in parts) <= timings["fit_seconds"] + 0.1, timings
    assert timings["train_seconds"] > 0 and timings["eval_seconds"] > 0 and timings["ray_train_end_seconds"] > 0
    assert manifest["model_kind"] == kind and manifest["predictors"] == list(job.predictors)
    assert manifest["renderer"]["kind"] == kind and manifest["world_size"] == 2
    assert len(manifest["losses"]["train"]) == len(manifest["losses"]["eval"]) == config.epochs
    assert manifest["losses"]["eval"][-1] < 0.85 * manifest["eval_loss_before"]
    assert manifest["losses"]["train"][-1] < manifest["losses"]["train"][0]
    assert manifest["tokens_seen"]["answer"] > 0 and manifest["tokens_seen"]["total"] > manifest["tokens_seen"]["answer"]
    assert 0 < manifest["answer_tokens_max"] <= config.max_length  # serving's max_tokens ceiling comes from it
    truncated = manifest["truncated"]
    assert {k: truncated[k] for k in ("train", "eval", "max_length")} == {"train": 0, "eval": 0,
                                                                          "max_length": config.max_length}
    # inference cuts causal prompts to the room training left beside a typical answer; seq2seq prompts
    # have the encoder to themselves
    if kind == "causal":
        assert 0 < truncated["prompt_max_length"] < config.max_length
    else:
        assert truncated["prompt_max_length"] == config.max_length
    best = manifest["best_epoch"]
    assert manifest["best_eval_loss"] == min(manifest["losses"]["eval"]) == manifest["losses"]["eval"][best - 1]

    out = run.model_dir(job.key)
    files = {p.name for p in out.iterdir()}
    assert EXPORT_FILES <= files and not any(f.endswith(".bin") for f in files)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)

    # The exported weights are the best epoch's: they give the eval loss the workers measured.
    _, held_out = split_records(read_jsonl(job.train_file), config.eval_fraction, config.seed)
    encoded, _ = encode_records(tokenizer, held_out, kind, config.max_length)
    batch = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        loss = float(model(**batch).loss)
    assert loss == pytest.approx(manifest["best_eval_loss"], rel=1e-3)

    prompt = encode_prompt(tokenizer, held_out[0]["messages"][:-1], kind)
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert generated.shape[1] >= (7 if kind == "causal" else 2)


def test_causal_zero2_two_workers_trains_and_exports(gpt2_run):
    run, job, config, manifest = gpt2_run
    check_export(run, job, config, manifest, "causal")
    assert manifest["starts"] == [{"epoch": 0, "global_step": 0}]
    assert manifest["renderer"]["template"] == "fixed"
    assert read_json(run.model_dir("all") / "manifest.json") == manifest
    assert (run.checkpoints_dir() / "all" / f"epoch_{manifest['best_epoch']:03d}").is_dir()
    model = AutoModelForCausalLM.from_pretrained(run.model_dir("all"))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied weights exported once


def test_rerun_of_a_finished_key_trains_nothing(gpt2_run):
    run, job, config, manifest = gpt2_run
    weights = run.model_dir("all") / "model.safetensors"
    before = (weights.stat().st_mtime_ns, sorted(p.name for p in (run.checkpoints_dir() / "all").iterdir()))
    started = time.time()
    again = finetune_models(run, [job], config)["all"].to_json()
    assert again == manifest
    assert time.time() - started < 5
    assert (weights.stat().st_mtime_ns, sorted(p.name for p in (run.checkpoints_dir() / "all").iterdir())) == before


def test_seq2seq_zero3_worker_failure_resumes_from_the_epoch_checkpoint(ray_cluster, targets, tmp_path):
    """T5 under ZeRO-3; the last rank's process is SIGKILLed mid epoch 2 and the group restarts from epoch 1's checkpoint."""
    run = RunDir(tmp_path / "run")
    job = make_job(run, "all", targets["t5"])
    config = options(targets["t5"], zero_stage=3, max_failures=1)
    marker = tmp_path / "failed-once"
    manifest = finetune_models(run, [job], config, hooks={"all": {"on_step": FailOnce(str(marker))}})["all"].to_json()
    assert marker.exists()  # the hook did fire
    steps = manifest["history"][0]["steps"]
    assert manifest["starts"] == [{"epoch": 0, "global_step": 0}, {"epoch": 1, "global_step": steps}]
    assert [h["epoch"] for h in manifest["history"]] == [1, 2]
    check_export(run, job, config, manifest, "seq2seq")
    model = AutoModelForSeq2SeqLM.from_pretrained(run.model_dir("all"))
    assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()  # T5's tied embeddings survive


def test_keys_share_one_run_and_a_failing_key_loses_no_other(ray_cluster, targets, tmp_path):
    """Three keys in one lane (one worker group, one after another); the middle one cannot load its model.
    Each key's worker asks for more than half the cluster, so no two could train side by side: they are queued
    in the lane, not failed. The first and the third are trained and exported, the failure names the middle one only."""
    run = RunDir(tmp_path / "run")
    broken = tmp_path / "broken"
    shutil.copytree(targets["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    jobs = [make_job(run, "first", targets["llama"], n=32), make_job(run, "bad", str(broken), n=32),
            make_job(run, "third", targets["llama"], n=32, seed=1)]
    cpus = ray_cluster.cluster_resources()["CPU"]
    config = options(targets["llama"], epochs=2, num_workers=1, cpus_per_worker=cpus * 0.6, max_failures=0)
    with pytest.raises(FinetuneError, match="'bad'") as err:
        finetune_models(run, jobs, config)
    assert str(err.value).split("failed for model key(s) ")[1].startswith("['bad']:")
    first, third = (read_json(run.model_dir(k) / "manifest.json") for k in ("first", "third"))
    assert not (run.model_dir("bad") / "manifest.json").exists()
    # one start of the first key's run; the third key ran in the run that followed the failure
    assert first["starts"] == third["starts"] == [{"epoch": 0, "global_step": 0}]
    assert third["started_at"] >= first["finished_at"] - 1.0
    for manifest in (first, third):  # each key kept its own best and latest epochs, and exported its best
        kept = sorted(p.name for p in (run.checkpoints_dir() / manifest["folder"]).glob("epoch_*"))
        assert kept == sorted({f"epoch_{manifest['best_epoch']:03d}", "epoch_002"})
        assert manifest["best_eval_loss"] == min(manifest["losses"]["eval"])
