"""Safe folder names for model keys, the containment check on every run path, and the trust checks of `load`."""

from __future__ import annotations

import json
import os
import pickle

import dspy
import pytest

from bootfinetune.errors import ProgramError
from bootfinetune.common.names import SLUG_LENGTH, folder_names, is_safe_name, safe_name
from bootfinetune.run.paths import RunPathError, inside, inside_uri
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import ModelManifest, RunDescription


def test_safe_keys_keep_their_name_so_existing_runs_and_vllm_lines_stay_true():
    keys = ["all", "answer.predict", "rewrite", "generate_answer.predict", "retrieve.predict"]
    assert folder_names(keys) == {k: k for k in keys}


@pytest.mark.parametrize("key", ["x/../../../../escaped", "chains['a b']", "..", ".", "", "/etc/passwd", ".hidden",
                                 "-rf", "a\\b", "naïve", "a\x00b", "x" * 500, "C:\\x", "a..b"])
def test_any_key_maps_to_one_safe_bounded_folder(key):
    folder = folder_names([key])[key]
    assert is_safe_name(folder) and folder not in (".", "..") and not folder.startswith((".", "-"))
    assert len(folder) <= SLUG_LENGTH + 9 and "/" not in folder and "\\" not in folder
    assert folder != key and folder == safe_name(key)  # unsafe: a slug plus the key's hash, the same every time


def test_the_slug_stays_readable():
    assert folder_names(["x/../../../../escaped"])["x/../../../../escaped"].startswith("x-escaped-")
    assert folder_names(["chains['a b']"])["chains['a b']"].startswith("chains-a-b-")


def test_collisions_get_a_hash_even_across_case():
    folders = folder_names(["a b", "a-b", "All", "all", "a/b"])
    assert len({f.lower() for f in folders.values()}) == 5  # distinct on a case-insensitive filesystem too
    assert folders["a-b"] == "a-b" and folders["All"] == "All" and folders["all"].startswith("all-")
    crafted = safe_name("a b")  # a key spelled like another key's folder
    both = folder_names(["a b", crafted])
    assert both["a b"] == crafted and both[crafted] != crafted and is_safe_name(both[crafted])


def test_recorded_folders_are_kept():
    assert folder_names(["k", "j"], recorded={"k": "kept", "gone": "x"}) == {"k": "kept", "j": "j"}


def test_inside_refuses_paths_that_leave_the_root(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    assert inside(root, "models", "all") == root / "models" / "all"
    for parts in [("..", "x"), ("data", "x/../../../../escaped.jsonl"), ("/etc/passwd",), ("models", "/tmp")]:
        with pytest.raises(RunPathError, match="outside the run directory"):
            inside(root, *parts)
    (root / "models").mkdir()
    (root / "models" / "out").symlink_to(tmp_path)  # a link inside the run pointing out
    with pytest.raises(RunPathError):
        inside(root, "models", "out", "x")
    (root / "models" / "in").symlink_to(root / "models")
    assert inside(root, "models", "in", "x") == root / "models" / "in" / "x"


def test_inside_uri_checks_the_normalised_path():
    assert inside_uri("s3://b/runs/R", "models", "all") == "b/runs/R/models/all"
    assert inside_uri("gs://b/runs/R?x=1", "a/./b") == "b/runs/R/a/b"
    for parts in [("..", "S"), ("models", "../../other"), ("x/../../R2",)]:
        with pytest.raises(RunPathError, match="leaves the run's storage path"):
            inside_uri("s3://b/runs/R", *parts)


def test_run_dir_uses_the_recorded_folder_and_refuses_a_tampered_one(tmp_path):
    run = RunDir(tmp_path / "R")
    key = "x/../../../../escaped"
    assert run.data_file("all") == run.root / "data" / "all.jsonl"  # no config.json: the rule
    run.write_description(RunDescription(model_keys={key: {"target": "t", "predictors": [key]}, "all": {}}))
    folder = run.read_description().folders[key]
    assert is_safe_name(folder) and run.read_description().folders["all"] == "all"
    assert run.data_file(key) == run.root / "data" / f"{folder}.jsonl"
    assert run.data_file(key, "val") == run.root / "data" / "val" / f"{folder}.jsonl"
    assert run.model_dir(key) == run.root / "models" / folder
    assert run.checkpoint_dir(key) == run.root / "checkpoints" / folder
    run.write_manifest(ModelManifest(key=key, folder=folder))
    assert list(run.finished_models()) == [key] and run.read_manifest(key).folder == folder

    data = json.loads(run.config_json.read_text())
    data["folders"][key] = "../../../escaped"  # a config.json changed by hand
    run.config_json.write_text(json.dumps(data))
    with pytest.raises(RunPathError, match="not a safe folder name"):
        run.model_dir(key)


def test_a_run_without_recorded_folders_reads_as_before(tmp_path):
    run = RunDir(tmp_path / "R")
    run.config_json.parent.mkdir(parents=True)
    run.config_json.write_text(json.dumps({"version": 1, "model_keys": {"answer.predict": {}}}))
    assert run.model_dir("answer.predict") == run.root / "models" / "answer.predict"


def test_remove_stays_inside_the_run(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "f").write_text("keep")
    run = RunDir(tmp_path / "runs" / "R")
    (run.root / "models").mkdir(parents=True)
    for parts in [("..", "..", "precious"), ("models", "../../../precious")]:
        with pytest.raises(RunPathError):
            run.remove(*parts)
    (run.root / "models" / "link").symlink_to(outside)  # a link pointing out: refused, nothing behind it deleted
    with pytest.raises(RunPathError):
        run.remove("models", "link")
    (run.root / "models" / "k").mkdir()
    run.remove("models", "k")
    assert not (run.root / "models" / "k").exists() and (outside / "f").read_text() == "keep"


def test_evaluation_names_become_safe_files_recorded_in_the_report(tmp_path):
    run = RunDir(tmp_path / "R")
    path = run.evaluation_json("../../evil name")
    assert path.parent == run.root / "evaluations" and is_safe_name(path.name)
    run.update_report(evaluations={"../../evil name": path.name})
    assert run.evaluation_json("../../evil name") == path and run.evaluation_json("eval").name == "eval.json"
    assert run.read_report().to_json()["evaluations"] == {"../../evil name": path.name}


def _run_naming(tmp_path, program_class):
    run = RunDir(tmp_path / "R")
    run.write_description(RunDescription(program_class=program_class))
    run.program_json.write_text("{}")
    return run


def test_load_builds_only_a_dspy_module_subclass(tmp_path, monkeypatch):
    import bootfinetune

    marker = tmp_path / "ran"
    monkeypatch.setenv("BOOTFINETUNE_TEST_MARKER", str(marker))
    for path in ("os:getcwd", "builtins:dict", "tests.unit.test_names:not_a_program", "bootfinetune.errors:ConfigError"):
        run = _run_naming(tmp_path, path)
        with pytest.raises(ProgramError, match=rf"config.json: program_class '{path}' .*not a dspy.Module subclass"):
            bootfinetune.load(run.root)
    assert not marker.exists()  # the callable config.json named was never called


def not_a_program():
    open(os.environ["BOOTFINETUNE_TEST_MARKER"], "w").close()


def test_an_adapter_class_must_be_a_dspy_adapter(tmp_path):
    from bootfinetune.stages.adapters import adapter_from_spec

    marker = tmp_path / "ran"
    with pytest.raises(ProgramError, match="not a dspy.Adapter subclass"):
        adapter_from_spec({"class": "pathlib:Path.touch", "options": {"self": str(marker)}})
    assert not marker.exists()
    assert isinstance(adapter_from_spec({"class": "dspy.adapters.json_adapter:JSONAdapter", "options": {}}),
                      dspy.JSONAdapter)


class _Touch:
    """Unpickling this runs code: it creates the file named in its argument."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_stage_0_checkpoints_load_weights_only(tmp_path, monkeypatch):
    """A real ZeRO-0 DeepSpeed checkpoint loads with weights_only=True; one carrying a pickled callable is refused."""
    import dataclasses

    import torch

    from bootfinetune.config import TrainConfig
    from bootfinetune.run.jsonio import write_jsonl
    from bootfinetune.training.export import consolidated_state_dict
    from bootfinetune.testing.tiny_models import build_tiny_causal, toy_records
    from bootfinetune.training.train_loop import DS_DIR, train_loop

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_jsonl(tmp_path / "train.jsonl", toy_records(16, seed=0))
    target = build_tiny_causal(tmp_path / "m")
    tc = TrainConfig(target=str(target), bsize=8, max_length=128, epochs=1, zero_stage=0)
    train_loop({"target": str(target), "train": dataclasses.asdict(tc), "train_path": str(tmp_path / "train.jsonl"),
                "checkpoint_dir": str(tmp_path / "ckpt")})
    ds = tmp_path / "ckpt" / "epoch_001" / DS_DIR
    state = consolidated_state_dict(ds, "epoch_1", 0)
    assert state and all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())

    marker = tmp_path / "ran"
    torch.save({"module": {}, "x": _Touch(str(marker))}, ds / "epoch_1" / "mp_rank_00_model_states.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        consolidated_state_dict(ds, "epoch_1", 0)
    assert not marker.exists()


class _One(dspy.Module):
    def __init__(self):
        super().__init__()
        self.p = dspy.Predict("q -> a")


@pytest.mark.parametrize("recorded", [True, False, "false"])
def test_a_run_directory_never_widens_trust_remote_code(tmp_path, recorded):
    """Issue 30 (12): load and serve took trust_remote_code from config.json, where a hand-written "false" was
    true. Remote code runs only when the caller passes True; a recorded value that is not a bool is refused."""
    from bootfinetune.config import InferenceConfig
    from bootfinetune.run.jsonio import write_json
    from bootfinetune.run.runfiles import RunFileError
    from bootfinetune.serving.lm import finetuned_engine
    from bootfinetune.serving.ray_serve import model_specs
    from bootfinetune.stages.rebind import load, rebind_run

    run = RunDir(tmp_path / "R")
    described = RunDescription(options={"train": {"trust_remote_code": recorded}},
                               model_keys={"all": {"target": "t", "predictors": ["p"]}})
    run.write_description(described)
    run.write_manifest(ModelManifest(key="all", folder="all"))
    write_json(run.program_json, {"p": _One().p.dump_state()})
    if not isinstance(recorded, bool):  # parsed strictly: a damaged file is named, never read as true
        for given in (None, True):
            with pytest.raises(RunFileError, match="config.json: trust_remote_code='false' must be true or false"):
                model_specs(run, trust_remote_code=given)
            with pytest.raises(RunFileError, match="trust_remote_code='false'"):
                load(str(run.root), program=_One(), trust_remote_code=given)
        return
    for given in (None, False):
        assert model_specs(run, trust_remote_code=given)["all"]["trust_remote_code"] is False
        loaded = load(str(run.root), program=_One(), trust_remote_code=given)
        assert finetuned_engine(loaded.p.lm).trust_remote_code is False
        bound = rebind_run(_One(), run, described, inference=InferenceConfig(device="cpu"), trust_remote_code=given)
        assert finetuned_engine(bound.p.lm).trust_remote_code is False
    assert model_specs(run, trust_remote_code=True)["all"]["trust_remote_code"] is True
    assert finetuned_engine(load(str(run.root), program=_One(), trust_remote_code=True).p.lm).trust_remote_code


def test_recorded_inference_options_are_checked_as_strictly_as_given_ones(tmp_path):
    from bootfinetune.run.runfiles import RunFileError
    from bootfinetune.serving.ray_serve import model_specs

    run = RunDir(tmp_path / "R")
    run.write_description(RunDescription(options={"inference": {"max_tokens": "9999999", "generate_batch_size": -3}},
                                         model_keys={"all": {"target": "t", "predictors": ["self"]}}))
    run.write_manifest(ModelManifest(key="all", folder="all"))
    with pytest.raises(RunFileError) as err:
        model_specs(run)
    assert "config.json: max_tokens='9999999'" in str(err.value) and "generate_batch_size=-3" in str(err.value)


def test_a_retrain_takes_no_trust_and_no_ray_address_from_the_run(tmp_path, monkeypatch):
    from bootfinetune.config import Config
    from bootfinetune.entrypoints.retrain import prepare_retrain
    from bootfinetune.errors import ConfigError

    run = RunDir(tmp_path / "TwoStep-abc")
    run.data_dir.mkdir(parents=True)
    run.data_file("all").write_text("")
    options = Config.from_options(target="some/model", ray_address="ray://recorded-head:10001").to_dict()
    described = {"options": options, "model_keys": {"all": {"target": "some/model", "predictors": ["rewrite"]}}}
    run.config_json.write_text(json.dumps(described))
    ready = prepare_retrain(str(run.root), cpus_per_worker=2.0)
    assert ready.config.run.ray_address is None  # $RAY_ADDRESS, else the usual rule, decides where it runs
    ready.writer.release()
    ready = prepare_retrain(str(run.root), cpus_per_worker=2.0, ray_address="ray://given:10001")
    assert ready.config.run.ray_address == "ray://given:10001"
    ready.writer.release()

    options["train"]["trust_remote_code"] = True
    run.config_json.write_text(json.dumps(described))
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        prepare_retrain(str(run.root), cpus_per_worker=2.0)
    ready = prepare_retrain(str(run.root), cpus_per_worker=2.0, trust_remote_code=True)
    assert ready.config.train.trust_remote_code is True
    ready.writer.release()


# -- issue 30: a run name follows the same rule ----------------------------------------------------

@pytest.mark.parametrize("name", ["a?endpoint_override=evil.example:9000&scheme=http", "a#b", "a\x00b", "a%2Fb",
                                  "a b", "x" * 201, ".hidden", "-rf", "a/b", "naïve", ""])
def test_a_run_name_that_is_not_a_safe_name_is_refused_with_the_rule(name):
    from bootfinetune.config import Config
    from bootfinetune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        Config.from_options(run_name=name, storage_path="s3://bucket/runs?region=eu")
    message = str(err.value)
    assert "run_name" in message and "letters, digits" in message and "at most" in message
    with pytest.raises(RunPathError):  # the door every run directory goes through refuses it too
        RunDir.at("s3://bucket/runs?region=eu", name)


def test_safe_run_names_and_derived_ones_pass():
    from bootfinetune.config import Config
    from bootfinetune.run.rundir import run_name_for

    for name in ("my-run_1.0", "TwoStep-1a2b3c4d5e6f", "a" * (SLUG_LENGTH + 9)):
        assert Config.from_options(run_name=name).run.run_name == name
        assert RunDir.at("s3://bucket/runs", name).remote == f"s3://bucket/runs/{name}"
    derived = run_name_for("A" * 300 + "Program", {"x": 1})  # a long class name still gives a safe, bounded name
    assert is_safe_name(derived) and derived.startswith("AAAA") and len(derived) <= SLUG_LENGTH + 9
    assert run_name_for("RAG", {"x": 1}).startswith("RAG-")


def test_a_new_export_is_written_beside_the_model_and_swapped_in_only_when_complete(tmp_path):
    """Issue 30 (8): a retrain deleted models/{key} before the new export was complete."""
    from bootfinetune.run.storage import _mirrored

    run = RunDir(tmp_path / "R-1")
    run.write_manifest(ModelManifest(key="all", best_epoch=1))
    (run.model_dir("all") / "model.safetensors").write_text("good weights")

    staged = run.model_staging("all")
    (staged / "model.safetensors").write_text("half of the new weights")  # the export dies here
    assert (run.model_dir("all") / "model.safetensors").read_text() == "good weights"
    assert [m.best_epoch for m in run.finished_models().values()] == [1]  # the staged one is no model
    assert not _mirrored(f"models/{staged.name}/model.safetensors")  # and never uploaded

    staged = run.model_staging("all")  # the next try starts clean
    assert list(staged.iterdir()) == []
    (staged / "model.safetensors").write_text("new weights")
    assert run.read_manifest("all").best_epoch == 1  # complete beside it, not in place yet
    run.swap_model(ModelManifest(key="all", best_epoch=2), staged)
    assert run.read_manifest("all").best_epoch == 2
    assert (run.model_dir("all") / "model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in run.models_dir.iterdir()) == ["all"]

    # a crash between the swap's two renames: the complete export beside the folder is put back in place
    os.replace(run.model_dir("all"), run.path("models", ".all.old.tmp"))
    run.model_staging("all")
    assert run.read_manifest("all").best_epoch == 2
