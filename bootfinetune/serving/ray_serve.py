"""A compiled run's models behind one OpenAI-compatible endpoint, as a Ray Serve application.

    bootfinetune serve runs/TwoStep-1a2b3c --replicas 2            # http://127.0.0.1:8000/v1

    url = serve_run("runs/TwoStep-1a2b3c")                           # the same, from Python
    program = bootfinetune.load("runs/TwoStep-1a2b3c", serve_url=url)  # predictors call it over HTTP

One deployment (`ChatDeployment`, `--replicas` copies) holds a `FinetunedEngine` per model key of
the run; the model name a request gives is the key (`GET /v1/models` lists them; with
`multitask=False` that is one per predictor, and LoRA adapters on a shared base are one name
each while the replica loads the base once). `POST /v1/chat/completions` renders prompts
exactly as training did. Requests are batched by Ray Serve (`@serve.batch`): those arriving
within `batch_wait_timeout_s` of each other, up to `max_batch_size`, are answered by one
`generate` per model. The HTTP proxy binds 127.0.0.1 unless `host` says otherwise. Bad
requests get a 400 naming the field; an unknown model a 404 listing the known ones.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime.
import asyncio
import itertools
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from bootfinetune.config import InferenceConfig
from bootfinetune.common.chat import plain_messages
from bootfinetune.errors import ProgramError
from bootfinetune.serving.lm import FinetunedEngine
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import RunDescription
from bootfinetune.serving.serve import BadRequest, Completion, check_chat_request, completion_body

log = logging.getLogger(__name__)

APP_NAME = "bootfinetune"

api = FastAPI(title="bootfinetune")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


@serve.deployment(name="ChatDeployment")
@serve.ingress(api)
class ChatDeployment:
    """A replica: the run's finetuned LMs, and Serve's request batching in front of them."""

    def __init__(self, models: dict[str, dict[str, Any]], max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01):
        self.lms = {name: FinetunedEngine(**spec) for name, spec in models.items()}
        for engine in self.lms.values():  # load now: a broken model fails the deployment, not a request
            engine.load()
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.ids = itertools.count(1)
        self.batches: list[int] = []
        """Sizes of the batches answered (for /v1/stats)."""

    @api.get("/v1/models")
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "bootfinetune"}
                                           for name in self.lms]}

    @api.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/stats")
    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.batches), "requests": sum(self.batches),
                "largest_batch": max(self.batches, default=0)}

    @api.post("/v1/chat/completions")
    async def chat(self, http: Request):
        try:
            body = await http.json()
        except ValueError as exc:
            return _error(400, f"the body is not valid JSON ({exc}); send a chat.completions request.",
                          "invalid_request_error")
        try:
            request = check_chat_request(body)
        except BadRequest as exc:
            return _error(400, str(exc), "invalid_request_error")
        name = request.get("model") or (next(iter(self.lms)) if len(self.lms) == 1 else None)
        if name not in self.lms:
            return _error(404, f"model={request.get('model')!r}: this server has {sorted(self.lms)}; "
                          "set model to one of them.", "model_not_found")
        limit = int(request.get("max_tokens") or request.get("max_completion_tokens") or self.lms[name].max_tokens)
        temperature = float(request.get("temperature") or 0.0)
        item = (name, request["messages"], limit, temperature)
        try:
            answers = await asyncio.gather(*[self.generate(item) for _ in range(request["n"])])
        except Exception as exc:  # answering failed: a 500 naming the error
            log.exception("generation failed")
            return _error(500, f"{type(exc).__name__}: {exc}", "server_error")
        choices = [Completion(text, p, c, "length" if c >= limit else "stop") for text, p, c in answers]
        return completion_body(name, choices, f"chatcmpl-{next(self.ids)}")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, items: list[tuple[str, list, int, float]]) -> list[tuple[str, int, int]]:
        """One `generate` per model (and temperature) for the requests Serve gathered."""
        self.batches.append(len(items))
        results: list[Any] = [None] * len(items)
        by_model: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_model.setdefault(item[0], []).append(i)
        for name, rows in by_model.items():
            requests = [(plain_messages(items[i][1]), items[i][2], items[i][3]) for i in rows]
            answers = await asyncio.to_thread(self.lms[name]._generate_batch, requests)
            for i, answer in zip(rows, answers):
                results[i] = answer
        return results


def model_specs(run: RunDir, *, device: str | None = None, max_tokens: int | None = None,
                trust_remote_code: bool | None = None) -> dict[str, dict]:
    """Model name (the key) -> `FinetunedEngine` arguments, for every finished model of a run.

    `trust_remote_code` None: what the run was trained with (config.json).
    """
    described = run.read_description() if run.config_json.exists() else RunDescription()
    inference = described.options.get("inference", {})
    trust = described.trusts_remote_code(trust_remote_code)
    specs = {}
    for key in run.finished_models():
        specs[key] = {"model": str(run.model_dir(key)), "key": key, "device": device, "trust_remote_code": trust,
                      "max_tokens": max_tokens or inference.get("max_tokens") or InferenceConfig.max_tokens,
                      "batch_size": inference.get("generate_batch_size") or InferenceConfig.generate_batch_size, "source": run.model_uri(key)}
    return specs


def serve_run(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
              max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, device: str | None = None,
              max_tokens: int | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
              ray_address: str | None = None, trust_remote_code: bool | None = None) -> str:
    """Deploys a run's models on Ray Serve and returns the OpenAI base URL (`http://host:port/v1`).

    Args:
        run_dir: A finished compile's run directory (folder or cloud URI).
        host, port: Where Serve's HTTP proxy listens (127.0.0.1: this machine only).
        replicas: Copies of the deployment (each loads the models once).
        max_batch_size, batch_wait_timeout_s: Serve's request batching.
        device: Where replicas run the models; None picks CUDA when the replica has a GPU.
        max_tokens: Default answer length when a request gives none (default: the run's).
        num_cpus, num_gpus: Resources each replica reserves.
        ray_address: The Ray cluster to serve on (default: `$RAY_ADDRESS`, a running local cluster, else a new one).
        trust_remote_code: Let the models' own code run when they load; None: what the run was trained with.
    """
    from bootfinetune.runtime.ray_env import ensure_ray

    run = RunDir.from_location(run_dir)
    run.pull()
    specs = model_specs(run, device=device, max_tokens=max_tokens, trust_remote_code=trust_remote_code)
    if not specs:
        raise ProgramError(f"run_dir: {run.location} has no finished model (models/*/manifest.json); "
                           "serve the run directory of a finished compile.")
    ensure_ray(ray_address)
    serve.start(http_options={"host": host, "port": port})
    app = ChatDeployment.options(num_replicas=replicas,
                                 ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}) \
        .bind(specs, max_batch_size, batch_wait_timeout_s)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}/v1"
    log.info("serving %s at %s: models %s", run.location, url, sorted(specs))
    return url


def stop_serving() -> None:
    """Removes the application (the Serve instance keeps running for others)."""
    serve.delete(APP_NAME)
