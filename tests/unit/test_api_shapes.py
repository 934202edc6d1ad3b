"""Both API generations (DSPy 2.4 and 3.x): call shapes that work, and misreadings that raise (no Ray)."""

import inspect
import json
import logging

import cloudpickle
import dspy
import pytest

from bootfinetune import BootstrapFinetune, ConfigError, ProgramError
from bootfinetune.stages.bootstrap import TeacherRunner, driver_settings
from bootfinetune.compiler import COMPILE_OPTION_ARGS
from bootfinetune.dspy_api import tracks_given_arguments, documented_options, translate_train_kwargs
from bootfinetune.run.records import example_to_json
from tests.programs import TwoStep, two_step_examples, two_step_metric


@pytest.mark.parametrize("second", [False, True, 0, "all", ["lm"]])
def test_a_non_dict_teacher_settings_names_the_3x_order_and_multitask(second):
    with pytest.raises(ConfigError) as err:
        BootstrapFinetune(two_step_metric, second)
    problem = err.value.problems[0]
    assert problem.startswith(f"teacher_settings={second!r}") and f"multitask={second!r}" in problem
    assert "(metric, multitask, ...)" in problem


def test_both_constructor_generations_read_as_meant():
    assert BootstrapFinetune(two_step_metric, multitask=False).options["multitask"] is False  # 3.x, by keyword
    assert BootstrapFinetune(two_step_metric, {}, False).options["multitask"] is False  # 2.4 positional
    assert BootstrapFinetune(two_step_metric, None).teacher_settings == {}
    with pytest.raises(ConfigError, match="in DSPy 3.x's positional order that is train_kwargs"):
        BootstrapFinetune(two_step_metric, {}, {"learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="metric='exact': must be a function"):
        BootstrapFinetune("exact")


def test_train_kwargs_take_every_generations_names():
    assert translate_train_kwargs({"bsize": 4, "learning_rate": 1e-4, "num_train_epochs": 2, "use_peft": True,
                                   "max_seq_length": 256, "packing": False, "device": None}) == {
        "bsize": 4, "lr": 1e-4, "epochs": 2, "lora": True, "max_length": 256, "packing": False}
    assert BootstrapFinetune(train_kwargs={"packing": True}).options["packing"] is True  # TRL's name: ours
    assert BootstrapFinetune(train_kwargs={"use_peft": True}).options["lora"] is True


@pytest.mark.parametrize("key, value, equivalent", [
    ("output_dir", "/tmp/out", "storage_path"), ("device", "cuda:0", "use_gpu=True"),
    ("frobnicate", 1, "known keys"),
])
def test_train_kwargs_without_an_equivalent_are_refused_naming_one(key, value, equivalent):
    with pytest.raises(ConfigError) as err:
        BootstrapFinetune(train_kwargs={key: value})
    assert f"{key}" in err.value.problems[0] and equivalent in err.value.problems[0]


def test_train_kwargs_keyed_by_lm_as_in_3x():
    lm = dspy.LM("openai/small", api_key="x")
    tp = BootstrapFinetune(train_kwargs={lm: {"learning_rate": 1e-3, "num_train_epochs": 3}})
    assert (tp.options["lr"], tp.options["epochs"]) == (1e-3, 3) and tp.train_kwargs_lms == [lm]
    other = dspy.LM("openai/other", api_key="x")
    same = BootstrapFinetune(train_kwargs={lm: {"learning_rate": 1e-3}, other: {"lr": 1e-3}})
    assert same.options["lr"] == 1e-3
    with pytest.raises(ConfigError, match="different options per LM"):
        BootstrapFinetune(train_kwargs={lm: {"learning_rate": 1e-3}, other: {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError, match="mixes LM keys and option names"):
        BootstrapFinetune(train_kwargs={lm: {"lr": 1e-3}, "epochs": 2})
    with pytest.raises(ConfigError, match=r"train_kwargs\['openai/small'\]: unknown key 'warmup'"):
        BootstrapFinetune(train_kwargs={lm: {"warmup": 0.1}})
    # Keyed by an LM that no predictor of the student holds: refused before any work.
    student = TwoStep()
    student.set_lm(other)
    with pytest.raises(ConfigError, match=r"no predictor of the student holds"):
        tp.compile(student, two_step_examples(2))


def test_compile_reads_3x_positional_order_and_refuses_swapped_arguments(tmp_path):
    tp = BootstrapFinetune(teacher_settings={"lm": dspy.LM("openai/teacher", api_key="x")}, storage_path=str(tmp_path))
    bad_trainset = [dspy.Example(text="no inputs marked")]  # the checks name the trainset: it was read as one
    with pytest.raises(ProgramError, match=r"trainset\[0\]: no input fields marked"):
        tp.compile(TwoStep(), bad_trainset, target=str(tmp_path / "missing-model"))
    with pytest.raises(ProgramError, match=r"pass the teacher by keyword"):
        tp.compile(TwoStep(), TwoStep())
    with pytest.raises(ProgramError, match="pass the examples as trainset"):
        tp.compile(TwoStep(), teacher=two_step_examples(2), trainset=two_step_examples(2))
    with pytest.raises(ProgramError, match=r"trainset: required"):
        tp.compile(TwoStep())
    assert not any(tmp_path.iterdir())  # nothing ran


NOT_GIVEN: dict = {}
"""compile() passes documented_options only the documented arguments its caller gave."""


def test_compile_shows_the_documented_defaults_and_knows_what_was_given():
    shown = inspect.signature(BootstrapFinetune.compile).parameters
    assert {n: shown[n].default for n in ("target", "bsize", "accumsteps", "lr", "epochs", "bf16")} == dict(
        target="t5-large", bsize=12, accumsteps=1, lr=5e-5, epochs=1, bf16=False)
    assert "_given" not in shown
    assert COMPILE_OPTION_ARGS == ("target", "bsize", "accumsteps", "lr", "epochs", "bf16")  # what a job YAML passes

    @tracks_given_arguments
    def compile(self, student, trainset=None, *, epochs=1, bf16=False, _given=frozenset(), **options):
        return _given

    assert compile(None, "s", trainset=[1]) == {"self", "student", "trainset"}
    assert compile(None, "s", epochs=1, zero_stage=3) == {"self", "student", "epochs", "options"}
    with pytest.raises(TypeError):
        compile(None)  # student missing: the same TypeError as an undecorated call


def test_compile_arguments_win_when_given_even_at_their_default():
    tp = BootstrapFinetune(train_kwargs={"learning_rate": 1e-3, "per_device_train_batch_size": 2}, target="m",
                           epochs=3, bf16=True)
    kept = documented_options(TwoStep(), tp.options, options={}, **NOT_GIVEN)
    assert kept == {}  # nothing given to compile: the constructor's options (train_kwargs included) stay
    given = documented_options(TwoStep(), tp.options, options={}, **{**NOT_GIVEN, "epochs": 1, "bf16": False,
                                                                      "lr": 5e-5, "target": "other"})
    assert given == {"epochs": 1, "bf16": False, "lr": 5e-5, "target": "other"}  # defaults' values, given: they win
    assert tp.config.replace(**given).train.epochs == 1  # BootstrapFinetune(epochs=3).compile(..., epochs=1): 1
    student = TwoStep()
    student.set_lm(dspy.LM("openai/local:/models/m", api_key="x"))
    derived = documented_options(student, {}, options={}, **NOT_GIVEN)
    assert derived["target"] == {"rewrite": "/models/m", "answer.predict": "/models/m"}
    assert documented_options(student, {}, options={}, **{**NOT_GIVEN, "target": "t5-large"})["target"] == "t5-large"


def test_dspy_24_compile_arguments_int8_peft_and_path_prefix(tmp_path):
    options = dict(options={}, **NOT_GIVEN)
    assert documented_options(TwoStep(), {}, peft=True, path_prefix="/runs", **options) == {
        "lora": True, "storage_path": "/runs"}
    assert documented_options(TwoStep(), {"lora": True}, peft=False, **options) == {"lora": False}
    assert documented_options(TwoStep(), {}, int8=False, peft=None, **options) == {}  # accepted silently
    assert documented_options(TwoStep(), {}, int8=None, **options) == {}
    assert documented_options(TwoStep(), {}, **{**options, "options": {"use_peft": True}}) == {"lora": True}
    assert BootstrapFinetune(use_peft=True).config.train.lora is True
    with pytest.raises(ConfigError, match="disagree"):
        documented_options(TwoStep(), {}, peft=True, **{**options, "options": {"lora": False}})
    with pytest.raises(ConfigError, match="both place the run"):
        documented_options(TwoStep(), {}, path_prefix="/a", **{**options, "options": {"storage_path": "/b"}})
    # int8=True: refused before any work, naming the options that save memory.
    tp = BootstrapFinetune(teacher_settings={"lm": dspy.LM("openai/teacher", api_key="x")}, storage_path=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        tp.compile(TwoStep(), trainset=two_step_examples(2), target="m", int8=True)
    assert err.value.problems[0].startswith("int8=True") and "peft=True" in err.value.problems[0]
    assert "zero_stage=3" in err.value.problems[0] and "offload" in err.value.problems[0]
    assert not any(tmp_path.iterdir())


class CountingCallback(dspy.utils.callback.BaseCallback):
    def __init__(self):
        self.lm_calls = 0

    def on_lm_start(self, call_id, instance, inputs):
        self.lm_calls += 1


def test_configured_settings_travel_and_per_call_ones_stay(teacher_lm):
    callback = CountingCallback()
    with dspy.context(lm=teacher_lm, callbacks=[callback], track_usage=True, provide_traceback=True,
                      my_team_setting="blue", trace=[("step",)], num_threads=8):
        carried = driver_settings()
    assert carried["callbacks"] == [callback] and carried["track_usage"] is True
    assert carried["provide_traceback"] is True and carried["my_team_setting"] == "blue"
    assert carried["lm"] is teacher_lm
    assert "trace" not in carried and "num_threads" not in carried  # per call; and 8 is DSPy's default
    cloudpickle.dumps(carried)

    # The actor's runner applies them: the callback counts the teacher's calls, usage reaches the metric.
    usage_seen = []

    def metric(example, prediction, trace):
        usage_seen.append(prediction.get_lm_usage())
        return two_step_metric(example, prediction, trace)

    runner = TeacherRunner([TwoStep()], metric=metric, settings=carried, num_threads=1)
    out = runner({"example_index": [0], "example": [example_to_json(two_step_examples(1)[0])]})
    assert "calls" in json.loads(out["result"][0])
    assert callback.lm_calls == 3  # rewrite twice, answer once
    assert usage_seen and usage_seen[0] and all(u["prompt_tokens"] > 0 for u in usage_seen[0].values())


def test_an_unpicklable_setting_stays_behind_with_a_warning(caplog):
    import threading

    with caplog.at_level(logging.WARNING, logger="bootfinetune.stages.bootstrap"):
        with dspy.context(team_lock=threading.Lock(), track_usage=True):
            carried = driver_settings()
    assert "team_lock" not in carried and carried["track_usage"] is True
    assert "dspy.configure(team_lock=...) cannot be sent to Ray actors" in caplog.text
