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
