"""The documented RAG program compiled into a T5 whose tokenizer is built like T5's: its answers parse.

T5's SentencePiece collapses newlines, so trained on its tokens as they are, the model
answers ChatAdapter's `[[ ## answer ## ]]\\n...` on one line and no answer parses. The data
stage adds "\\n" as a token, the worker grows the embeddings, and the export carries the
extended tokenizer.
"""

import time
from pathlib import Path

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError
from transformers import AutoTokenizer

from bootfinetune import BootstrapFinetune, finetuned_engine
from bootfinetune.run.jsonio import read_json, read_jsonl
from bootfinetune.training.answer_tokens import roundtrip
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import DEFAULT_CORPUS, build_tiny_t5
from tests.programs import RAG, color_rm, rag_examples, rag_script

pytestmark = pytest.mark.integration

TRAIN, HELD_OUT = 48, 16
"""rag_examples covers 64 things: the first 48 train, the last 16 are never seen."""


@pytest.fixture(scope="module")
def t5_compile(ray_cluster, tmp_path_factory):
    # Like a real T5 vocabulary, this one has the task's words whole ("▁green", not g-r-e-e-n, which a
    # model this small copies badly). No dropout: a 64-wide model then learns the format in 16 short epochs.
    corpus = DEFAULT_CORPUS + ("What color is the thing? The context says it is red, blue, green or gold.",)
    target = str(build_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5-sp", corpus=corpus, dropout=0.0))
    storage = tmp_path_factory.mktemp("runs")
    with TeacherServer(rag_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-unused-t5", cache=False)
        with dspy.context(rm=color_rm):
            tp = BootstrapFinetune(teacher_settings=dict({'lm': teacher}), storage_path=str(storage), max_tokens=96)
            started = time.time()
            compiled = tp.compile(student=RAG(), trainset=rag_examples(TRAIN), target=target,
                                  epochs=16, bsize=4, lr=1e-2)
            seconds = time.time() - started
            outcomes = []
            for example in rag_examples(HELD_OUT, offset=TRAIN):
                try:
                    outcomes.append(("parsed", compiled(question=example.question).answer, example.answer))
                except AdapterParseError as exc:
                    outcomes.append(("unparsed", exc.lm_response, example.answer))
    print(f"t5 compile {seconds:.0f}s; held-out outcomes: {outcomes}")
    return tp, target, outcomes, compiled


def test_answers_of_the_t5_student_parse(t5_compile):
    _, _, outcomes, _ = t5_compile
    parsed = [o for o in outcomes if o[0] == "parsed"]
    # Without the added "\n" the model learns one-line answers and none parses (0 of 16 in the issue). The
    # format is the same in every answer, so a model that learned it writes it for nearly every question;
    # 12 of 16 leaves room for slips. What this tests is the format: a model this small mostly does not
    # copy the right colour from the context, so the parsed values are not checked.
    assert len(parsed) >= 12, outcomes


def test_the_run_records_the_added_token(t5_compile):
    tp, target, _, compiled = t5_compile
    run = tp.run_dir
    answers = [r["messages"][-1]["content"] for r in read_jsonl(run.data_file("all"))]
    base = AutoTokenizer.from_pretrained(target)
    assert answers and all("\n" in a and roundtrip(base, a) != a for a in answers)  # the base loses every one
    tokens = read_json(run.report_json)["stages"]["data"]["tokens"]["all"]
    assert tokens["added_tokens"] == ["\n"] and tokens["needed"] == tokens["answers"] >= len(answers)
    assert tokens["unfixable_count"] == 0
    manifest = read_json(run.model_dir("all") / "manifest.json")
    assert manifest["added_tokens"] == ["\n"]
    exported = AutoTokenizer.from_pretrained(run.model_dir("all"))
    assert len(exported) == len(base) + 1 and all(roundtrip(exported, a) == a for a in answers)
    assert Path(finetuned_engine(compiled.generate_answer.predict.lm).model) == run.model_dir("all")  # inference loads this export
