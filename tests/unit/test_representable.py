"""Answers a T5-like tokenizer cannot write: found by encoding, fixed with added tokens, refused when unfixable (no Ray)."""

from __future__ import annotations

import copy
import json

import dspy
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from bootfinetune.config import TrainConfig
from bootfinetune.errors import ConfigError
from bootfinetune.stages.finetune import decide_tokens, finetune_models
from bootfinetune.stages.finetune_job import FinetuneJob
from bootfinetune.run.jsonio import write_jsonl
from bootfinetune.training.render import decode_answer
from bootfinetune.stages.token_plan import (adapter_parse, check_lora, layout_parse, lost_characters, plan_tokens,
                                            raise_if_unfixable)
from bootfinetune.training.answer_tokens import add_answer_tokens, fit_embeddings, roundtrip
from bootfinetune.run.rundir import RunDir
from bootfinetune.testing.tiny_models import build_tiny_causal, build_tiny_t5

SIGNATURE = dspy.ChainOfThought("context, question -> answer").predict.signature
ANSWER = {"reasoning": "The context says thing3 is red.", "answer": "red"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"t5": build_tiny_t5(root / "t5"), "bpe": build_tiny_causal(root / "bpe")}


@pytest.fixture(scope="module")
def t5(dirs):
    return AutoTokenizer.from_pretrained(dirs["t5"])


@pytest.fixture(scope="module")
def bpe(dirs):
    return AutoTokenizer.from_pretrained(dirs["bpe"])


def answers(adapter: str) -> str:
    """The same answer as each DSPy adapter writes it."""
    if adapter == "chat":
        return "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in ANSWER.items()) + "[[ ## completed ## ]]"
    if adapter == "json":
        return json.dumps(ANSWER, indent=2)
    return "\n".join(f"<{k}>\n{v}\n</{k}>" for k, v in ANSWER.items())


ADAPTERS = {"chat": dspy.ChatAdapter(), "json": dspy.JSONAdapter(), "xml": dspy.XMLAdapter()}


def record(text: str, i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}],
            "predictor": "generate_answer.predict", "example_index": i}


def test_t5_like_tokenizer_collapses_whitespace_and_lacks_braces(t5):
    assert roundtrip(t5, "a\n\nb\tc   d") == "a b c d"
    vocab = t5.get_vocab()
    for c in "{}<":
        assert c not in vocab and "▁" + c not in vocab
        assert t5.unk_token_id in t5(f"a{c}b", add_special_tokens=False)["input_ids"]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5("a")["input_ids"][-1] == t5.eos_token_id  # </s> ends every encoded text


def test_lost_characters_are_found_by_encoding(t5, bpe):
    assert lost_characters(t5, "x = {a}\n<b> [c] #d") == ["{", "}", "\n", "<"]
    assert lost_characters(bpe, "x = {a}\n<b> [c] #d\t") == []


@pytest.mark.parametrize("name", ["chat", "json", "xml"])
def test_every_adapters_answer_is_lost_then_fixed(t5, name):
    adapter, text = ADAPTERS[name], answers(name)
    assert adapter.parse(SIGNATURE, text) == ANSWER
    with pytest.raises(Exception):  # what main trains on: the answer's layout or braces are gone
        assert adapter.parse(SIGNATURE, roundtrip(t5, text)) == ANSWER
    parse = adapter_parse(adapter, {"generate_answer.predict": SIGNATURE})
    plan = plan_tokens(t5, [record(text, i) for i in range(3)], parse, key="all", target="t5")
    assert plan.answers == 3 and plan.needed == 3 and plan.unfixable_count == 0
    assert set(plan.added_tokens) == {"chat": {"\n"}, "json": {"\n", "{", "}"}, "xml": {"\n", "<"}}[name]
    extended = copy.deepcopy(t5)
    assert add_answer_tokens(extended, plan.added_tokens) == len(plan.added_tokens)
    assert adapter.parse(SIGNATURE, roundtrip(extended, text)) == ANSWER
    assert len(t5) < len(extended)  # the plan did not touch the tokenizer it was given


def test_chat_answers_roundtrip_exactly_after_the_fix(t5):
    extended = copy.deepcopy(t5)
    add_answer_tokens(extended, ["\n"])
    text = answers("chat")
    ids = extended(text, add_special_tokens=False)["input_ids"]
    assert decode_answer(extended, ids) == text
    assert "\n " in extended.decode(ids)  # the plain decode has Metaspace's space after each "\n"


def test_byte_level_tokenizer_needs_nothing(bpe):
    parse = adapter_parse(ADAPTERS["chat"], {"generate_answer.predict": SIGNATURE})
    plan = plan_tokens(bpe, [record(answers(n)) for n in ADAPTERS], parse, key="all", target="bpe")
    assert plan.answers == 3 and plan.needed == 0 and plan.added_tokens == []


def test_unfixable_loss_names_the_text_and_the_fix(t5):
    text = answers("chat").replace("is red", "is  red")  # a run of spaces inside a value
    plan = plan_tokens(t5, [record(answers("chat")), record(text, 7)],
                       adapter_parse(ADAPTERS["chat"], {"generate_answer.predict": SIGNATURE}), key="all", target="t5")
    assert plan.needed == 2 and plan.added_tokens == ["\n"] and plan.unfixable_count == 1
    with pytest.raises(ConfigError, match=r"1 of 2 answers lose.*is  red.*example 7.*Fix: use a target"):
        raise_if_unfixable([plan])


def test_lora_with_added_tokens_is_refused(t5):
    plan = plan_tokens(t5, [record(answers("chat"))], layout_parse, key="all", target="t5")
    check_lora([plan], lora=False)
    with pytest.raises(ConfigError, match=r"lora: .* needs new tokens \['\\n'\].*Fix: lora=False"):
        check_lora([plan], lora=True)


def test_finetune_decides_tokens_itself_and_refuses_before_ray(tmp_path, dirs, monkeypatch):
    """A job without a decision (ray_jobs/finetune.py, the provider) is checked by finetune_models, before Ray."""
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("finetune_models reached Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    run = RunDir.at(str(tmp_path), "r")
    write_jsonl(run.data_file("all"), [record(answers("chat"))])
    job = FinetuneJob(key="all", target=str(dirs["t5"]), predictors=("generate_answer.predict",),
                      train_file=run.data_file("all"))
    with pytest.raises(ConfigError, match=r"lora: .* needs new tokens \['\\n'\]"):
        finetune_models(run, [job], TrainConfig(target=str(dirs["t5"]), lora=True))
    [decided] = decide_tokens([job], TrainConfig(target=str(dirs["t5"])))
    assert decided.added_tokens == ("\n",)
    assert not run.checkpoints_dir().exists() and not run.model_dir("all").exists()


@pytest.mark.parametrize("spare", [0, 8])
def test_fit_embeddings_new_rows_start_at_the_mean(t5, dirs, spare):
    model = AutoModelForSeq2SeqLM.from_pretrained(dirs["t5"])
    if spare:  # like real T5 checkpoints: more embedding rows than tokenizer entries
        model.resize_token_embeddings(len(t5) + spare)
    base = len(t5)
    extended = copy.deepcopy(t5)
    add_answer_tokens(extended, ["\n", "{", "}"])
    old = model.get_input_embeddings().weight[:base].detach().clone()
    rows = fit_embeddings(model, extended, base)
    weight = model.get_input_embeddings().weight
    assert rows == weight.shape[0] == max(base + 3, base + spare)
    assert torch.equal(weight[:base], old)
    assert torch.allclose(weight[base:base + 3], old.mean(dim=0).expand(3, -1))
    assert model.get_output_embeddings().weight.shape[0] == rows
