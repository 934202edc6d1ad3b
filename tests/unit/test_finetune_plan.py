"""The finetune stage's driver-side decisions, without Ray: data checks, held-out split, scheduling, resume."""

from __future__ import annotations

import pytest

from bootfinetune.config import TrainConfig
from bootfinetune.errors import FinetuneError
from bootfinetune.stages.export import _timings
from bootfinetune.stages.finetune_job import FinetuneJob, load_job_data, split_records
from bootfinetune.stages.fingerprints import finished_manifest
from bootfinetune.stages.train_runs import fits, lane_resources
from bootfinetune.run.jsonio import write_json, write_jsonl
from bootfinetune.run.rundir import RunDir
from bootfinetune.training.checkpoints import best_epoch
from bootfinetune.testing.tiny_models import toy_records


def test_split_is_seeded_disjoint_and_keeps_training_data():
    records = [{"i": i} for i in range(50)]
    train, held = split_records(records, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert sorted(r["i"] for r in train + held) == list(range(50))
    assert split_records(records, 0.1, seed=3) == (train, held) and split_records(records, 0.1, seed=4) != (train, held)
    assert split_records(records[:3], 0.1, seed=0)[1] != []  # at least one held out
    assert split_records(records, 0.0, seed=0) == (records, [])


def test_bad_data_fails_naming_the_key(tmp_path):
    config = TrainConfig()
    write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(FinetuneError, match=r"model 'a'.*line 1.*assistant"):
        load_job_data(FinetuneJob("a", "t", ("p",), tmp_path / "a.jsonl"), config)
    with pytest.raises(FinetuneError, match=r"model 'b'.*does not exist"):
        load_job_data(FinetuneJob("b", "t", ("p",), tmp_path / "missing.jsonl"), config)
    write_jsonl(tmp_path / "c.jsonl", toy_records(20))
    write_jsonl(tmp_path / "v.jsonl", toy_records(4, seed=1))
    train, evals, source = load_job_data(FinetuneJob("c", "t", ("p",), tmp_path / "c.jsonl", tmp_path / "v.jsonl"), config)
    assert (len(train), len(evals), source) == (20, 4, "valset")
    train, evals, source = load_job_data(FinetuneJob("c", "t", ("p",), tmp_path / "c.jsonl"), config)
    assert (len(train), len(evals), source) == (18, 2, "held_out")


def test_jobs_fit_side_by_side_only_while_resources_last():
    need = lane_resources(TrainConfig(num_workers=2, cpus_per_worker=1.0))
    assert need == {"CPU": 2.0}
    assert fits(need, {"CPU": 8.0}) and fits(need, {"CPU": 2.0}) and not fits(need, {"CPU": 1.5})
    gpu = lane_resources(TrainConfig(num_workers=4, use_gpu=True, gpus_per_worker=1.0, cpus_per_worker=2.0))
    assert gpu == {"CPU": 8.0, "GPU": 4.0} and not fits(gpu, {"CPU": 16.0}) and fits(gpu, {"CPU": 16.0, "GPU": 4.0})
    labelled = lane_resources(TrainConfig(num_workers=2, resources_per_worker={"accel": 1}))
    assert labelled == {"CPU": 2.0, "accel": 2} and not fits(labelled, {"CPU": 8.0})


def test_best_epoch_is_lowest_eval_loss_else_last():
    history = [{"epoch": 1, "eval_loss": 2.0}, {"epoch": 2, "eval_loss": 1.5}, {"epoch": 3, "eval_loss": 1.7}]
    assert best_epoch(history) == 2
    assert best_epoch([{"epoch": 1, "eval_loss": None}, {"epoch": 2, "eval_loss": None}]) == 2


def test_manifest_counts_as_finished_only_for_the_same_data_and_options(tmp_path):
    from bootfinetune.stages.fingerprints import job_fingerprint

    run = RunDir(tmp_path / "run")
    write_jsonl(run.data_file("all"), toy_records(10))
    job = FinetuneJob("all", "target", ("p",), run.data_file("all"))
    config = TrainConfig(epochs=2)
    assert finished_manifest(run, job, config) is None
    write_json(run.model_dir("all") / "manifest.json", {"key": "all", "job_fingerprint": job_fingerprint(job, config)})
    assert finished_manifest(run, job, config).key == "all"
    assert finished_manifest(run, job, TrainConfig(epochs=3)) is None
    assert finished_manifest(run, job, TrainConfig(epochs=2, max_failures=5, cpus_per_worker=4.0)) is not None
    write_jsonl(run.data_file("all"), toy_records(11))
    assert finished_manifest(run, job, config) is None


def test_timings_take_ray_trains_start_and_end_from_this_fit_only():
    """A fit whose loop found every epoch done (a driver killed after training, before the export) returns the
    state an earlier fit wrote: its loop start and last report are from before this fit and say nothing of it."""
    history = [{"train_seconds": 3.0}, {"train_seconds": 4.0}]
    loop = {"loop_started_at": 1012.0, "setup_seconds": 2.0, "eval_seconds": 1.5, "checkpoint_seconds": 0.2,
            "reported_at": 1030.0}
    fresh = _timings({"timings": loop, "history": history, "starts": [{"epoch": 0}]}, 1000.0, 31.0, 1.0)
    assert fresh == {"fit_seconds": 31.0, "train_seconds": 7.0, "export_seconds": 1.0, "setup_seconds": 2.0,
                     "checkpoint_seconds": 0.2, "eval_seconds": 1.5, "ray_train_start_seconds": 12.0,
                     "ray_train_end_seconds": 1.0}
    later = _timings({"timings": loop, "history": history, "starts": [{"epoch": 0}]}, 5000.0, 9.0, 1.0)
    assert "ray_train_start_seconds" not in later and "ray_train_end_seconds" not in later
    resumed = _timings({"timings": loop, "history": history, "starts": [{"epoch": 0}, {"epoch": 1}]}, 1000.0, 31.0, 1.0)
    assert "ray_train_start_seconds" not in resumed and resumed["ray_train_end_seconds"] == 1.0

