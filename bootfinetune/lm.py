"""The finetuned LM: a `dspy.BaseLM` that runs a Hugging Face model in this process.

Prompts go through the same renderer as training (`render.encode_prompt`), so the model
sees at inference exactly the token ids it was trained on. The model loads lazily on the
first call; calls arriving from several threads at once (dspy.Parallel, Evaluate) are
gathered into one batched `generate`. Greedy decoding unless a temperature is given.

    lm = FinetunedLM("runs/RAG-1a2b/models/all")
    program.set_lm(lm)

Loaded weights are shared per (directory, device) within a process, so predictors whose
LMs were restored separately (JSON state) still hold one copy of the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dspy

from bootfinetune.render import decode_answer, encode_prompt, model_kind

_LOADED: dict[tuple[str, str], tuple[Any, Any, str]] = {}
_LOAD_LOCK = threading.Lock()


def load_model(model_dir: str, device: str, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) for a directory, loaded once per process and device.

    A LoRA adapter directory (see `bootfinetune.lora`) gives its base wrapped in PEFT: every
    adapter on the same base and device shares that one model, and `adapter_selected` picks
    the adapter a call runs with.
    """
    from bootfinetune.lora import is_adapter

    key = (str(model_dir), device)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = (_load_adapter if is_adapter(model_dir) else _load_full)(str(model_dir), device,
                                                                                    trust_remote_code)
        return _LOADED[key]


def _load_full(model_dir: str, device: str, trust_remote_code: bool) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    kind = model_kind(config)
    cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = cls.from_pretrained(model_dir, use_safetensors=True, dtype=dtype,
                                trust_remote_code=trust_remote_code).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer, kind


_ADAPTER_BASES: dict[tuple[str, str], tuple[Any, str, threading.Lock]] = {}
"""(base, device) -> (the PEFT model holding every adapter loaded on that base, kind, its lock)."""


def adapter_name(model_dir: str) -> str:
    """The name an adapter directory's weights carry inside the shared PEFT model."""
    from bootfinetune.rundir import fingerprint

    return "a" + fingerprint(str(Path(model_dir).resolve()))


def _load_adapter(model_dir: str, device: str, trust_remote_code: bool) -> tuple[Any, Any, str]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from bootfinetune.lora import adapter_base

    base_dir = adapter_base(model_dir)
    base_key = (base_dir, device)
    name = adapter_name(model_dir)
    if base_key not in _ADAPTER_BASES:
        # Its own copy of the base: PEFT injects adapter layers into the modules it wraps.
        base, _, kind = _load_full(base_dir, device, trust_remote_code)
        model = PeftModel.from_pretrained(base, model_dir, adapter_name=name).eval()
        _ADAPTER_BASES[base_key] = (model, kind, threading.Lock())
    model, kind, lock = _ADAPTER_BASES[base_key]
    with lock:
        if name not in model.peft_config:
            model.load_adapter(model_dir, adapter_name=name)
            model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer, kind


@contextlib.contextmanager
def adapter_selected(model_dir: str, device: str):
    """Holds the shared base's lock with this directory's adapter active (a no-op for full models)."""
    from bootfinetune.lora import adapter_base, is_adapter

    if not is_adapter(model_dir):
        yield
        return
    model, _, lock = _ADAPTER_BASES[(adapter_base(model_dir), device)]
    with lock:
        model.set_adapter(adapter_name(model_dir))
        yield


def unload_model(model_dir: str) -> None:
    """Forgets a directory's loaded weights (every device); an LM still using them reloads on its next call."""
    with _LOAD_LOCK:
        for key in [k for k in _LOADED if k[0] == str(model_dir)]:
            del _LOADED[key]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _MicroBatcher:
    """Gathers concurrent requests into batches: the first waiting thread runs them for everyone."""

    def __init__(self, run_batch, max_batch: int, wait_s: float = 0.01):
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_s
        self.lock = threading.Lock()
        self.pending: list[tuple[Any, Future]] = []
        self.leader = False

    def submit(self, item: Any) -> Any:
        future: Future = Future()
        with self.lock:
            self.pending.append((item, future))
            lead = not self.leader
            self.leader = self.leader or lead
        if lead:
            time.sleep(self.wait_s)  # let concurrent callers join this batch
            while True:
                with self.lock:
                    batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch:]
                    if not batch:
                        self.leader = False
                        break
                try:
                    results = self.run_batch([b[0] for b in batch])
                    for (_, fut), result in zip(batch, results):
                        fut.set_result(result)
                except BaseException as exc:  # hand the error to every caller of the batch
                    for _, fut in batch:
                        fut.set_exception(exc)
        return future.result()


class FinetunedLM(dspy.BaseLM):
    """Calls a finetuned Hugging Face model in process.

    Args:
        model: The model directory (an export under `models/{key}/`) or a hub id.
        key: The model key it was trained for (informational).
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when present.
        max_tokens: Most new tokens per answer.
        temperature: 0 for greedy decoding; above 0 samples.
        batch_size: Most prompts per `generate` call.
        max_length: Prompt tokens kept (cut from the left, as in training); None reads the manifest.
        trust_remote_code: Allow the model repository's own code to run.
        source: The model's cloud URI (a run on `s3://`/`gs://` storage): where `model` is fetched
            from on a node that lacks that folder.
    """

    def __init__(self, model: str, *, key: str | None = None, device: str | None = None, max_tokens: int = 512,
                 temperature: float = 0.0, batch_size: int = 8, max_length: int | None = None,
                 trust_remote_code: bool = False, source: str | None = None, **kwargs: Any):
        kwargs.pop("model_type", None)
        super().__init__(model=str(model), model_type="chat", temperature=temperature, max_tokens=max_tokens,
                         cache=False, num_retries=0)
        self.key = key
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length if max_length is not None else self._manifest_max_length()
        self.trust_remote_code = trust_remote_code
        self.source = source
        self._batcher = _MicroBatcher(self._generate_batch, max_batch=batch_size)

    def fetch(self) -> None:
        """Downloads the model from `source` when this node lacks its folder (runs on cloud storage)."""
        if self.source and not (Path(self.model) / "manifest.json").exists():
            from bootfinetune.storage import pull

            pull(self.source, Path(self.model))

    def _manifest_max_length(self) -> int | None:
        manifest = Path(self.model) / "manifest.json"
        if manifest.exists():
            truncated = json.loads(manifest.read_text()).get("truncated", {})
            return truncated.get("prompt_max_length") or truncated.get("max_length")
        return None

    # -- DSPy's interface -------------------------------------------------------------------
    def forward(self, prompt: str | None = None, messages: list[dict] | None = None, **kwargs: Any):
        messages = messages or [{"role": "user", "content": prompt or ""}]
        options = {**self.kwargs, **kwargs}
        n = int(options.get("n") or 1)
        texts, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for _ in range(n):
            text, prompt_tokens, new_tokens = self.complete(messages, options.get("max_tokens"),
                                                            options.get("temperature"))
            texts.append(text)
            usage["prompt_tokens"] += prompt_tokens
            usage["completion_tokens"] += new_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return SimpleNamespace(
            model=self.model, usage=usage, _hidden_params={},
            choices=[SimpleNamespace(index=i, finish_reason="stop",
                                     message=SimpleNamespace(role="assistant", content=t))
                     for i, t in enumerate(texts)])

    async def aforward(self, prompt: str | None = None, messages: list[dict] | None = None, **kwargs: Any):
        return await asyncio.to_thread(self.forward, prompt=prompt, messages=messages, **kwargs)

    def complete(self, messages: list[Any], max_tokens: int | None = None,
                 temperature: float | None = None) -> tuple[str, int, int]:
        """One answer: (text, prompt tokens, new tokens). Concurrent callers share batched `generate` calls."""
        limit = int(max_tokens or self.kwargs.get("max_tokens") or 512)
        temp = float(temperature if temperature is not None else self.kwargs.get("temperature") or 0.0)
        return self._batcher.submit((_plain_messages(messages), limit, temp))

    def generate(self, conversations: list[list[dict]], max_tokens: int | None = None) -> list[str]:
        """Answers many conversations at once (greedy), in batches of `batch_size`."""
        limit = max_tokens or int(self.kwargs.get("max_tokens") or 512)
        out = []
        for i in range(0, len(conversations), self.batch_size):
            chunk = [(_plain_messages(c), limit, 0.0) for c in conversations[i:i + self.batch_size]]
            out += [text for text, _, _ in self._generate_batch(chunk)]
        return out

    # -- generation ---------------------------------------------------------------------------
    def _generate_batch(self, requests: list[tuple[list[dict], int, float]]) -> list[tuple[str, int, int]]:
        """Answers requests (messages, max new tokens, temperature): one `generate` per distinct temperature."""
        results: list[tuple[str, int, int]] = [("", 0, 0)] * len(requests)
        by_temperature: dict[float, list[int]] = {}
        for i, request in enumerate(requests):
            by_temperature.setdefault(request[2], []).append(i)
        for temperature, rows in by_temperature.items():
            answers = self._generate_same_temperature([requests[i] for i in rows], temperature)
            for i, answer in zip(rows, answers):
                results[i] = answer
        return results

    def _generate_same_temperature(self, requests: list[tuple[list[dict], int, float]],
                                   temperature: float) -> list[tuple[str, int, int]]:
        import torch

        device = self.device or default_device()
        self.fetch()
        model, tokenizer, kind = load_model(self.model, device, self.trust_remote_code)
        prompts = [encode_prompt(tokenizer, msgs, kind, self.max_length) for msgs, _, _ in requests]
        max_new = max(r[1] for r in requests)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        # Causal models continue the prompt, so pad on the left; encoders take right padding.
        left = kind == "causal"
        ids = [([pad] * (width - len(p)) + p) if left else (p + [pad] * (width - len(p))) for p in prompts]
        mask = [([0] * (width - len(p)) + [1] * len(p)) if left else ([1] * len(p) + [0] * (width - len(p)))
                for p in prompts]
        gen_kwargs = dict(max_new_tokens=max_new, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        gen_kwargs.update(do_sample=True, temperature=temperature) if temperature > 0 else \
            gen_kwargs.update(do_sample=False)
        with torch.no_grad(), adapter_selected(self.model, device):
            output = model.generate(input_ids=torch.tensor(ids, device=device),
                                    attention_mask=torch.tensor(mask, device=device), **gen_kwargs)
        results = []
        for prompt, row, (_, limit, _) in zip(prompts, output.tolist(), requests):
            new = row[width:] if left else row[1:]  # seq2seq output starts with the decoder start token
            new = _until_eos(new, tokenizer.eos_token_id, pad)[:limit]  # the batch ran to its longest limit
            results.append((decode_answer(tokenizer, new), len(prompt), len(new)))
        return results

    # -- state --------------------------------------------------------------------------------
    def dump_state(self) -> dict[str, Any]:
        state = super().dump_state()
        state.update(key=self.key, device=self.device, batch_size=self.batch_size, max_length=self.max_length,
                     trust_remote_code=self.trust_remote_code, source=self.source)
        for name in ("cache", "num_retries", "model_type"):
            state.pop(name, None)
        return state

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_batcher", None)  # locks and futures stay behind; weights are reloaded lazily
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._batcher = _MicroBatcher(self._generate_batch, max_batch=self.batch_size)

    def copy(self, **kwargs: Any) -> "FinetunedLM":
        new = super().copy(**kwargs)
        new._batcher = _MicroBatcher(new._generate_batch, max_batch=new.batch_size)
        return new


def _plain_messages(messages: list[Any]) -> list[dict[str, str]]:
    plain = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", "user")
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        if isinstance(content, list):  # content parts: keep the text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        plain.append({"role": str(role), "content": str(content)})
    return plain


def _until_eos(tokens: list[int], eos: int | None, pad: int | None) -> list[int]:
    for i, t in enumerate(tokens):
        if t == eos:
            return tokens[:i]
    return [t for t in tokens if t != pad]
