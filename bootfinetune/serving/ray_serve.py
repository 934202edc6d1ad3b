"""A compiled run's models behind one OpenAI-compatible endpoint, as a Ray Serve application.

    bootfinetune serve runs/TwoStep-1a2b3c --replicas 2            # http://127.0.0.1:8000/v1

    url = serve_run("runs/TwoStep-1a2b3c")                           # the same, from Python
    program = bootfinetune.load("runs/TwoStep-1a2b3c", serve_url=url)  # predictors call it over HTTP

One deployment (`ChatDeployment`, `--replicas` copies) holds a `FinetunedEngine` per model key of
the run; the model name a request gives is the key (`GET /v1/models` lists them; with
`multitask=False` that is one per predictor, and LoRA adapters on a shared base are one name
each while the replica loads the base once). `POST /v1/chat/completions` renders prompts
exactly as training did. Requests are batched per model by the engine's batcher (as in the
in-process server): those arriving within `batch_wait_timeout_s` of each other, up to
`max_batch_size`, with answer limits in the same bucket, share one `generate`. The HTTP proxy
binds 127.0.0.1 unless `host` says otherwise. Bad requests get a 400 naming the field; an
unknown model a 404 listing the known ones.

The limits of `serving.limits` hold here too: `max_tokens` clamped to the model's ceiling,
`n` at most 8, bodies over `max_body_bytes` refused with a 413 while reading and due within
`READ_TIMEOUT_S` of the replica starting to read (Serve's proxy takes the headers), JSON nested at most
`MAX_JSON_DEPTH` deep, and a deadline per request (`request_timeout`: a 504, generation stopped; Serve's
proxy gives up a few seconds later). A client that goes away stops its generation (Serve cancels the
request). A replica takes `max_ongoing_requests` at once and Serve queues `max_queued_requests` more (then
503s); each model's batcher queues `QUEUED_BATCHES` batches' worth (then a 503 with Retry-After).

With an `api_key` (`--api-key`, or `$BOOTFINETUNE_API_KEY`) every route but `/health` answers 401 to a
request without `Authorization: Bearer <key>`; the replicas get only the key's digest (`serving.auth`). A
`host` other than loopback without a key is refused before anything starts, unless `insecure=True`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime.
import itertools
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from bootfinetune.errors import ProgramError
from bootfinetune.serving.auth import KeyCheck, check_exposure, digest, key_from, unauthorized
from bootfinetune.serving.batching import QueueFull
from bootfinetune.serving.limits import DEADLINE_S, MAX_BODY_BYTES, QUEUED_BATCHES, READ_TIMEOUT_S, Cancelled, Control
from bootfinetune.serving.lm import FinetunedEngine
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import RunDescription, warn_untrusted
from bootfinetune.serving.openai_api import (BadRequest, Completion, HTTPProblem, await_answers, check_chat_request,
                                             completion_body, error_response, pick_model, read_json, requested_tokens)
from bootfinetune.runtime.ray_env import ensure_ray

log = logging.getLogger(__name__)

APP_NAME = "bootfinetune"

api = FastAPI(title="bootfinetune")


@serve.deployment(name="ChatDeployment")
@serve.ingress(api)
class ChatDeployment:
    """A replica: the run's finetuned LMs, each batching the requests it is sent."""

    def __init__(self, models: dict[str, dict[str, Any]], max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, request_timeout: float = DEADLINE_S,
                 max_body_bytes: int = MAX_BODY_BYTES, key_digest: str | None = None):
        self.lms = {name: FinetunedEngine(**{**spec, "batch_size": max_batch_size}) for name, spec in models.items()}
        for engine in self.lms.values():  # load now: a broken model fails the deployment, not a request
            engine.load()
            engine.batcher.wait_s = batch_wait_timeout_s
            engine.batcher.max_pending = QUEUED_BATCHES * max_batch_size
        self.request_timeout, self.max_body_bytes = request_timeout, max_body_bytes
        self.key_check = KeyCheck(key_digest) if key_digest else None
        self.ids = itertools.count(1)

    def _refused(self, http: Request) -> bool:
        return self.key_check is not None and not self.key_check.allows(http.headers.get("authorization"))

    @api.get("/v1/models")
    def models(self, http: Request):
        if self._refused(http):
            return unauthorized()
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "bootfinetune"}
                                           for name in self.lms]}

    @api.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/stats")
    def stats(self, http: Request):
        if self._refused(http):
            return unauthorized()
        sizes = [n for engine in self.lms.values() for n in engine.batcher.batch_sizes]
        return {"batches": len(sizes), "requests": sum(sizes), "largest_batch": max(sizes, default=0),
                "max_tokens_ceiling": {name: engine.ceiling for name, engine in self.lms.items()}}

    @api.post("/v1/chat/completions")
    async def chat(self, http: Request):
        if self._refused(http):
            return unauthorized()
        control = Control.within(self.request_timeout)
        try:
            request = check_chat_request(await read_json(http, self.max_body_bytes, READ_TIMEOUT_S))
            name = pick_model(request.get("model"), {name: name for name in self.lms})
            engine = self.lms[name]
            limit = engine.limit(requested_tokens(request))
            temperature = float(request.get("temperature") or 0.0)
            futures = engine.submit_all(request["messages"], limit, temperature, control, n=request["n"])
            answers = await await_answers(futures, control)
        except QueueFull as full:
            return HTTPProblem(503, "the server is busy: its queue is full; retry after the seconds Retry-After says.",
                               "overloaded", retry_after=full.retry_after).response()
        except HTTPProblem as problem:
            log.info("chat request: %d %s", problem.status, problem.message[:200])
            return problem.response()
        except BadRequest as exc:
            log.info("chat request: 400 %s", str(exc)[:200])
            return error_response(400, str(exc), "invalid_request_error")
        except Cancelled:
            return error_response(499, "the client went away.", "cancelled")
        except Exception:  # answering failed: a 500 naming no internals (the error goes to the replica's log)
            log.exception("generation failed")
            return error_response(500, "the server failed to answer this request; see the replica's log.",
                                  "server_error")
        choices = [Completion(text, p, c, "length" if c >= limit else "stop") for text, p, c in answers]
        return completion_body(name, choices, f"chatcmpl-{next(self.ids)}")


def model_specs(run: RunDir, *, device: str | None = None, max_tokens: int | None = None,
                max_tokens_ceiling: int | None = None, trust_remote_code: bool | None = None) -> dict[str, dict]:
    """Model name (the key) -> `FinetunedEngine` arguments, for every finished model of a run.

    The models run their own code only with `trust_remote_code=True`, whatever config.json says; its inference
    options are checked as strictly as given ones (`RunDescription.inference_config`).
    """
    description = run.read_description() if run.config_json.exists() else RunDescription()
    inference = description.inference_config(run.config_json, max_tokens=max_tokens, max_tokens_ceiling=max_tokens_ceiling)
    trust = description.trusts_remote_code(trust_remote_code)
    warn_untrusted(description, trust, run.config_json)
    specs = {}
    for key in run.finished_models():
        specs[key] = {"model": str(run.model_dir(key)), "key": key, "device": device, "trust_remote_code": trust,
                      "max_tokens": inference.max_tokens, "max_tokens_ceiling": inference.max_tokens_ceiling,
                      "batch_size": inference.generate_batch_size, "source": run.model_uri(key)}
    return specs


def serve_run(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
              max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, device: str | None = None,
              max_tokens: int | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
              ray_address: str | None = None, max_tokens_ceiling: int | None = None,
              request_timeout: float = DEADLINE_S, max_body_bytes: int = MAX_BODY_BYTES,
              max_ongoing_requests: int = 64, max_queued_requests: int = 256,
              trust_remote_code: bool | None = None, api_key: str | None = None, insecure: bool = False) -> str:
    """Deploys a run's models on Ray Serve and returns the OpenAI base URL (`http://host:port/v1`).

    Args:
        run_dir: A finished compile's run directory (folder or cloud URI).
        host, port: Where Serve's HTTP proxy listens (127.0.0.1: this machine only).
        replicas: Copies of the deployment (each loads the models once).
        max_batch_size, batch_wait_timeout_s: Serve's request batching.
        device: Where replicas run the models; None picks CUDA when the replica has a GPU.
        max_tokens: Default answer length when a request gives none (default: the run's).
        max_tokens_ceiling: Most new tokens an answer may have (default: the run's option, else
            derived from each model's longest training answer; see `limits.token_ceiling`).
        request_timeout: Seconds a request may take, queueing included, before its 504.
        max_body_bytes: Largest request body read; a larger one gets a 413.
        max_ongoing_requests, max_queued_requests: Requests a replica takes at once, and how many
            Serve queues beyond that before answering 503.
        num_cpus, num_gpus: Resources each replica reserves.
        ray_address: The Ray cluster to serve on (default: `$RAY_ADDRESS`, a running local cluster, else a new one).
        api_key: The key requests must send (`Authorization: Bearer <key>`); None: `$BOOTFINETUNE_API_KEY`, else none.
        insecure: Serve on a host other than loopback without a key (refused otherwise, before anything starts).
        trust_remote_code: Let the models' own code run when they load (True only: never taken from the run).
    """
    key = key_from(api_key)
    check_exposure(host, key, insecure)  # before the run, the models or Ray
    run = RunDir.from_location(run_dir)
    run.pull()
    specs = model_specs(run, device=device, max_tokens=max_tokens, max_tokens_ceiling=max_tokens_ceiling,
                        trust_remote_code=trust_remote_code)
    if not specs:
        raise ProgramError(f"run_dir: {run.location} has no finished model (models/*/manifest.json); "
                           "serve the run directory of a finished compile.")
    ensure_ray(ray_address)
    # The proxy's own timeout is a backstop a little past the replica's deadline (which answers the 504).
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout + 5})
    app = ChatDeployment.options(num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
                                 max_queued_requests=max_queued_requests,
                                 ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}) \
        .bind(specs, max_batch_size, batch_wait_timeout_s, request_timeout, max_body_bytes, key and digest(key))
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}/v1"
    log.info("serving %s at %s: models %s", run.location, url, sorted(specs))
    return url


def stop_serving() -> None:
    """Removes the application (the Serve instance keeps running for others)."""
    serve.delete(APP_NAME)
