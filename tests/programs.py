"""Small DSPy programs and a scripted teacher used across the tests."""

from __future__ import annotations

import dspy


class TwoStep(dspy.Module):
    """Two predictors: `rewrite` runs twice per example (a loop); `answer` is skipped on a branch."""

    def __init__(self):
        super().__init__()
        self.rewrite = dspy.Predict("text -> rewritten")
        self.answer = dspy.ChainOfThought("rewritten -> answer")

    def forward(self, text):
        rewritten = text
        for _ in range(2):
            rewritten = self.rewrite(text=rewritten).rewritten
        if text.startswith("skip"):
            return dspy.Prediction(answer=rewritten.upper())
        return self.answer(rewritten=rewritten)


def two_step_script(inputs: dict[str, str], outputs: list[str]) -> dict[str, str]:
    """The teacher's answers: rewrite appends '!', answer upper-cases; 'bad' inputs get a wrong answer."""
    if "text" in inputs:
        if "boom" in inputs["text"]:
            raise RuntimeError("teacher exploded")
        return {"rewritten": inputs["text"] + "!"}
    value = inputs["rewritten"]
    answer = "WRONG" if "bad" in value else value.upper()
    return {"reasoning": f"upper-case {value}", "answer": answer}


def two_step_teacher_calls(examples: list[dspy.Example]) -> int:
    """The teacher calls TwoStep makes for `examples`: `rewrite` twice, then `answer` unless the text takes the branch."""
    return sum(2 if ex.text.startswith("skip") else 3 for ex in examples)


def two_step_metric(example, prediction, trace=None):
    return prediction.answer == example.answer


def two_step_examples(n: int, offset: int = 0) -> list[dspy.Example]:
    """`n` examples; every 7th takes the branch, every 5th gets a wrong teacher answer."""
    examples = []
    for i in range(offset, offset + n):
        text = f"skip item {i}" if i % 7 == 3 else (f"bad item {i}" if i % 5 == 4 else f"item {i}")
        examples.append(dspy.Example(text=text, answer=(text + "!!").upper()).with_inputs("text"))
    return examples


class RAG(dspy.Module):
    """The documented DSPy example: retrieve passages, then answer with chain of thought."""

    def __init__(self, num_passages=2):
        super().__init__()
        self.retrieve = dspy.Retrieve(k=num_passages)
        self.generate_answer = dspy.ChainOfThought("context, question -> answer")

    def forward(self, question):
        context = self.retrieve(question).passages
        prediction = self.generate_answer(context=context, question=question)
        return dspy.Prediction(context=context, answer=prediction.answer)


COLORS = {f"thing{i}": ["red", "blue", "green", "gold"][i % 4] for i in range(64)}


def color_rm(query, k=3, **kwargs):
    """A local retriever: the passage about the thing the question names, then a distractor."""
    from dspy.dsp.utils import dotdict

    name = query.rstrip("?").split()[-1]
    other = f"thing{(int(name[5:]) + 1) % 64}" if name.startswith("thing") else "thing0"
    passages = [f"{name} is {COLORS.get(name, 'grey')}.", f"{other} is {COLORS[other]}."]
    return [dotdict(long_text=p) for p in passages[:k]]


def rag_script(inputs: dict[str, str], outputs: list[str]) -> dict[str, str]:
    """The teacher reads the first passage: 'thingN is COLOR.' -> COLOR."""
    import re

    name, color = re.search(r"(thing\d+) is (\w+)", inputs["context"]).groups()
    return {"reasoning": f"The context says {name} is {color}.", "answer": color}


def rag_examples(n: int, offset: int = 0) -> list[dspy.Example]:
    return [dspy.Example(question=f"What color is thing{i}?", answer=COLORS[f"thing{i}"]).with_inputs("question")
            for i in range(offset, offset + n)]


class DiesOnce(TwoStep):
    """TwoStep whose process exits (like a killed actor) the first time it meets `victim`, once per marker file."""

    def __init__(self, marker: str, victim: str = "item 5"):
        super().__init__()
        self.marker, self.victim = marker, victim

    def forward(self, text):
        import os

        if text == self.victim:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)  # the actor process dies mid-batch, as under SIGKILL or an OOM kill
        return super().forward(text)


class KillsItsWorker(TwoStep):
    """TwoStep whose process exits (like a segfault or an OOM kill) every time it meets `victim`."""

    def __init__(self, victim: str = "item 5"):
        super().__init__()
        self.victim = victim

    def forward(self, text):
        import os

        if text == self.victim:
            os._exit(1)  # no exception, no cleanup: the actor process is gone, every time
        return super().forward(text)
