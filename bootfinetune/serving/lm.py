"""The finetuned LM: a `dspy.LM` whose engine runs a Hugging Face model in this process.

DSPy 3.4 takes a custom model as an engine (`complete(Request) -> Response`) given to
`dspy.LM(model, engine=..., async_engine=...)`; DSPy keeps the call itself (history, usage,
callbacks, its cache). `FinetunedLM(model_dir)` builds that `dspy.LM` around a
`FinetunedEngine`, which holds the generation:

    lm = FinetunedLM("runs/RAG-1a2b/models/all")    # a dspy.LM
    program.set_lm(lm)
    finetuned_engine(lm).generate([messages])         # batched helper, outside DSPy

Prompts go through the same renderer as training (`render.encode_prompt`), so the model
sees at inference exactly the token ids it was trained on. The model loads lazily on the
first call; calls arriving from several threads at once (dspy.Parallel, Evaluate) are
gathered into one batched `generate`. Greedy decoding unless a temperature is given.

The LM's model string is `bootfinetune/{run}/{key}@{fingerprint}`, the fingerprint taken
from the folder's files: DSPy's cache is keyed by that string, so with `cache=True` two
trained models (or one run name trained twice) never answer with each other's outputs.

Loaded weights are shared per (directory, device) within a process, so predictors whose
LMs were restored separately (JSON state) still hold one copy of the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from bootfinetune.config import InferenceConfig
from bootfinetune.common.chat import plain_messages
from bootfinetune.errors import ProgramError
from bootfinetune.serving.batching import MicroBatcher, StopRows
from bootfinetune.serving.device import check_fits, load_device
from bootfinetune.serving.limits import Control, token_ceiling
from bootfinetune.training.render import decode_answer, encode_prompt, model_kind
from bootfinetune.run.runfiles import ModelManifest, read_record
from bootfinetune.run.jsonio import fingerprint
from bootfinetune.run.storage import pull
from bootfinetune.training.lora import adapter_base, is_adapter

_LOADED: dict[tuple[str, str], tuple[Any, Any, str]] = {}
_LOADED_AS: dict[tuple[str, str], str] = {}
"""(directory, device) -> the fingerprint of the files the loaded weights came from."""
_LOAD_LOCK = threading.Lock()


def load_model(model_dir: str, device: str, trust_remote_code: bool = False,
               fingerprint: str | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) for a directory, loaded once per process and device.

    A LoRA adapter directory (see `bootfinetune.training.lora`) gives its base wrapped in PEFT: every
    adapter on the same base and device shares that one model, and `adapter_selected` picks
    the adapter a call runs with.

    Args:
        fingerprint: The `model_fingerprint` the caller was built for. Weights loaded from other
            files (the folder was trained again since) are reloaded; a folder that no longer holds
            those files raises, since answering would put another model's outputs under this name.
    """
    key = (str(model_dir), device)
    with _LOAD_LOCK:
        if key in _LOADED and fingerprint in (None, _LOADED_AS.get(key)):
            return _LOADED[key]
        found = model_fingerprint(model_dir)
        if fingerprint is not None and found != fingerprint:
            raise ProgramError(
                f"model: {model_dir} no longer holds the model this LM was built for (fingerprint {fingerprint}, "
                f"now {found}): it was trained again or replaced. Rebuild the program from the run "
                f"(bootfinetune.load(run_dir)) or make a new FinetunedLM for the folder.")
        check_fits(str(model_dir), device)
        if is_adapter(model_dir):
            _LOADED[key] = _load_adapter(str(model_dir), device, trust_remote_code, found)
        else:
            _LOADED[key] = _load_full(str(model_dir), device, trust_remote_code)
        _LOADED_AS[key] = found
        return _LOADED[key]


def loaded_models() -> list[tuple[str, str]]:
    """(directory, device) of every model loaded in this process."""
    return sorted(_LOADED)


def model_fingerprint(model: str | Path) -> str:
    """12 hex digits that change whenever a model folder's files do (a hub id: the id itself).

    Small files (config, tokenizer, manifest) are hashed whole; a weights file by its size and
    sixteen 64 KiB samples spread over it, which training changes everywhere: reading a whole
    multi-gigabyte file would cost seconds on every LM built.
    """
    path = Path(model)
    if not path.is_dir():
        return hashlib.sha256(f"hub:{model}".encode()).hexdigest()[:12]
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}\0{size}\0".encode())
        with open(file, "rb") as fh:
            if size <= _WHOLE_FILE:
                digest.update(fh.read())
                continue
            for i in range(_SAMPLES):
                fh.seek((size - _SAMPLE) * i // (_SAMPLES - 1))
                digest.update(fh.read(_SAMPLE))
    return digest.hexdigest()[:12]


_WHOLE_FILE, _SAMPLES, _SAMPLE = 4 << 20, 16, 64 << 10


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
_ADAPTER_NAMES: dict[tuple[str, str], str] = {}
"""(adapter directory, device) -> the name its loaded weights carry inside the shared PEFT model."""


def adapter_name(model_dir: str, files: str) -> str:
    """The name an adapter directory's weights (`files`: their fingerprint) carry in the shared PEFT model."""
    return "a" + fingerprint([str(Path(model_dir).resolve()), files])


def _load_adapter(model_dir: str, device: str, trust_remote_code: bool, files: str) -> tuple[Any, Any, str]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_dir = adapter_base(model_dir)
    base_key = (base_dir, device)
    name = adapter_name(model_dir, files)
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
    _ADAPTER_NAMES[(str(model_dir), device)] = name
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer, kind


@contextlib.contextmanager
def adapter_selected(model_dir: str, device: str):
    """Holds the shared base's lock with this directory's adapter active (a no-op for full models)."""
    if not is_adapter(model_dir):
        yield
        return
    model, _, lock = _ADAPTER_BASES[(adapter_base(model_dir), device)]
    with lock:
        model.set_adapter(_ADAPTER_NAMES[(str(model_dir), device)])
        yield


def unload_model(model_dir: str) -> None:
    """Forgets a directory's loaded weights (every device); an LM still using them reloads on its next call."""
    with _LOAD_LOCK:
        for key in [k for k in _LOADED if k[0] == str(model_dir)]:
            del _LOADED[key]
            _LOADED_AS.pop(key, None)


class FinetunedEngine:
    """A DSPy 3.4 engine that answers with a finetuned Hugging Face model in process.

    `complete(Request) -> Response` is what `dspy.LM` calls; `answer` and `generate` are the
    same generation for servers and benchmarks that do not go through DSPy.

    Args:
        model: The model directory (an export under `models/{key}/`) or a hub id.
        key: The model key it was trained for (names the LM; informational).
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when present. A CUDA device this process lacks
            (a driver on a head without GPUs) gives the CPU (`serving.device`).
        max_tokens: New tokens per answer when a request does not say (at most the ceiling).
        max_tokens_ceiling: Most new tokens any answer may have; requests asking more are clamped.
            None: `token_ceiling` of the manifest's longest training answer (else `max_tokens`).
        batch_size: Most prompts per `generate` call.
        max_length: Prompt tokens kept (cut from the left, as in training); None reads the manifest.
        trust_remote_code: Allow the model repository's own code to run.
        source: The model's cloud URI (a run on `s3://`/`gs://` storage): where `model` is fetched
            from on a node that lacks that folder.
        fingerprint: The folder's `model_fingerprint`; None computes it (fetching from `source`
            first when the folder is missing). Saved states carry it, so a loaded program refuses
            weights that changed since it was saved.
    """

    def __init__(self, model: str, *, key: str | None = None, device: str | None = None,
                 max_tokens: int = InferenceConfig.max_tokens, batch_size: int = InferenceConfig.generate_batch_size,
                 max_length: int | None = None, trust_remote_code: bool = False,
                 source: str | None = None, fingerprint: str | None = None, max_tokens_ceiling: int | None = None):
        self.model = str(model)
        self.key = key
        self.device = device
        self.max_tokens = max_tokens
        self.max_tokens_ceiling = max_tokens_ceiling
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self.source = source
        if fingerprint is None:
            self.fetch()
            fingerprint = model_fingerprint(self.model)
        self.fingerprint = fingerprint
        manifest = self._manifest()
        self._trained_length = manifest.prompt_max_length() if manifest else None
        self.max_length = max_length if max_length is not None else self._trained_length
        self.ceiling = max_tokens_ceiling or token_ceiling(manifest and manifest.answer_tokens_max, max_tokens)
        """The most new tokens an answer may have (see `max_tokens_ceiling`)."""
        self.steps = 0
        """Decoding steps run so far (every row of a batch counts once per step)."""
        self._batcher = MicroBatcher(self._generate_batch, max_batch=batch_size)

    @property
    def model_name(self) -> str:
        """The `dspy.LM` model string: `bootfinetune/{run}/{key}@{fingerprint}` (DSPy's cache key).

        A prompt length other than the trained one changes the answers, so it is named too (`~{max_length}`).
        """
        path = Path(self.model)
        label = f"{path.parent.parent.name}/{path.name}" if path.parent.name == "models" else \
            (path.name if path.is_dir() else self.model)
        cut = f"~{self.max_length}" if self.max_length != self._trained_length else ""
        return f"bootfinetune/{label}@{self.fingerprint}{cut}"

    def fetch(self) -> None:
        """Downloads the model from `source` when this node lacks its folder (runs on cloud storage)."""
        if self.source and not (Path(self.model) / ModelManifest.FILE).exists():
            pull(self.source, Path(self.model))

    def load(self) -> tuple[Any, Any, str]:
        """(model, tokenizer, kind), loaded now if not yet: a broken folder fails here, not on a request."""
        self.fetch()
        return load_model(self.model, load_device(self.device, self.model), self.trust_remote_code, self.fingerprint)

    def set_batch_size(self, batch_size: int) -> None:
        """Changes how many prompts one `generate` call takes from now on (batches running finish as they were)."""
        self.batch_size = batch_size
        self._batcher.max_batch = batch_size

    def _count_step(self) -> None:
        self.steps += 1

    def limit(self, requested: int | None = None) -> int:
        """New tokens an answer gets: the request's number (else `max_tokens`), clamped to the ceiling."""
        return max(1, min(int(requested or self.max_tokens), self.ceiling))

    @property
    def batcher(self) -> MicroBatcher:
        """Gathers concurrent answers into batches (servers submit to it and await the futures)."""
        return self._batcher

    def _manifest(self) -> ModelManifest | None:
        manifest = Path(self.model) / ModelManifest.FILE
        return read_record(ModelManifest, manifest) if manifest.exists() else None

    # -- DSPy's engine interface --------------------------------------------------------------
    def complete(self, request: Request) -> Response:
        """One answer to a canonical request; the usage is the tokenizer's count."""
        limit = self.limit(request.config.max_tokens)
        text, prompt_tokens, new_tokens = self.answer(_request_messages(request), limit, request.config.temperature)
        return Response(id=None, model=request.model, message=Message.assistant(text),
                        finish_reason="length" if new_tokens >= limit else "stop",
                        usage=Usage(input_tokens=prompt_tokens, output_tokens=new_tokens))

    def stream(self, request: Request):
        """The whole answer as one event sequence (the model is not streamed token by token)."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Nothing to close: weights are shared per process (`unload_model` frees them)."""

    def dump_state(self) -> dict[str, Any]:
        return {"model": self.model, "key": self.key, "device": self.device, "max_tokens": self.max_tokens,
                "max_tokens_ceiling": self.max_tokens_ceiling,
                "batch_size": self.batch_size, "max_length": self.max_length,
                "trust_remote_code": self.trust_remote_code, "source": self.source, "fingerprint": self.fingerprint}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> "FinetunedEngine":
        """The engine for a saved state: one per state and process, so the LM's sync and async
        engines, and predictors restored separately, batch their calls together."""
        ident = json.dumps(state, sort_keys=True)
        with _ENGINES_LOCK:
            if ident not in _ENGINES:
                _ENGINES[ident] = cls(**state)
            return _ENGINES[ident]

    # -- batched helpers (servers, benchmarks) ----------------------------------------------------
    def answer(self, messages: list[Any], max_tokens: int | None = None,
               temperature: float | None = None) -> tuple[str, int, int]:
        """One answer: (text, prompt tokens, new tokens). Concurrent callers share batched `generate` calls."""
        return self.submit(messages, max_tokens, temperature).result()

    def submit(self, messages: list[Any], max_tokens: int | None = None, temperature: float | None = None,
               control: Control | None = None) -> Future:
        """`answer` without waiting: a future of (text, prompt tokens, new tokens). A `control` may stop it
        (deadline, client gone), and then the future raises `Cancelled` or `DeadlineExceeded`."""
        return self.submit_all(messages, max_tokens, temperature, control)[0]

    def submit_all(self, messages: list[Any], max_tokens: int | None = None, temperature: float | None = None,
                   control: Control | None = None, n: int = 1) -> list[Future]:
        """`n` answers to one prompt queued together, or none: `batching.QueueFull` when the batcher's queue is bounded
        (a server's `max_pending`) and they would pass it."""
        item = (plain_messages(messages), self.limit(max_tokens), float(temperature or 0.0))
        return self._batcher.submit_all([item] * n, control)

    def generate(self, conversations: list[list[dict]], max_tokens: int | None = None) -> list[str]:
        """Answers many conversations at once (greedy), in batches of `batch_size`."""
        limit = self.limit(max_tokens)
        out = []
        for i in range(0, len(conversations), self.batch_size):
            chunk = [(plain_messages(c), limit, 0.0) for c in conversations[i:i + self.batch_size]]
            out += [text for text, _, _ in self._generate_batch(chunk)]
        return out

    # -- generation ---------------------------------------------------------------------------
    def _generate_batch(self, requests: list[tuple[list[dict], int, float]],
                        controls: list[Control | None] | None = None) -> list[tuple[str, int, int]]:
        """Answers requests (messages, max new tokens, temperature): one `generate` per distinct temperature.

        A row whose control fires (deadline, client gone) stops generating; the caller discards its answer.
        """
        controls = controls or [None] * len(requests)
        results: list[tuple[str, int, int]] = [("", 0, 0)] * len(requests)
        by_temperature: dict[float, list[int]] = {}
        for i, request in enumerate(requests):
            by_temperature.setdefault(request[2], []).append(i)
        for temperature, rows in by_temperature.items():
            answers = self._generate_same_temperature([requests[i] for i in rows], temperature,
                                                      [controls[i] for i in rows])
            for i, answer in zip(rows, answers):
                results[i] = answer
        return results

    def _generate_same_temperature(self, requests: list[tuple[list[dict], int, float]], temperature: float,
                                   controls: list[Control | None]) -> list[tuple[str, int, int]]:
        import torch
        from transformers import StoppingCriteriaList

        device = load_device(self.device, self.model)
        model, tokenizer, kind = self.load()
        prompts = [encode_prompt(tokenizer, msgs, kind, self.max_length) for msgs, _, _ in requests]
        max_new = max(r[1] for r in requests)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        # Causal models continue the prompt, so pad on the left; encoders take right padding.
        left = kind == "causal"
        ids = [([pad] * (width - len(p)) + p) if left else (p + [pad] * (width - len(p))) for p in prompts]
        mask = [([0] * (width - len(p)) + [1] * len(p)) if left else ([1] * len(p) + [0] * (width - len(p)))
                for p in prompts]
        # Every row stops at its own limit or when its request is no longer wanted (deadline, client gone).
        stop = StopRows([r[1] for r in requests], controls, width if left else 1, self._count_step)
        gen_kwargs = dict(max_new_tokens=max_new, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                          stopping_criteria=StoppingCriteriaList([stop]))
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

    # -- pickling -------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_batcher", None)  # locks and futures stay behind; weights are reloaded lazily
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._batcher = MicroBatcher(self._generate_batch, max_batch=self.batch_size)


_ENGINES: dict[str, FinetunedEngine] = {}
"""Engines restored from saved states, by state (see `FinetunedEngine.load_state`)."""
_ENGINES_LOCK = threading.Lock()


class AsyncFinetunedEngine:
    """The async side of a `FinetunedEngine` (`program.acall`): its calls run in threads, batched with the sync ones."""

    def __init__(self, engine: FinetunedEngine):
        self.engine = engine

    async def complete(self, request: Request) -> Response:
        return await asyncio.to_thread(self.engine.complete, request)

    async def stream(self, request: Request):
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to close (see `FinetunedEngine.close`)."""

    def dump_state(self) -> dict[str, Any]:
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> "AsyncFinetunedEngine":
        return cls(FinetunedEngine.load_state(state))


def FinetunedLM(model: str, *, key: str | None = None, device: str | None = None,  # noqa: N802 (the public name)
                max_tokens: int = InferenceConfig.max_tokens, temperature: float = 0.0,
                batch_size: int = InferenceConfig.generate_batch_size, max_length: int | None = None,
                trust_remote_code: bool = False, source: str | None = None, cache: bool = False,
                callbacks: list[Any] | None = None, max_tokens_ceiling: int | None = None) -> dspy.LM:
    """A `dspy.LM` that calls a finetuned Hugging Face model in this process (see `FinetunedEngine`).

    Args:
        model, key, device, batch_size, max_length, trust_remote_code, source, max_tokens_ceiling:
            As `FinetunedEngine`.
        max_tokens: New tokens per answer (at most the ceiling).
        temperature: 0 for greedy decoding; above 0 samples.
        cache: Whether DSPy's cache answers repeated calls. Off by default (a local model is cheap
            to call and a cached sample repeats itself); safe on, since the model string names
            the weights.
        callbacks: DSPy callbacks of this LM.

    Returns:
        The LM; `finetuned_engine(lm)` gives its engine back.
    """
    engine = FinetunedEngine(model, key=key, device=device, max_tokens=max_tokens, batch_size=batch_size,
                             max_length=max_length, trust_remote_code=trust_remote_code, source=source,
                             max_tokens_ceiling=max_tokens_ceiling)
    return dspy.LM(engine.model_name, engine=engine, async_engine=AsyncFinetunedEngine(engine),
                   temperature=temperature, max_tokens=max_tokens, cache=cache, callbacks=callbacks, num_retries=0)


def finetuned_engine(lm: Any) -> FinetunedEngine | None:
    """The `FinetunedEngine` behind an LM that `FinetunedLM` built (or DSPy restored), else None."""
    engine = getattr(lm, "engine", None)
    return engine if isinstance(engine, FinetunedEngine) else None


def _request_messages(request: Request) -> list[dict[str, str]]:
    """The chat as the renderer takes it: DSPy's system prompt first, then the turns' text."""
    system = request.system
    if system is not None and not isinstance(system, str):
        system = "".join(getattr(p, "text", "") for p in system)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": m.role, "content": "".join(p.text for p in m.parts if isinstance(p, TextPart))}
                       for m in request.messages]


def _until_eos(tokens: list[int], eos: int | None, pad: int | None) -> list[int]:
    for i, t in enumerate(tokens):
        if t == eos:
            return tokens[:i]
    return [t for t in tokens if t != pad]
