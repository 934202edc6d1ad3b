"""The finetuned LM as DSPy 3.4 wants it: a `dspy.LM` whose engine runs a tiny model in process.

A tiny causal model is trained here, in a few seconds, to answer `question -> answer` in the
ChatAdapter's format, so DSPy parses what it says; everything runs on real DSPy calls.
"""

import asyncio
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import dspy
import pytest
from dspy.utils.callback import BaseCallback

from bootfinetune.errors import ProgramError
from bootfinetune.serving.lm import FinetunedLM, finetuned_engine, model_fingerprint
from bootfinetune.testing.tiny_models import build_tiny_causal

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["what color is the sky?", "name a color", "which color is calm?"]


def train_to_answer(base: Path, out: Path, answer: str, steps: int = 80, lr: float = 3e-3) -> Path:
    """`base` finetuned to answer every QUESTIONS prompt with `answer` in ChatAdapter's format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bootfinetune.training.render import collate, encode_example

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    signature = dspy.Predict("question -> answer").signature
    adapter = dspy.ChatAdapter()
    reply = adapter.format_assistant_message_content(signature, {"answer": answer}, missing_field_message="")
    examples = [encode_example(tokenizer, adapter.format(signature, [], {"question": q})
                               + [{"role": "assistant", "content": reply}], "causal", 1024) for q in QUESTIONS]
    batch = collate(examples, tokenizer.pad_token_id or 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetuned-lm")
    base = build_tiny_causal(root / "base")
    return {"base": base, "blue": train_to_answer(base, root / "blue", "blue")}


class Recorder(BaseCallback):
    def __init__(self):
        self.starts, self.ends = [], []

    def on_lm_start(self, call_id, instance, inputs):
        self.starts.append(instance)

    def on_lm_end(self, call_id, outputs, exception=None):
        self.ends.append(exception)


async def last_item(stream):
    item = None
    async for item in stream:
        pass
    return item


@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_predict_answers_through_the_engine_with_history_usage_and_callbacks(models):
    lm = FinetunedLM(str(models["blue"]), max_tokens=24, device="cpu")
    assert type(lm) is dspy.LM and lm.model.startswith("bootfinetune/blue@")
    assert lm.model.endswith(model_fingerprint(models["blue"]))
    recorder = Recorder()
    predict = dspy.Predict("question -> answer")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no legacy path on any call below
        with dspy.context(lm=lm, track_usage=True, callbacks=[recorder], adapter=dspy.ChatAdapter()):
            prediction = predict(question=QUESTIONS[0])
            async_prediction = asyncio.run(predict.acall(question=QUESTIONS[1]))
            text = lm("a plain prompt")
            streamed = asyncio.run(last_item(dspy.streamify(predict)(question=QUESTIONS[2])))
    assert prediction.answer == "blue" and async_prediction.answer == "blue" and streamed.answer == "blue"
    assert isinstance(text, list) and isinstance(text[0], str)
    assert len(lm.history) == 4 and all(entry["model"] == lm.model for entry in lm.history)
    usage = lm.history[0]["usage"]
    assert usage["prompt_tokens"] > 50 and 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert prediction.get_lm_usage()[lm.model]["prompt_tokens"] == usage["prompt_tokens"]
    assert recorder.starts == [lm] * 4 and recorder.ends == [None] * 4
    # The same prompt through the engine's batched helper, outside DSPy: the same text.
    messages = lm.history[0]["messages"]
    assert finetuned_engine(lm).generate([messages], max_tokens=24) == lm.history[0]["outputs"]


@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_concurrent_calls_are_batched_and_answer_as_alone(models):
    lm = FinetunedLM(str(models["blue"]), max_tokens=24, device="cpu", batch_size=4)
    predict = dspy.Predict("question -> answer")
    examples = [dspy.Example(question=q).with_inputs("question") for q in QUESTIONS * 2]
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        results = dspy.Parallel(num_threads=6)([(predict, e) for e in examples])
    assert [r.answer for r in results] == ["blue"] * 6


def test_cache_never_answers_one_model_with_anothers(models, tmp_path):
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    try:
        folder = tmp_path / "models" / "all"  # one run's folder, trained twice
        shutil.copytree(models["blue"], folder)
        first = FinetunedLM(str(folder), max_tokens=24, device="cpu", cache=True)
        prompt = "Repeat after me: river stone."
        answer = first(prompt)
        assert first(prompt) == answer and first.history[-1]["usage"] == {}  # cached: DSPy's cache is on
        assert first.model.startswith(f"bootfinetune/{tmp_path.name}/all@")

        shutil.rmtree(folder)
        shutil.copytree(models["base"], folder)  # trained again: other weights in the same folder
        second = FinetunedLM(str(folder), max_tokens=24, device="cpu", cache=True)
        assert second.model != first.model
        assert FinetunedLM(str(folder), max_length=64).model == second.model + "~64"  # shorter prompts: other answers
        fresh = finetuned_engine(second).generate([[{"role": "user", "content": prompt}]], max_tokens=24)
        assert second(prompt) == fresh != answer
        assert second.history[-1]["usage"]["completion_tokens"] > 0  # computed, not read from the cache
        # The first LM's weights are gone: it refuses to answer under its name with the new ones.
        with pytest.raises(Exception, match="no longer holds the model") as err:
            first("another prompt")
        assert isinstance(err.value, ProgramError) or "trained again" in str(err.value)
    finally:
        dspy.configure_cache()


LOAD_SCRIPT = r"""
import json, pickle, sys
import dspy
from bootfinetune.serving.lm import FinetunedLM, finetuned_engine
kind, path, model_dir = sys.argv[1:4]
if kind == "cloudpickle":
    program = pickle.loads(open(path, "rb").read())
elif kind == "program_dir":
    program = dspy.load(path, allow_pickle=True)
else:
    program = dspy.Predict("question -> answer")
    try:
        program.load(path)
        raise SystemExit("a custom engine loaded without allow_unsafe_lm_state")
    except ValueError as exc:
        assert "allow_unsafe_lm_state" in str(exc), exc
    program.load(path, allow_unsafe_lm_state=True)
lm = program.lm
assert type(lm) is dspy.LM and finetuned_engine(lm) is not None, lm
with dspy.context(adapter=dspy.ChatAdapter()):
    answers = [program(question=q).answer for q in json.loads(sys.argv[4])]
print("RESULT=" + json.dumps({"answers": answers, "model": lm.model, "rebuilt": FinetunedLM(model_dir).model}))
"""


def test_pickle_program_dir_and_json_load_in_a_new_process(models, tmp_path):
    import cloudpickle

    program = dspy.Predict("question -> answer")
    program.lm = FinetunedLM(str(models["blue"]), max_tokens=24, device="cpu")
    (tmp_path / "program.pkl").write_bytes(cloudpickle.dumps(program))
    program.save(str(tmp_path / "program_dir"), save_program=True)
    program.save(str(tmp_path / "program.json"))
    state = json.loads((tmp_path / "program.json").read_text())["lm"]
    assert state["engine"]["class"] == "bootfinetune.serving.lm:FinetunedEngine" and "api_key" not in json.dumps(state)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # One new process per form, started together: each loads alone (no engine cached by another load), and
    # their start-ups (imports of torch, transformers, dspy: most of the time) overlap.
    procs = {kind: subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, kind, str(tmp_path / name),
                                     str(models["blue"]), json.dumps(QUESTIONS)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for kind, name in [("cloudpickle", "program.pkl"), ("program_dir", "program_dir"),
                                ("json", "program.json")]}
    try:
        for kind, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, (kind, stderr[-3000:])
            result = json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT=")][-1][7:])
            # The same model string in a new process (DSPy's cache key), from the saved state and rebuilt alike.
            assert result == {"answers": ["blue"] * 3, "model": program.lm.model, "rebuilt": program.lm.model}, kind
    finally:
        for proc in procs.values():  # a failed or hung load leaves no process behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_engine_pickles_without_its_batcher_and_answers_after(models):
    lm = FinetunedLM(str(models["blue"]), max_tokens=24, device="cpu")
    copy = pickle.loads(pickle.dumps(lm))
    assert copy.model == lm.model and finetuned_engine(copy) is not finetuned_engine(lm)
    with dspy.context(adapter=dspy.ChatAdapter()):
        predict = dspy.Predict("question -> answer")
        predict.lm = copy
        assert predict(question=QUESTIONS[2]).answer == "blue"


def test_a_compiled_program_given_as_student_trains_on_from_its_folders(models):
    from bootfinetune.stages.checks import target_from_lm

    assert target_from_lm(FinetunedLM(str(models["blue"]), device="cpu")) == str(models["blue"])
    assert target_from_lm(dspy.LM("openai/local:/models/x")) == "/models/x"


def test_the_workers_cuda_device_becomes_this_cpu_and_a_model_too_big_for_it_is_refused(tmp_path, monkeypatch, caplog):
    import logging

    import torch

    from bootfinetune.serving.device import check_fits, load_device, weights_bytes
    from bootfinetune.serving.lm import loaded_models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a head without GPUs, wherever this runs
    model = build_tiny_causal(tmp_path / "tiny", hidden_size=32, num_layers=1)
    with caplog.at_level(logging.WARNING, logger="bootfinetune.serving.device"):
        lm = FinetunedLM(str(model), device="cuda", max_tokens=2)  # "cuda": the run's workers had one
        lm("hello")
    assert (str(model), "cpu") in loaded_models()
    assert "device 'cuda' (where the run's workers ran it) is not on this machine" in caplog.text
    assert load_device(None, "m") == "cpu" and load_device("cpu", "m") == "cpu"
    need = weights_bytes(str(model))
    assert need == sum(f.stat().st_size for f in model.glob("*.safetensors")) > 0  # float32 as stored
    check_fits(str(model), "cpu", available=2 * need)
    with pytest.raises(ProgramError, match=r"GiB on this machine's CPU.*bootfinetune serve RUN_DIR.*serve_url="):
        check_fits(str(model), "cpu", available=need // 2)
    check_fits(str(model), "cuda", available=0)  # an accelerator's own out-of-memory error names itself
