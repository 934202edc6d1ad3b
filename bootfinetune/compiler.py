"""`BootstrapFinetune`: the documented DSPy optimizer, and the one place that knows the stage order.

    checks -> bootstrap (Ray Data) -> data -> finetune (Ray Train) -> rebind -> evaluate

Each stage reads and writes the run directory, so running the same compile again
resumes: finished stages are read back, not redone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from bootfinetune.bootstrap import BootstrapResult, driver_settings, run_bootstrap
from bootfinetune.checks import (ProgramPlan, callable_identity, check_examples, check_picklable, check_program,
                                 lm_identity, program_identity, valset_overlap)
from bootfinetune.config import Config
from bootfinetune.datasets import DataSummary, build_datasets
from bootfinetune.errors import ConfigError, ProgramError
from bootfinetune.records import collect_secrets, example_to_json
from bootfinetune.rundir import RunDir, fingerprint, run_name_for, write_json

logger = logging.getLogger(__name__)

# Options that change how fast or where a run goes, not what it produces: left out of the run name,
# so a rerun with more actors or workers resumes the same run.
_RESOURCE_OPTIONS = {"num_actors", "num_threads", "actor_cpus", "batch_size", "max_errors", "cpus_per_worker",
                     "gpus_per_worker", "max_failures", "storage_path", "run_name", "ray_address"}


@dataclass
class Prepared:
    """Stages 1-3 done: the plan, the bootstrap results and the finetuning files."""

    run: RunDir
    """The run directory."""
    config: Config
    """The resolved configuration."""
    plan: ProgramPlan
    """Which predictor is served by which model key and target."""
    bootstrap: BootstrapResult
    """The teacher's traces and failures on the trainset."""
    data: dict[str, DataSummary]
    """Finetuning files per model key."""
    val_bootstrap: BootstrapResult | None = None
    """The teacher's traces on the valset, when one was given."""
    val_data: dict[str, DataSummary] = field(default_factory=dict)
    """Eval files per model key built from the valset."""


class BootstrapFinetune(Teleprompter):
    """Compiles a DSPy program into one backed by finetuned models, on Ray.

    Args:
        metric: `metric(example, prediction, trace)` deciding which teacher traces to keep
            (bool, or float with the `metric_threshold` option); None keeps every trace.
        teacher_settings: Applied with `dspy.context(**teacher_settings)` while the teacher
            runs, e.g. `{"lm": big_lm}`.
        multitask: One shared model for all predictors, else one per predictor.
        adapter: Formats training prompts (and inference); ChatAdapter by default.
        **options: Any field of `Config` (e.g. `num_actors`, `zero_stage`, `storage_path`).
    """

    def __init__(self, metric: Callable | None = None, teacher_settings: dict | None = None, multitask: bool = True,
                 *, adapter: Any = None, **options: Any):
        super().__init__()
        self.metric = metric
        self.teacher_settings = dict(teacher_settings or {})
        self.adapter = adapter
        self.options = {"multitask": multitask, **options}
        Config.from_options(**self.options)  # unknown or bad options fail here, before any compile
        self.run_dir: RunDir | None = None

    def prepare(self, student: dspy.Module, *, trainset: list, teacher: Any = None, valset: list | None = None,
                **options: Any) -> Prepared:
        """Runs checks, bootstrapping and the data stage; returns what finetuning needs."""
        config = Config.from_options(**{**self.options, **options})
        teachers = teacher if isinstance(teacher, (list, tuple)) else [teacher if teacher is not None else student]
        if not teachers:
            raise ProgramError("teacher: an empty list; pass a program, a list of programs, or None for the student.")
        plan = check_program(student, list(teachers), target=config.train.target,
                             multitask=config.bootstrap.multitask, teacher_settings=self.teacher_settings)
        problems = check_examples(trainset, student, "trainset")
        if valset is not None:
            problems += check_examples(valset, student, "valset")
        for i, t in enumerate(teachers):
            problems += check_picklable(t, "teacher" if len(teachers) == 1 else f"teacher[{i}]")
        if self.metric is not None:
            problems += check_picklable(self.metric, "metric")
        problems += check_picklable(driver_settings(), "dspy.configure settings")
        if problems:
            raise ProgramError(problems)
        if valset and (overlap := valset_overlap(trainset, valset)):
            logger.warning("valset: %d example(s) have the same inputs as trainset examples; the after-metric "
                           "will overstate generalisation. Hold them out of one set.", overlap)

        run = self._run_dir(config, plan, student, teachers, trainset, valset)
        self.run_dir = run
        secrets = collect_secrets(*(p.lm for t in teachers for p in t.predictors()),
                                  self.teacher_settings.get("lm"), dspy.settings.lm)
        write_json(run.config_json, self._describe(config, plan, teachers))
        from bootfinetune.ray_env import ensure_ray

        ensure_ray(config.run.ray_address)
        stage = dict(teachers=list(teachers), metric=self.metric, config=config.bootstrap,
                     teacher_settings=self.teacher_settings, secrets=secrets)
        boot = run_bootstrap(run, examples=list(trainset), split="train", **stage)
        val_boot = run_bootstrap(run, examples=list(valset), split="val", **stage) if valset else None
        started = time.time()
        data = build_datasets(run, boot.calls, plan, student, adapter=self.adapter,
                              exclude_demos=config.bootstrap.exclude_demos)
        val_data = build_datasets(run, val_boot.calls, plan, student, adapter=self.adapter,
                                  exclude_demos=config.bootstrap.exclude_demos, split="val") if val_boot else {}
        run.update_report(stages={
            "bootstrap": {**asdict(boot.summary), "resumed": boot.resumed,
                          "val": asdict(val_boot.summary) if val_boot else None},
            "data": {"seconds": round(time.time() - started, 3),
                     "keys": {k: asdict(v) for k, v in data.items()},
                     "val_keys": {k: asdict(v) for k, v in val_data.items()}},
        })
        return Prepared(run, config, plan, boot, data, val_boot, val_data)

    def _run_dir(self, config: Config, plan: ProgramPlan, student, teachers, trainset, valset) -> RunDir:
        if config.run.run_name:
            return RunDir.at(config.run.storage_path, config.run.run_name)
        options = {k: v for k, v in config.to_flat().items() if k not in _RESOURCE_OPTIONS}
        settings = driver_settings()
        inputs = {
            "student": program_identity(student),
            "teachers": [program_identity(t) for t in teachers],
            "teacher_settings": {k: lm_identity(v) if k == "lm" else repr(v) for k, v in self.teacher_settings.items()},
            "settings": {"lm": lm_identity(settings.get("lm")), "rm": callable_identity(settings.get("rm")),
                         "adapter": type(settings.get("adapter")).__name__ if settings.get("adapter") else None},
            "adapter": type(self.adapter).__name__ if self.adapter else None,
            "metric": callable_identity(self.metric),
            "trainset": fingerprint([example_to_json(ex) for ex in trainset]),
            "valset": fingerprint([example_to_json(ex) for ex in valset]) if valset else None,
            "options": options,
        }
        return RunDir.at(config.run.storage_path, run_name_for(plan.program_name, inputs))

    def _describe(self, config: Config, plan: ProgramPlan, teachers) -> dict[str, Any]:
        """config.json: the resolved options and what the plan decided; never an API key."""
        return {
            "options": config.to_dict(),
            "predictors": plan.predictors,
            "model_keys": {key: {"target": plan.target_of[key], "predictors": plan.predictors_of(key)}
                           for key in plan.keys()},
            "teachers": [{p: lm_identity(pred.lm) for p, pred in t.named_predictors()} for t in teachers],
            "teacher_settings_lm": lm_identity(self.teacher_settings.get("lm")),
            "driver_lm": lm_identity(dspy.settings.lm),
            "metric": callable_identity(self.metric),
        }


__all__ = ["BootstrapFinetune", "Prepared", "ConfigError", "ProgramError"]
