"""The run directory's typed records: versions, old files, round trips, the report's merge."""

import json

import pytest

from bootfinetune.run.jsonio import read_json, write_json
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import (RUN_FILES_VERSION, BootstrapSummary, JobStamp, ModelManifest, RunDescription,
                                   RunFileError, RunReport, read_record)


def test_files_without_a_version_load_as_before_and_are_written_with_one(tmp_path):
    run = RunDir(tmp_path / "R-1")
    # config.json and manifest.json as bootfinetune wrote them before records had versions
    write_json(run.config_json, {"program_class": "m:P", "options": {"train": {"lr": 1e-3}, "run": {}},
                                 "model_keys": {"all": {"target": "t", "predictors": ["a", "b.predict"]}}})
    write_json(run.manifest_json("all"), {"key": "all", "best_epoch": 2, "losses": {"train": [1.0, 0.5], "eval": [0.9, 0.7]},
                                          "truncated": {"max_length": 256}, "some_new_key": [1]})
    described = run.read_description()
    assert described.program_class == "m:P" and described.inputs is None and described.provider is None
    assert described.flat_options() == {"lr": 1e-3}
    assert described.key_of() == {"a": "all", "b.predict": "all"}
    manifest = run.read_manifest("all")
    assert (manifest.best_epoch, manifest.prompt_max_length(), manifest.eval_hash) == (2, 256, None)
    assert run.finished_models() == {"all": manifest} and run.read_manifest("other") is None
    run.write_manifest(manifest)
    written = read_json(run.manifest_json("all"))
    assert written["version"] == RUN_FILES_VERSION and written["some_new_key"] == [1]  # unknown keys kept
    assert read_record(ModelManifest, run.manifest_json("all")) == manifest


@pytest.mark.parametrize("record", [RunDescription, ModelManifest, RunReport, BootstrapSummary])
def test_a_newer_version_names_the_file_and_the_fix(tmp_path, record):
    path = tmp_path / "file.json"
    path.write_text(json.dumps({"version": RUN_FILES_VERSION + 1}))
    fix = r"upgrade bootfinetune from where you installed it \(a checkout: git pull, then pip install -e \.\)"
    with pytest.raises(RunFileError, match=rf"{path}: .*version {RUN_FILES_VERSION + 1}.*{fix}"):
        read_record(record, path)
    path.write_text("[1, 2]")
    with pytest.raises(RunFileError, match=r"must hold a JSON object"):
        read_record(record, path)


def test_records_round_trip_in_the_files_key_order():
    manifest = ModelManifest(key="k", target="t", best_epoch=1, losses={"train": [2.0], "eval": [None]})
    data = manifest.to_json()
    assert list(data)[:4] == ["version", "key", "target", "predictors"]
    assert ModelManifest.from_json(json.loads(json.dumps(data))) == manifest
    summary = BootstrapSummary(examples=3, kept=2, nodes={"n1": 3})
    assert BootstrapSummary.from_json(summary.to_json()) == summary
    described = RunDescription(provider="RayFinetuneProvider", base_model="/m", records=4)
    assert RunDescription.from_json(described.to_json()) == described


def test_the_report_merges_sections_one_level_deep_and_leaves_unset_ones_out(tmp_path):
    run = RunDir(tmp_path / "R-2")
    assert run.read_report() == RunReport()
    run.update_report(stages={"bootstrap": {"kept": 2}, "data": {"tokens": {"all": {"added_tokens": ["\n"]}}}})
    assert "metric" not in read_json(run.report_json) and "retrained_from" not in read_json(run.report_json)
    report = run.update_report(metric={"after": 0.5}, stages={"finetune": {"seconds": 1.0}}, note="kept")
    assert list(report.stages) == ["bootstrap", "data", "finetune"] and report.metric == {"after": 0.5}
    assert report.data_tokens("all") == ("\n",) and report.data_tokens("other") is None
    assert read_json(run.report_json)["note"] == "kept" and run.read_report() == report


def test_config_json_is_written_through_one_door_that_redacts_every_uri(tmp_path):
    """Issue 30 (4): whatever a writer puts in the record (a provider's raw options, a retrain's resource
    options), config.json holds no URI credential; the record itself keeps what it was given."""
    from bootfinetune.config import Config
    from bootfinetune.run.rundir import RunDir

    storage = "s3://AKIA-door-1:door/secret/2@bucket/runs?endpoint_override=minio:door-pw-3@h:9&scheme=http"
    options = Config.from_options(storage_path=storage, mlflow_tracking_uri="https://u:door-token-4@mlflow/x",
                                  ray_address="ray://admin:door-pw-5@head:10001").to_dict()
    described = RunDescription(options={"train": options["train"], "run": options["run"]},
                               model_keys={"all": {"target": "/m", "predictors": ["lm"]}},
                               extra={"note": "pulled from https://v:door-token-6@host/x"})
    run = RunDir(tmp_path / "Provider-1")
    run.write_description(described)
    text = run.config_json.read_text()
    for secret in ("door-1", "door/secret/2", "door-pw-3", "door-token-4", "door-pw-5", "door-token-6"):
        assert secret not in text, secret
    written = json.loads(text)["options"]["run"]
    assert written["storage_path"] == "s3://***@bucket/runs?endpoint_override=***@h:9&scheme=http"
    assert written["ray_address"] == "ray://***@head:10001"
    assert described.options["run"]["storage_path"] == storage  # the record keeps what it was given


def test_run_files_reach_the_disk_before_their_rename_and_the_rename_after(tmp_path, monkeypatch):
    """Issue 30 (8): a power cut never leaves an empty manifest: the file is fsynced before the rename, its folder after."""
    import os
    import stat

    from bootfinetune.run.jsonio import write_json

    synced, real = [], os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "run" / "models" / "all" / "manifest.json"
    write_json(path, {"key": "all"})
    assert synced == [("file", path.stat().st_ino), ("folder", path.parent.stat().st_ino)]


def test_the_run_directory_reads_back_each_file_it_writes(tmp_path):
    """program.json, an evaluation, a bootstrap, a key's data and its checkpoints' stamp, each through `RunDir`,
    in the files' formats (the stamp holds no version)."""
    run = RunDir(tmp_path / "R-1")
    run.write_program({"p": {"demos": []}})
    assert run.read_program() == {"p": {"demos": []}} and run.program_json.exists()
    run.write_evaluation("../held out", {"score": 0.5})
    file = run.read_report().evaluations["../held out"]
    assert read_json(run.path("evaluations", file)) == {"score": 0.5, "name": "../held out"}
    assert run.read_bootstrap("train") is None
    run.write_bootstrap("train", [{"example_index": 0}], [], BootstrapSummary(examples=1, kept=1))
    calls, failures, summary = run.read_bootstrap("train")
    assert (list(calls), list(failures), summary.kept) == ([{"example_index": 0}], [], 1)
    run.forget_bootstrap("train")
    assert run.read_bootstrap("train") is None and run.bootstrap_file("train", "calls.jsonl").exists()
    assert run.write_data("all", [{"messages": []}] * 3, "val") == 3 and run.data_file("all", "val").exists()
    assert run.read_job_stamp("all") is None
    run.write_job_stamp(JobStamp(job_fingerprint="abc", key="all", target="t"))
    assert read_json(run.checkpoint_dir("all") / "bootfinetune_job.json") == {"job_fingerprint": "abc", "key": "all",
                                                                              "target": "t"}
    assert run.read_job_stamp("all").job_fingerprint == "abc"
