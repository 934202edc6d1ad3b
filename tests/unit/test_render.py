"""The renderer: loss masks, EOS, prompt-side truncation and its count, prompt-only rendering (no Ray)."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoConfig, AutoTokenizer, GPT2Config, LlamaConfig, PretrainedConfig, T5Config

from bootfinetune.training.render import (
    FIXED_GENERATION_PROMPT,
    IGNORE_INDEX,
    Encoded,
    collate,
    decode_answer,
    encode_example,
    encode_prompt,
    encode_records,
    model_kind,
    render_prompt_text,
    renderer_identity,
)
from bootfinetune.training.answer_tokens import add_answer_tokens
from bootfinetune.testing.tiny_models import build_tiny_causal, build_tiny_t5, toy_records

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "[[ ## question ## ]]\nWhat is 2 plus 2?"},
    {"role": "assistant", "content": "[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dirs = {"chat": build_tiny_causal(root / "chat"),
            "plain": build_tiny_causal(root / "plain", arch="gpt2", chat_template=False),
            "t5": build_tiny_t5(root / "t5")}
    return {name: (AutoTokenizer.from_pretrained(d), model_kind(AutoConfig.from_pretrained(d)))
            for name, d in dirs.items()}


@pytest.mark.parametrize("name", ["chat", "plain"])
def test_causal_loss_only_on_answer_which_ends_with_eos(tokenizers, name):
    tok, kind = tokenizers[name]
    assert kind == "causal"
    enc = encode_example(tok, MESSAGES, kind, max_length=1024)
    prompt = encode_prompt(tok, MESSAGES[:-1], kind)
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = enc.labels[len(prompt):]
    assert IGNORE_INDEX not in answer and answer == enc.input_ids[len(prompt):]
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer, skip_special_tokens=True) == MESSAGES[-1]["content"]
    assert not enc.truncated


def test_chat_template_renders_prompt_when_present_else_fixed_template(tokenizers):
    chat, _ = tokenizers["chat"]
    plain, _ = tokenizers["plain"]
    assert render_prompt_text(chat, MESSAGES[:-1]) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n[[ ## question ## ]]\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt_text(plain, MESSAGES[:-1]) == (
        "<|system|>\nAnswer briefly.\n<|user|>\n[[ ## question ## ]]\nWhat is 2 plus 2?\n" + FIXED_GENERATION_PROMPT)
    # With a template, the answer ends with the template's own end of turn (here it is the eos).
    enc = encode_example(chat, MESSAGES, "causal", 1024)
    assert chat.decode(enc.input_ids).endswith("[[ ## completed ## ]]<|im_end|>")
    assert renderer_identity(chat, "causal")["template"] == "chat_template"
    assert renderer_identity(plain, "causal")["template"] == "fixed"
    assert renderer_identity(chat, "causal")["template_sha"] != renderer_identity(plain, "causal")["template_sha"]


@pytest.mark.parametrize("name", ["chat", "plain", "t5"])
def test_prompt_only_rendering_equals_training_prompt(tokenizers, name):
    tok, kind = tokenizers[name]
    for record in toy_records(5, seed=3):
        messages = record["messages"]
        enc = encode_example(tok, messages, kind, max_length=1024)
        prompt = encode_prompt(tok, messages[:-1], kind)
        if kind == "causal":
            assert enc.input_ids[:len(prompt)] == prompt
            assert enc.input_ids[len(prompt):] == [t for t in enc.labels if t != IGNORE_INDEX]
        else:
            assert enc.input_ids == prompt


def test_seq2seq_prompt_to_encoder_answer_to_decoder(tokenizers):
    tok, kind = tokenizers["t5"]
    assert kind == "seq2seq"
    enc = encode_example(tok, MESSAGES, kind, max_length=1024)
    assert enc.input_ids[-1] == tok.eos_token_id  # T5's tokenizer ends the encoder input with </s>
    assert "completed" not in tok.decode(enc.input_ids)
    assert IGNORE_INDEX not in enc.labels and enc.labels[-1] == tok.eos_token_id
    # T5's SentencePiece loses the answer's newlines; with "\n" added (see training/answer_tokens.py) it keeps them.
    assert decode_answer(tok, enc.labels) == "[[ ## answer ## ]] 4 [[ ## completed ## ]]"
    extended = copy.deepcopy(tok)
    add_answer_tokens(extended, ["\n"])
    labels = encode_example(extended, MESSAGES, kind, max_length=1024).labels
    assert decode_answer(extended, labels) == MESSAGES[-1]["content"]
    assert extended.decode(labels, skip_special_tokens=True) == "[[ ## answer ## ]]\n 4\n\n [[ ## completed ## ]]"


@pytest.mark.parametrize("name", ["chat", "plain"])
def test_causal_truncation_cuts_prompt_side_keeps_answer_and_is_counted(tokenizers, name):
    tok, kind = tokenizers[name]
    full = encode_example(tok, MESSAGES, kind, max_length=1024)
    n_answer = full.answer_tokens
    limit = n_answer + 10
    cut = encode_example(tok, MESSAGES, kind, max_length=limit)
    assert cut.truncated and len(cut.input_ids) == limit
    assert cut.input_ids[-n_answer:] == full.input_ids[-n_answer:]  # answer whole
    assert cut.labels[-n_answer:] == full.labels[-n_answer:] and cut.answer_tokens == n_answer
    assert cut.input_ids[:10] == full.input_ids[-limit:-n_answer]  # the prompt's tail was kept
    assert cut.input_ids == encode_prompt(tok, MESSAGES[:-1], kind, max_length=10) + full.input_ids[-n_answer:]

    long_user = {"role": "user", "content": "word " * 200}
    records = [{"messages": MESSAGES}, {"messages": [long_user, MESSAGES[-1]]}, {"messages": MESSAGES}]
    encoded, truncated = encode_records(tok, records, kind, max_length=len(full.input_ids))
    assert truncated == 1 and [e.truncated for e in encoded] == [False, True, False]
    assert all(len(e.input_ids) <= len(full.input_ids) for e in encoded)


def test_answer_longer_than_max_length_keeps_some_prompt(tokenizers):
    tok, kind = tokenizers["plain"]
    messages = [MESSAGES[1], {"role": "assistant", "content": "long answer " * 100}]
    enc = encode_example(tok, messages, kind, max_length=64)
    assert enc.truncated and len(enc.input_ids) == 64
    assert enc.labels[:16] == [IGNORE_INDEX] * 16 and enc.answer_tokens == 48


def test_seq2seq_truncation(tokenizers):
    tok, kind = tokenizers["t5"]
    messages = [{"role": "user", "content": "word " * 200}, MESSAGES[-1]]
    enc = encode_example(tok, messages, kind, max_length=32)
    assert enc.truncated and len(enc.input_ids) == 32 and enc.input_ids[-1] == tok.eos_token_id
    assert enc.labels == encode_example(tok, MESSAGES, kind, 1024).labels  # the answer is untouched


def test_model_kind_from_config():
    assert model_kind(T5Config()) == "seq2seq"
    assert model_kind(LlamaConfig()) == "causal"
    assert model_kind(GPT2Config()) == "causal"
    assert model_kind(PretrainedConfig(architectures=["T5ForConditionalGeneration"])) == "seq2seq"
    assert model_kind(PretrainedConfig(architectures=["LlamaForCausalLM"])) == "causal"


def test_collate_pads_right_and_masks():
    batch = collate([Encoded([5, 6, 7], [-100, 6, 7], False), Encoded([5, 8], [-100, 8], False)], pad_id=0,
                    pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, 8, -100, -100]]
    seq2seq = collate([Encoded([1, 2, 3], [9], False), Encoded([1], [9, 9, 9, 9, 9], False)], pad_id=0)
    assert seq2seq["input_ids"].shape == (2, 3) and seq2seq["labels"].shape == (2, 5)


def test_bad_messages_are_refused(tokenizers):
    tok, kind = tokenizers["plain"]
    with pytest.raises(ValueError, match="final assistant"):
        encode_example(tok, MESSAGES[:-1], kind, 128)
    with pytest.raises(ValueError, match="role"):
        encode_prompt(tok, [{"role": "user"}], kind)


@pytest.mark.parametrize("name", ["chat", "plain", "t5"])
def test_batch_encoding_gives_the_ids_of_one_call_per_text(tokenizers, name):
    """Records are tokenized in batch calls; each gets the ids a call of its own gives (byte-level BPE with and
    without a chat template, T5's SentencePiece), including uneven lengths, accents, whitespace and a cut one."""
    tok, kind = tokenizers[name]
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in [("Où est Zoë?  Kraków\n\tnow", "Kraków, Poland"), ("x", "y"),
                            ("a much longer question " * 12, "a longer answer " * 3), ("2+2?", " 4 ")]]
    records += [{"messages": MESSAGES}]
    batch, cut = encode_records(tok, records, kind, 48)
    alone = [encode_records(tok, [r], kind, 48)[0][0] for r in records]
    assert batch == alone and cut == sum(e.truncated for e in alone) >= 1
    for r, e in zip(records, batch):  # uncut prompts are exactly what inference sends (one call per text)
        if not e.truncated:
            prompt = encode_prompt(tok, r["messages"][:-1], kind)
            assert (e.input_ids if kind == "seq2seq" else e.input_ids[:len(prompt)]) == prompt
