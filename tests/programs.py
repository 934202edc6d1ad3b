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


def two_step_metric(example, prediction, trace=None):
    return prediction.answer == example.answer


def two_step_examples(n: int, offset: int = 0) -> list[dspy.Example]:
    """`n` examples; every 7th takes the branch, every 5th gets a wrong teacher answer."""
    examples = []
    for i in range(offset, offset + n):
        text = f"skip item {i}" if i % 7 == 3 else (f"bad item {i}" if i % 5 == 4 else f"item {i}")
        examples.append(dspy.Example(text=text, answer=(text + "!!").upper()).with_inputs("text"))
    return examples
