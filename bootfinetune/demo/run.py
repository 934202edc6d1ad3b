"""The demo's student: a small Llama-style model with its own tokenizer, built once into the user's cache.

Its tokenizer is trained on the demo task's text and its weights are random; `demo_student` is what the
job configs name as `target` (`bootfinetune.demo.run:demo_student`)."""

from __future__ import annotations

from pathlib import Path

import dspy

from bootfinetune.demo.cache import default_cache_dir
from bootfinetune.demo.task import CITIES, ShippingRouter, make_datasets
from bootfinetune.testing.tiny_models import STAMP, build_tiny_causal

STUDENT = dict(arch="llama", hidden_size=96, num_layers=4, num_heads=4, vocab_size=1024, max_positions=512)
"""The demo student's shape: a small Llama, trained from random weights on the CPU."""

def student_corpus(trainset: list) -> list[str]:
    """Text the student's tokenizer is trained on: the demo program's prompts and answers."""
    adapter, program = dspy.ChatAdapter(), ShippingRouter()
    texts = []
    for ex in trainset[:300]:
        for pred, inputs, outputs in ((program.extract, {"message": ex.message}, {"city": ex.city}),
                                      (program.locate, {"city": ex.city}, {"country": ex.country})):
            data = adapter.format_finetune_data(signature=pred.signature, demos=[], inputs=inputs, outputs=outputs)
            texts += [m["content"] for m in data["messages"]]
    texts += [f"{city} {country}\n{city}\n{country}\n" for city, country in CITIES.items()]
    return texts


def build_student(cache_dir: Path, trainset: list) -> tuple[Path, bool]:
    """The demo's student directory (built once, then reused) and whether it was reused."""
    path = cache_dir / "demo-student"
    before = (path / STAMP).stat().st_mtime_ns if (path / STAMP).exists() else None
    built = build_tiny_causal(path, corpus=student_corpus(trainset), **STUDENT)
    return built, before is not None and (built / STAMP).stat().st_mtime_ns == before  # not rewritten


def demo_student() -> str:
    """The demo student's folder, built on first use (for job configs: `target: bootfinetune.demo.run:demo_student`)."""
    return str(build_student(default_cache_dir(), make_datasets()[0])[0])
