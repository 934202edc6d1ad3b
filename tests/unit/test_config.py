"""The typed configuration: every problem reported at once, each naming the field and the fix."""

import pytest

from bootfinetune.config import Config
from bootfinetune.errors import ConfigError


def test_defaults_are_valid_and_match_the_documented_signature():
    config = Config.from_options()
    assert (config.train.target, config.train.bsize, config.train.accumsteps) == ("t5-large", 12, 1)
    assert (config.train.lr, config.train.epochs, config.train.bf16) == (5e-5, 1, False)
    assert config.bootstrap.multitask is True
    assert config.problems() == []


def test_unknown_option_raises_with_closest_name():
    with pytest.raises(ConfigError) as err:
        Config.from_options(bsise=4)
    assert "unknown option 'bsise'" in str(err.value)
    assert "Did you mean 'bsize'?" in str(err.value)


def test_every_problem_is_reported_together():
    with pytest.raises(ConfigError) as err:
        Config.from_options(bsize=0, lr=-1.0, epochs=1.5, zero_stage=5, nope=1, num_actors=0)
    problems = err.value.problems
    assert len(problems) == 6
    joined = "\n".join(problems)
    for name in ("bsize=0", "lr=-1.0", "epochs=1.5", "zero_stage=5", "'nope'", "num_actors=0"):
        assert name in joined


@pytest.mark.parametrize("options, field", [
    ({"accumsteps": 0}, "accumsteps"),
    ({"bf16": "yes"}, "bf16"),
    ({"max_length": 4}, "max_length"),
    ({"warmup_ratio": 2.0}, "warmup_ratio"),
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"offload_params": True, "zero_stage": 2}, "offload_params"),
    ({"eval_fraction": 0.9}, "eval_fraction"),
    ({"num_threads": 0}, "num_threads"),
    ({"max_errors": -1}, "max_errors"),
    ({"target": ""}, "target"),
    ({"target": {"qa": ""}}, "target"),
    ({"run_name": "a/b"}, "run_name"),
    ({"storage_path": ""}, "storage_path"),
    ({"actor_cpus": 0}, "actor_cpus"),
    ({"max_calls_per_second": 0}, "max_calls_per_second"),
    ({"max_tokens_per_minute": 0.5}, "max_tokens_per_minute"),
    ({"num_workers": True}, "num_workers"),
])
def test_each_bad_value_names_its_field(options, field):
    with pytest.raises(ConfigError) as err:
        Config.from_options(**options)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(field)


def test_storage_path_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("BOOTFINETUNE_STORAGE", "/tmp/somewhere")
    assert Config.from_options().run.storage_path == "/tmp/somewhere"


def test_replace_rechecks():
    config = Config.from_options(bsize=2)
    assert config.replace(epochs=3).train.epochs == 3
    assert config.replace(epochs=3).train.bsize == 2
    with pytest.raises(ConfigError):
        config.replace(epochs=0)


def test_resource_options_are_the_fields_marked_so_and_change_no_identity():
    from bootfinetune.config import RESOURCE_OPTIONS, identity_options

    assert RESOURCE_OPTIONS == {"num_actors", "num_threads", "actor_cpus", "batch_size", "engine",
                                "max_calls_per_second", "max_tokens_per_minute", "max_errors", "max_retry_after_s", "trace_upload_every",
                                "trace_upload_s",
                                "cpus_per_worker", "gpus_per_worker", "max_failures", "storage_path", "run_name",
                                "ray_address", "writer_wait_s", "writer_lease_s", "verbose", "mlflow_tracking_uri",
                                "gradient_checkpointing", "compile_layers",
                                "resources_per_worker", "eval_threads"}  # same computation, another way
    base = Config.from_options()
    more = base.replace(num_actors=8, cpus_per_worker=4.0, storage_path="/elsewhere",
                        mlflow_tracking_uri="http://mlflow:5000")
    assert identity_options(more) == identity_options(base)
    assert identity_options(more, "train") == identity_options(base, "train")
    assert identity_options(base.replace(num_workers=2)) != identity_options(base)  # the global batch


def test_choices_are_literals_and_every_field_has_help():
    import typing

    from bootfinetune.config import FIELD_HELP, FIELD_TYPES, FIELDS

    assert typing.get_args(FIELD_TYPES["zero_stage"]) == ("auto", 0, 1, 2, 3)
    assert typing.get_args(FIELD_TYPES["lr_schedule"]) == ("linear", "cosine", "constant")
    assert set(FIELD_HELP) == set(FIELDS) and all(FIELD_HELP.values())


def test_flags_come_from_the_fields():
    import argparse

    from bootfinetune.entrypoints.flags import add_config_arguments, config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, aliases={"storage_path": ("--storage",)}, defaults={"epochs": 10})
    args = parser.parse_args(["--zero-stage", "3", "--no-multitask", "--storage", "/tmp/r", "--lr", "1e-4",
                              "--lora-target-modules", "q_proj,v_proj"])
    given = config_arguments(args)
    assert given == {"zero_stage": 3, "multitask": False, "storage_path": "/tmp/r", "lr": 1e-4, "epochs": 10,
                     "lora_target_modules": ["q_proj", "v_proj"]}
    config = Config.from_options(**given)
    assert (config.train.zero_stage, config.bootstrap.multitask, config.train.bsize) == (3, False, 12)
    assert config_arguments(parser.parse_args([])) == {"epochs": 10}  # the rest keeps Config's defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--zero-stage", "5"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--zero-stage", "three"])
    assert config_arguments(parser.parse_args(["--zero-stage", "auto"]))["zero_stage"] == "auto"
    assert Config.from_options().train.zero_stage == "auto"  # the default: chosen by the model's size
    assert "Micro batch size per worker. (default: 12)" in " ".join(parser.format_help().split())


def test_resources_per_worker_are_ray_resources_other_than_cpus_and_gpus():
    import argparse

    from bootfinetune.entrypoints.flags import add_config_arguments, config_arguments

    assert Config.from_options(resources_per_worker={"accelerator_type:A100": 0.001}).train.resources_per_worker == {
        "accelerator_type:A100": 0.001}
    for bad in ({"GPU": 1}, {"fast": 0}, {"fast": True}, ["fast"], "fast"):
        with pytest.raises(ConfigError, match=r"resources_per_worker=.*cpus_per_worker and gpus_per_worker"):
            Config.from_options(resources_per_worker=bad)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ["resources_per_worker"])
    assert config_arguments(parser.parse_args(["--resources-per-worker", '{"fast": 1}'])) == {
        "resources_per_worker": {"fast": 1}}


def test_the_demo_flags_carry_its_own_values_only():
    import argparse

    from bootfinetune.entrypoints.flags import config_arguments
    from bootfinetune.entrypoints.demo import OVERRIDES, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--workers", "2", "--per-predictor", "--epochs", "3"])
    assert config_arguments(args) == {**OVERRIDES, "epochs": 3, "num_workers": 2, "multitask": False}
    assert "target" not in vars(args)  # not given: the demo builds its tiny student
    Config.from_options(**config_arguments(args))


def test_the_bootstrap_command_takes_every_option_as_a_flag():
    from bootfinetune.entrypoints.cli import build_parser
    from bootfinetune.entrypoints.flags import config_arguments

    base = ["bootstrap", "--program", "pkg.mod:Prog", "--trainset", "t.jsonl", "--inputs", "q", "--teacher-model", "m"]
    args = build_parser().parse_args(base + ["--storage", "/tmp/r", "--per-predictor", "--num-actors", "3",
                                             "--metric", "pkg.mod:metric", "--zero-stage", "3"])
    assert config_arguments(args) == {"storage_path": "/tmp/r", "multitask": False, "num_actors": 3, "zero_stage": 3}
    assert args.metric == "pkg.mod:metric"
    assert config_arguments(build_parser().parse_args(base)) == {}  # Config's defaults apply
