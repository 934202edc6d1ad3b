"""The DSPy provider without Ray: input checks that fail before training, run names, launch and kill."""

import time

import dspy
import pytest
from dspy.clients.utils_finetune import TrainDataFormat, TrainingStatus
from dspy.teleprompt.bootstrap_finetune import kill_lms, launch_lms

from bootfinetune import ConfigError, RayFinetuneProvider, TrainDataError
from bootfinetune.entrypoints.provider import (LOCAL_API_KEY, RayTrainingJob, finetuned_model_id, model_path,
                                   resolve_base_model)
from bootfinetune.serving.serve import served_model, stop_model
from bootfinetune.testing.tiny_models import build_tiny_causal, toy_records


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    return str(build_tiny_causal(tmp_path_factory.mktemp("models") / "tiny-llama"))


def chat_rows(n=4):
    return [{"messages": r["messages"]} for r in toy_records(n)]


def provider_lm(model_dir, tmp_path, **options):
    provider = RayFinetuneProvider(storage_path=str(tmp_path / "runs"), **options)
    return dspy.LM(f"openai/local:{model_dir}", provider=provider, cache=False, num_retries=0)


def no_training_started(tmp_path):
    return not (tmp_path / "runs").exists()  # a run writes its data there before Ray or DeepSpeed start


@pytest.mark.parametrize("data_format", ["completion", TrainDataFormat.COMPLETION, None])
def test_non_chat_format_raises_from_finetune_itself(tiny_causal, tmp_path, data_format):
    lm = provider_lm(tiny_causal, tmp_path)
    with pytest.raises(TrainDataError, match=r"train_data_format=.*pass 'chat'"):
        lm.finetune(chat_rows(), data_format)
    assert no_training_started(tmp_path)


def test_rows_without_a_final_assistant_message_are_named(tiny_causal, tmp_path):
    rows = chat_rows(4)
    rows[1] = {"messages": rows[1]["messages"][:-1]}         # prompt only
    rows[2] = {"prompt": "x", "completion": "y"}             # completion-style row
    rows[3]["messages"][0] = {"role": "robot", "content": "?"}
    lm = provider_lm(tiny_causal, tmp_path)
    with pytest.raises(TrainDataError) as err:
        lm.finetune(rows, "chat")
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("train_data[1]: 'messages' must end with an assistant message")
    assert "Append {'role': 'assistant'" in problems[0]
    assert problems[1].startswith("train_data[2]: needs a 'messages' list")
    assert problems[2].startswith("train_data[3]: messages[0] must be {'role': 'system'|'user'|'assistant'")
    with pytest.raises(TrainDataError, match="non-empty list"):
        lm.finetune([], "chat")
    assert no_training_started(tmp_path)


def test_missing_or_broken_model_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=r"no model directory at .*no-such-model"):
        provider_lm(missing, tmp_path).finetune(chat_rows(), "chat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        provider_lm(tmp_path / "empty", tmp_path).finetune(chat_rows(), "chat")
    with pytest.raises(ConfigError, match="no model directory"):
        provider_lm("runs/x/models/all", tmp_path).finetune(chat_rows(), "chat")
    assert no_training_started(tmp_path)


def test_unknown_or_bad_train_kwargs_raise_before_training(tiny_causal, tmp_path):
    lm = provider_lm(tiny_causal, tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'use_pef'"):
        lm.finetune(chat_rows(), "chat", {"use_pef": True})
    with pytest.raises(ConfigError, match="output_dir='/tmp/x' has no bootfinetune equivalent: .*storage_path"):
        lm.finetune(chat_rows(), "chat", {"output_dir": "/tmp/x"})
    with pytest.raises(ConfigError, match="lr=-1"):
        lm.finetune(chat_rows(), "chat", {"learning_rate": -1})
    # Called directly (not through dspy.LM), the provider checks the same things.
    with pytest.raises(ConfigError, match="epochs=0"):
        lm.provider.finetune(None, lm.model, chat_rows(), "chat", {"epochs": 0})
    assert no_training_started(tmp_path)


def test_provider_options_are_checked_all_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        RayFinetuneProvider(storage_pth=str(tmp_path), num_actors=2, target="x", zero_stage=7)
    problems = err.value.problems
    assert len(problems) == 4
    assert "Did you mean 'storage_path'?" in problems[0]
    assert "'num_actors' is a bootstrap option" in problems[1] and "'target' is a train option" in problems[2]
    assert problems[3].startswith("zero_stage=7")


def test_train_kwargs_accept_24_3x_and_bootfinetune_names(tiny_causal, tmp_path):
    provider = RayFinetuneProvider(storage_path=str(tmp_path), num_workers=2, lr=1e-4)
    config = provider.config(f"openai/local:{tiny_causal}",
                             {"bsize": 4, "learning_rate": 3e-3, "num_train_epochs": 3, "zero_stage": 3})
    t = config.train
    assert (t.bsize, t.lr, t.epochs, t.zero_stage, t.num_workers) == (4, 3e-3, 3, 3, 2)
    assert t.target == resolve_base_model(tiny_causal)


def test_run_name_depends_on_model_data_and_training_options_only(tiny_causal, tmp_path):
    model = f"openai/local:{tiny_causal}"
    a = RayFinetuneProvider(storage_path=str(tmp_path))
    b = RayFinetuneProvider(storage_path=str(tmp_path), cpus_per_worker=2.0, max_failures=0, max_tokens=8)
    name = a.run_dir(a.config(model, {"epochs": 2}), chat_rows(4)).name
    assert name.startswith("Provider-")
    assert b.run_dir(b.config(model, {"epochs": 2}), chat_rows(4)).name == name
    assert a.run_dir(a.config(model, {"epochs": 3}), chat_rows(4)).name != name
    assert a.run_dir(a.config(model, {"epochs": 2}), chat_rows(5)).name != name


def test_model_strings():
    assert model_path("openai/local:/m/tiny") == "/m/tiny"
    assert model_path("huggingface/org/model") == "org/model"
    assert model_path(finetuned_model_id("/runs/P-1/models/all")) == "/runs/P-1/models/all"
    assert resolve_base_model("openai/local:org/model") == "org/model"  # a hub id passes as given


def test_launch_is_idempotent_and_kill_stops_the_server(tiny_causal, tmp_path):
    lm = provider_lm(tiny_causal, tmp_path, max_tokens=4)
    try:
        lm.launch()
        url = lm.kwargs["api_base"]
        assert lm.kwargs["api_key"] == LOCAL_API_KEY and url.startswith("http://127.0.0.1:")
        lm.launch()
        copy = lm.copy(temperature=0.0)
        copy.launch()
        assert lm.kwargs["api_base"] == copy.kwargs["api_base"] == url  # one server per model directory
        server = served_model(tiny_causal)
        assert len(lm("Repeat the word apple.")[0]) > 0 and server.calls == 1
        kill_lms(_one_predictor_program(lm))
        assert served_model(tiny_causal) is None
        lm.kill()  # killing again is harmless
        launch_lms(_one_predictor_program(lm))  # DSPy's helper: a fresh server, the LM follows it
        assert served_model(tiny_causal) is not None and lm.kwargs["api_base"] != url
        assert len(lm("Repeat the word apple.")[0]) > 0
    finally:
        stop_model(tiny_causal)


def _one_predictor_program(lm):
    program = dspy.Predict("question -> answer")
    program.lm = lm
    return program


def test_a_failed_job_raises_from_result_and_reports_failed():
    job = RayTrainingJob(model="openai/local:org/model", train_data=chat_rows(2), train_data_format="chat")
    assert job.status() == TrainingStatus.pending
    job.set_result(RuntimeError("training broke"))  # what DSPy's _run_finetune_job hands over on failure
    assert job.status() == TrainingStatus.failed
    with pytest.raises(RuntimeError, match="training broke"):
        job.result(timeout=1)


def test_a_job_whose_model_cannot_be_served_fails(tmp_path):
    job = RayTrainingJob(model="openai/local:org/model", train_data=chat_rows(2), train_data_format="chat")
    lm = dspy.LM(finetuned_model_id(tmp_path / "gone"), provider=RayFinetuneProvider(storage_path=str(tmp_path)))
    started = time.time()
    job.set_result(lm)
    with pytest.raises(ConfigError, match="no model directory"):
        job.result(timeout=1)
    assert job.status() == TrainingStatus.failed and time.time() - started < 5
