"""What a finished model or a key's checkpoints were trained on: the job's fingerprint, compared on a rerun
so that a finished model is kept, and checkpoints of other data or options are not resumed."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from bootfinetune.config import RESOURCE_OPTIONS, TrainConfig
from bootfinetune.run.jsonio import fingerprint
from bootfinetune.run.rundir import RunDir
from bootfinetune.run.runfiles import ModelManifest
from bootfinetune.stages.finetune_job import FinetuneJob

log = logging.getLogger(__name__)

# Resource options change where or how safely a job runs, not what it trains: a rerun that changes
# them keeps the finished model and the checkpoints. The config's target is left out too: the job's
# own target (one model key's) counts instead.
_RESOURCE_ONLY = RESOURCE_OPTIONS | {"target"}


def data_hash(path: Path) -> str:
    """sha256 of a data file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def job_fingerprint(job: FinetuneJob, config: TrainConfig) -> str:
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESOURCE_ONLY}
    eval_hash = data_hash(job.eval_file) if job.eval_file else None
    identity = {"target": job.target, "data": data_hash(job.train_file), "eval": eval_hash, "options": options}
    if job.added_tokens:  # only when there are some, so runs without keep their fingerprint
        identity["added_tokens"] = list(job.added_tokens)
    return fingerprint(identity)


def finished_manifest(run: RunDir, job: FinetuneJob, config: TrainConfig) -> ModelManifest | None:
    """The key's manifest if it was finished on the same data, target and options, else None."""
    manifest = run.read_manifest(job.key)
    if manifest is None:
        return None
    if manifest.job_fingerprint == job_fingerprint(job, config):
        return manifest
    log.warning("models/%s retrained: %s", run.folder(job.key), "; ".join(retrain_reasons(manifest, job, config)))
    return None


def retrain_reasons(manifest: ModelManifest, job: FinetuneJob, config: TrainConfig) -> list[str]:
    """What differs between a finished model's manifest and the job now asked for, in words.

    Example: `["all.jsonl changed (now 44 records)", "lr 5e-05 -> 0.0001"]`.
    """
    reasons = []
    if manifest.target != job.target:
        reasons.append(f"target {manifest.target} -> {job.target}")
    if manifest.data_hash != data_hash(job.train_file):
        now = sum(1 for line in Path(job.train_file).read_text(encoding="utf-8").splitlines() if line.strip())
        reasons.append(f"{Path(job.train_file).name} changed (now {now} records)")
    if manifest.eval_hash != (data_hash(job.eval_file) if job.eval_file else None):
        reasons.append("eval data changed")
    old = manifest.train_config
    reasons += [f"{k} {old.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(config).items()
                if k not in _RESOURCE_ONLY and k in old and old[k] != v]
    return reasons or ["trained on other data or options"]
