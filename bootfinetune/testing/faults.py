"""Test and benchmark scaffolding: fault injection and probes, kept out of the product's code paths.

Nothing here runs unless a test or a benchmark asks for it. It plugs into the product through
its documented seams only:

- `FaultyTeacherServer`: a `TeacherServer` that plays a flaky hosted model (429, 500, 503,
  timeouts, garbage, dropped connections), through `ChatServer.failure_response` and `TeacherServer.answer`;
- `RateLimitedTeacherServer`: one that enforces a provider's rate limit (a token bucket; 429 with Retry-After);
- `FailOnce`: a `LoopConfig.on_step` hook that SIGKILLs one training worker once, mid epoch
  (`finetune_models(..., hooks={"all": {"on_step": FailOnce(marker)}})`);
- `resident_kib`: the resident memory that loading model directories adds (the LoRA test, `bench/lora_memory.py`).

It lives in the package, not under tests/, because Ray workers unpickle `FailOnce` and the
benchmarks import `resident_kib`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bootfinetune.testing.teacher_server import Script, TeacherServer, parse_chat_request
from bootfinetune.training.train_loop import StepInfo

Faults = Callable[[dict[str, str], int], "str | None"]
"""(input field values, attempt number of this very prompt, from 1) -> a fault to inject, or None.

Faults: "429" (rate limited, with Retry-After), "500", "503", "timeout" (answers after
`slow_seconds`, past a client's timeout), "garbage" (200 with text no adapter parses),
"drop" (the connection closes with no answer)."""
FAULT_KINDS = ("429", "500", "503", "timeout", "garbage", "drop")
GARBAGE = "I am not sure what you mean. Could you rephrase the question?"
"""What a "garbage" fault answers: text no DSPy adapter parses."""


class HTTPFault(Exception):
    """Raised while answering to answer with an HTTP error instead (429, 500, 503...)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class DropConnection(Exception):
    """Raised while answering to close the connection without any answer."""


class FaultyTeacherServer(TeacherServer):
    """A `TeacherServer` that injects the faults `faults` decides instead of some answers.

    Args:
        script: Computes the output fields from the input fields.
        faults: Decides, per request, a fault to inject instead of the answer (see `Faults`).
        slow_seconds: How long a "timeout" fault waits before it answers.
        **options: `TeacherServer` options (host, port, latency, model_name).
    """

    def __init__(self, script: Script, faults: Faults, slow_seconds: float = 5.0, **options):
        super().__init__(script, **options)
        self.faults = faults
        self.slow_seconds = slow_seconds
        self.attempts: dict[str, int] = {}
        """Requests seen per prompt (hash of the messages)."""
        self.injected: dict[str, int] = {}
        """Faults injected, per kind."""

    async def failure_response(self, exc: Exception, http: Request) -> Response:
        """`HTTPFault` -> its status (and Retry-After); `DropConnection` -> the connection closed, no answer."""
        if isinstance(exc, HTTPFault):
            headers = {"Retry-After": f"{exc.retry_after:g}"} if exc.retry_after is not None else None
            return JSONResponse({"error": {"message": str(exc), "type": "injected_fault"}}, status_code=exc.status,
                                headers=headers)
        if isinstance(exc, DropConnection):
            await self.drop_connection(http)
            return Response(status_code=500)  # never sent: the connection is gone
        return await super().failure_response(exc, http)

    def answer(self, messages: list[dict]) -> str:
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        with self._lock:
            attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        inputs, _ = parse_chat_request(messages)
        kind = self.faults(inputs, attempt)
        if kind is None:
            return super().answer(messages)
        if kind not in FAULT_KINDS:
            raise ValueError(f"faults returned {kind!r}; use one of {FAULT_KINDS} or None")
        with self._lock:
            self.injected[kind] = self.injected.get(kind, 0) + 1
        if kind == "429":
            raise HTTPFault(429, "rate limit reached (injected)", retry_after=0.1)
        if kind in ("500", "503"):
            raise HTTPFault(int(kind), f"upstream error {kind} (injected)")
        if kind == "drop":
            raise DropConnection()
        if kind == "timeout":
            time.sleep(self.slow_seconds)
            return super().answer(messages)
        return GARBAGE


class RateLimitedTeacherServer(FaultyTeacherServer):
    """A teacher that keeps to `calls_per_second` as a provider does: a token bucket holding `burst` calls,
    refilled at the rate; a request finding it empty gets a 429 at once, with the seconds until the next
    token as Retry-After. `accepted` and `limited` keep each request's time (`time.monotonic()`).
    """

    def __init__(self, script: Script, calls_per_second: float, burst: float | None = None, **options):
        super().__init__(script, faults=lambda inputs, attempt: None, **options)
        self.rate = calls_per_second
        self.burst = burst if burst is not None else max(1.0, calls_per_second / 10)
        self._tokens, self._refilled = self.burst, time.monotonic()
        self.accepted: list[float] = []
        self.limited: list[float] = []

    def complete(self, request: dict):
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens < 1:
                self.limited.append(now)
                raise HTTPFault(429, "rate limit reached", retry_after=round((1 - self._tokens) / self.rate, 3))
            self._tokens -= 1
            self.accepted.append(now)
        return super().complete(request)

    def stats(self) -> dict:
        """`calls` and each accepted and rate-limited request's `time.monotonic()` (one clock for every
        process of the machine, so a benchmark can cut them by its own times)."""
        with self._lock:
            return {**super().stats(), "accepted": list(self.accepted), "limited": list(self.limited)}


@dataclass(frozen=True)
class FailOnce:
    """A `LoopConfig.on_step` hook: the last rank's worker process dies once, mid epoch, after a checkpoint.

    At the middle micro batch of an epoch after the one this start of the loop began at, the last
    rank creates `marker` and SIGKILLs its own process, unless `marker` already exists (so it
    fails once across restarts).
    """

    marker: str

    def __call__(self, step: StepInfo) -> None:
        if step.step != step.micro_batches // 2 or step.epoch <= step.start_epoch or step.rank != step.world - 1:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        # The worker process dies as under an OOM kill or a lost node: no exception, no cleanup. It waits a
        # few seconds first: Ray Train registers a checkpoint once its controller has polled every rank's
        # report, and a rank killed within that poll interval takes the last report with it (the run then
        # restarts from the checkpoint before).
        time.sleep(3)
        os.kill(os.getpid(), signal.SIGKILL)


_RESIDENT_SCRIPT = r"""
import gc, json, sys
from bootfinetune.serving.lm import FinetunedEngine
import bootfinetune.serving.lm as lm_module

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

lms = [FinetunedEngine(d, max_tokens=4, device="cpu") for d in sys.argv[1:]]
lms[0].generate([[{"role": "user", "content": "warm up"}]])  # torch's own first-use allocations
lm_module._LOADED.clear(); lm_module._ADAPTER_BASES.clear(); gc.collect()
before = rss_kib()
for lm in lms:
    lm.generate([[{"role": "user", "content": "hello"}]])
print("RSS_KIB=" + json.dumps(rss_kib() - before))
"""


def resident_kib(model_dirs: list[str | Path]) -> int:
    """Resident memory (KiB) that loading these model directories adds, as a compiled program loads them.

    A fresh Python process builds a `FinetunedEngine` per directory on CPU (adapters on one base share
    it), answers one prompt with each, and reports VmRSS after minus before (Linux). For comparing
    adapters on a shared base with full models, as the LoRA test and `bench/lora_memory.py` do.
    """
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]  # the folder holding this package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _RESIDENT_SCRIPT, *map(str, model_dirs)], capture_output=True,
                         text=True, env=env, timeout=600)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RSS_KIB=")), None)
    if line is None:
        raise RuntimeError("measuring resident memory failed:\n" + out.stdout[-2000:] + out.stderr[-2000:])
    return json.loads(line.split("=", 1)[1])
