"""`BootstrapFinetune`: the documented DSPy optimizer, running the stages in their order (`pipeline.STAGES`).

    checks -> bootstrap (Ray Data) -> data -> finetune (Ray Train) -> rebind -> evaluate

Each stage reads and writes the run directory (its files are the records of
`bootfinetune.run.runfiles`), so running the same compile again resumes: finished stages are
read back, not redone. `BootstrapFinetune.prepare` runs stages 1-3 and `compile` all six, stages 4-5
through `pipeline.finetune_and_rebind`, as the entries that start from a run directory do (the
finetune-only job, `retrain`, the DSPy provider).
"""

from __future__ import annotations

import inspect
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from bootfinetune.stages.adapters import adapter_option, adapter_spec, resolve_adapter
from bootfinetune.stages.bootstrap import BootstrapResult, driver_settings, invalidate_changed, run_bootstrap_splits
from bootfinetune.stages.checks import (ProgramPlan, callable_identity, check_examples, check_picklable, check_program,
                                 check_user_code, lm_identity, valset_overlap)
from bootfinetune.config import FIELDS, Config, TrainConfig, identity_options
from bootfinetune.stages.datasets import build_datasets
from bootfinetune.dspy_api import (check_compile_arguments, check_positional, documented_options, peft_alias,
                                   tracks_given_arguments, train_kwargs_options)
from bootfinetune.errors import ConfigError, FinetuneError, ProgramError
from bootfinetune.stages.evaluate import evaluate_program, teacher_score
from bootfinetune.stages.finetune_job import FinetuneJob
from bootfinetune.common.importpath import class_path
from bootfinetune.run.jsonio import fingerprint
from bootfinetune.stages.token_plan import (TokenPlan, adapter_parse, check_lora, plan_for_files,
                                         raise_if_unfixable)
from bootfinetune.stages.rebind import base_limits, base_program
from bootfinetune.common.redaction import collect_secrets
from bootfinetune.common.names import folder_names
from bootfinetune.run.report_html import student_usage, teacher_usage, write_report_html
from bootfinetune.run.rundir import RunDir, run_name_of
from bootfinetune.run.runfiles import DataSummary, RunDescription
from bootfinetune.pipeline import finetune_and_rebind, stage_label
from bootfinetune.run.writer import RunWriter, writer_for
from bootfinetune.runtime.console import report_held, set_console_output
from bootfinetune.common.targets import check_target
from bootfinetune.training import tracking
from bootfinetune.run.trace_store import TraceStore, trace_id
from bootfinetune.stages.traces import example_key, trace_identity
from bootfinetune.run.storage import check_writable
from bootfinetune.runtime.ray_env import ensure_ray

logger = logging.getLogger(__name__)

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
    valset: list | None = None
    """The valset, when one was given."""
    tokens: dict[str, TokenPlan] = field(default_factory=dict)
    """Per model key: the tokens its target's tokenizer needs so that every answer survives it."""
    described: RunDescription = field(default_factory=RunDescription)
    """config.json: the options and the model keys the later stages read."""
    writer: RunWriter | None = None
    """The run's writer lock, held until the compile (or `prepare`) that made this returns or raises."""

    def finetune_jobs(self) -> list[FinetuneJob]:
        """Stage 4's input: one job per model key, its data files and the tokens its tokenizer needs."""
        run, plan = self.run, self.plan
        return [FinetuneJob(key=key, target=plan.target_of[key], predictors=tuple(plan.predictors_of(key)),
                            train_file=run.data_file(key),
                            eval_file=Path(self.val_data[key].path)
                            if key in self.val_data and self.val_data[key].records else None,
                            added_tokens=tuple(self.tokens[key].added_tokens) if key in self.tokens else None)
                for key in plan.keys()]


class BootstrapFinetune(Teleprompter):
    """Compiles a DSPy program into one backed by finetuned models, on Ray.

    The positional order is DSPy 2.4's (metric, teacher_settings, multitask); DSPy 3.x's second
    positional argument, `multitask`, must be given by keyword here, and a non-dict
    `teacher_settings` raises rather than being misread.

    Args:
        metric: `metric(example, prediction, trace)` deciding which teacher traces to keep
            (bool, or float with the `metric_threshold` option); None keeps every trace.
        teacher_settings: Applied with `dspy.context(**teacher_settings)` while the teacher
            runs, e.g. `{"lm": big_lm}`.
        multitask: One shared model for all predictors, else one per predictor.
        train_kwargs: DSPy 3.x training options, 2.4/3.x/TRL/local-provider names (see
            `dspy_api.translate_train_kwargs`); also keyed by LM, `{student_lm: {...}}`.
        adapter: The DSPy adapter (ChatAdapter, JSONAdapter, XMLAdapter...) that formats the
            teacher's prompts, the training records and the compiled program's prompts; default:
            `dspy.settings.adapter`, else ChatAdapter. DSPy 3.x's `{lm: adapter}` is accepted for one adapter.
        **options: Any field of `Config` (e.g. `num_actors`, `zero_stage`, `storage_path`).
    """

    def __init__(self, metric: Callable | None = None, teacher_settings: dict | None = None, multitask: bool = True,
                 *, train_kwargs: dict[str, Any] | None = None, adapter: Any = None,
                 exclude_demos: bool | None = None, num_threads: int | None = None, **options: Any):
        super().__init__()
        check_positional(metric, teacher_settings, multitask)
        self.metric = metric
        self.teacher_settings = dict(teacher_settings or {})
        self.adapter = adapter_option(adapter)
        train_options, self.train_kwargs_lms = train_kwargs_options(train_kwargs)
        self.options = {"multitask": multitask, **train_options, **peft_alias(options)}
        if exclude_demos is not None:
            self.options["exclude_demos"] = exclude_demos
        if num_threads is not None:
            self.options["num_threads"] = num_threads
        self.config = Config.from_options(**self.options)  # unknown or bad options fail here, before any compile
        tracking.patch_for_autolog(BootstrapFinetune)  # mlflow.dspy.autolog turned on before our import records us too
        self.run_dir: RunDir | None = None
        self.report: dict[str, Any] = {}

    @tracks_given_arguments
    def compile(self, student: dspy.Module, trainset: list | None = None, teacher: Any = None, *,
                valset: list | None = None, target: str | dict[str, str] = TrainConfig.target,
                bsize: int = TrainConfig.bsize, accumsteps: int = TrainConfig.accumsteps, lr: float = TrainConfig.lr,
                epochs: int = TrainConfig.epochs, bf16: bool = TrainConfig.bf16, int8: bool | None = None,
                peft: bool | None = None, path_prefix: str | None = None, _given: frozenset[str] = frozenset(),
                **options: Any) -> dspy.Module:
        """Compiles `student` into a new program backed by finetuned models; the student is not modified.

        Both API generations: DSPy 2.4's keywords (`compile(student=..., trainset=..., target=...)`)
        and DSPy 3.x's positional order (`compile(student, trainset, teacher)`).

        Args:
            student: The program to compile.
            trainset: Examples the teacher runs on.
            teacher: The program whose traces teach (default: the student), or a list of them.
            valset: Held-out examples: eval loss for choosing the epoch, and the metric before/after.
            target: Hugging Face id or local directory to finetune, or {predictor: target}. Given nowhere,
                DSPy 3.x-style programs whose predictors all have LMs finetune what those LMs name, else "t5-large".
            bsize: Micro batch per worker (12). accumsteps: gradient accumulation (1). lr (5e-5), epochs (1),
                bf16 (False): as named. Each argument given here wins over the constructor's option (and
                train_kwargs), even at its default; one left out leaves the constructor's (else the default).
            int8, peft, path_prefix: DSPy 2.4's: `peft=True` trains LoRA adapters (`lora`), `path_prefix`
                places the run (`storage_path`); `int8=True` is refused, naming the memory-saving options.
            **options: Any `Config` field, e.g. num_workers=2, zero_stage=3, storage_path="s3://..."; and
                `use_peft` (DSPy's local provider's name for `lora`).

        Returns:
            The compiled program. `self.run_dir` is the run directory it came from.
        """
        check_compile_arguments(student, trainset, teacher, self.train_kwargs_lms)
        documented = dict(target=target, bsize=bsize, accumsteps=accumsteps, lr=lr, epochs=epochs, bf16=bf16)
        config = self.config.replace(**documented_options(
            student, self.options, options=options, int8=int8, peft=peft, path_prefix=path_prefix,
            **{name: value for name, value in documented.items() if name in _given}))
        tracking.check(config.run.mlflow_tracking_uri)  # a tracking URI without mlflow installed stops here
        with ExitStack() as lock_scope:  # the run's writer lock, from before the first teacher call to the end
            prepared = self._prepare(student, trainset, teacher, valset, config, lock_scope, "compile")
            run, config, writer = prepared.run, prepared.config, prepared.writer
            empty = [k for k, d in prepared.data.items() if d.records == 0]
            if empty:
                raise FinetuneError(f"no finetuning records for model key(s) {empty}: the metric kept "
                                    f"{prepared.bootstrap.summary.kept} of {prepared.bootstrap.summary.examples} "
                                    f"examples (failed: {prepared.bootstrap.summary.failed}); see {run.bootstrap_dir}.")
            writer.check()
            trained = finetune_and_rebind(run, config, prepared.described, prepared.finetune_jobs(), program=student,
                                 adapter=resolve_adapter(self.adapter))
            writer.check()
            metric_report, evaluate_stage = self._evaluate(prepared, student, trained.compiled)
            self.report = run.update_report(metric=metric_report, stages={"evaluate": evaluate_stage}).to_json()

            html_path = write_report_html(run)
            run.push()
            tracking.log_compile_result(run.location, self.report)  # into the active MLflow run, if any
        logger.info("done: report %s, %s%s", run.report_json, html_path,
                    f" (uploaded to {run.location})" if run.remote else "")
        report_held()  # "N more warning(s) ... not shown"
        return trained.compiled

    def _evaluate(self, prepared: Prepared, student: dspy.Module, compiled: dspy.Module) -> tuple[dict, dict]:
        """metric.{before, after, teacher} on the valset (None without a valset or a metric; the base student within
        its finetuned self's limits: `base_limits`), and the evaluate stage's seconds and student LM usage."""
        started = time.time()
        config, valset = prepared.config, prepared.valset
        result: dict[str, Any] = {"before": None, "after": None, "teacher": None,
                                  "examples": len(valset) if valset else 0}
        if not valset or self.metric is None or not config.inference.evaluate:
            result["note"] = "no valset or no metric: nothing scored" if config.inference.evaluate else "evaluate=False"
            return result, {"seconds": 0.0}
        b = config.bootstrap
        common = dict(num_threads=config.inference.eval_threads, num_actors=b.num_actors, placement=config.train)
        logger.info("%s: the metric on %d valset examples, before and after", stage_label("evaluate"), len(valset))
        limits = {j.key: base_limits(j.target, j.train_file, j.added_tokens or (), config) for j in prepared.finetune_jobs()}
        base = base_program(student, prepared.plan, exclude_demos=b.exclude_demos, inference=config.inference,
                            adapter=resolve_adapter(self.adapter), trust_remote_code=config.train.trust_remote_code,
                            limits=limits)
        before = evaluate_program(base, valset, self.metric, **common)
        after = evaluate_program(compiled, valset, self.metric, **common)
        result["before"], result["after"] = before.score, after.score
        result["teacher"] = teacher_score(prepared.val_bootstrap, self.metric)
        logger.info("  metric: before %s, after %s, teacher %s", result["before"], result["after"], result["teacher"])
        stage = {"seconds": round(time.time() - started, 3), "usage": {"before": before.usage, "after": after.usage},
                 "nodes": {"before": before.nodes, "after": after.nodes},
                 "scoring_seconds": {"before": before.seconds, "after": after.seconds}}
        logger.info("  student tokens while scoring: %s", student_usage(stage))
        return result, stage

    def prepare(self, student: dspy.Module, *, trainset: list, teacher: Any = None, valset: list | None = None,
                **options: Any) -> Prepared:
        """Runs checks, bootstrapping and the data stage; returns what finetuning needs.

        `options` (any `Config` field) override the constructor's for this call. The run's writer
        lock is held while it runs and released when it returns.
        """
        with ExitStack() as lock_scope:
            config = self.config.replace(**options)
            return self._prepare(student, trainset, teacher, valset, config, lock_scope, "prepare")

    def _prepare(self, student: dspy.Module, trainset: list, teacher: Any, valset: list | None,
                 config: Config, lock_scope: ExitStack, operation: str) -> Prepared:
        """Stages 1-3; the run's writer lock is taken into `lock_scope` before anything is written or asked."""
        teachers = teacher if isinstance(teacher, (list, tuple)) else [teacher if teacher is not None else student]
        plan = self._check(student, list(teachers), trainset, valset, config)
        identity, inputs = self._inputs(config, plan, student, teachers, trainset, valset)
        run, writer, store = self._open_run(config, plan, identity, inputs, lock_scope, operation)
        description = self._describe(config, plan, student, teachers, inputs=inputs, trace_store=store.location)
        run.write_description(description)
        run.push()
        writer.check()
        ensure_ray(config.run.ray_address, log_to_driver=config.run.verbose)
        set_console_output(config.run.verbose)
        boot, val_boot = self._bootstrap(run, config, teachers, store, trainset, valset)
        started = time.time()
        data, val_data = self._build_datasets(run, config, plan, student, boot, val_boot)
        tokens = self._token_plans(run, plan, student, config, val_data)
        run.update_report(stages={
            "bootstrap": {**asdict(boot.summary), "resumed": boot.resumed,
                          "val": asdict(val_boot.summary) if val_boot else None},
            "data": {"seconds": round(time.time() - started, 3),
                     "keys": {k: asdict(v) for k, v in data.items()},
                     "val_keys": {k: asdict(v) for k, v in val_data.items()},
                     "tokens": {k: p.to_report() for k, p in tokens.items()}},
        })
        run.push()
        return Prepared(run, config, plan, boot, data, val_boot, val_data, list(valset) if valset else None, tokens,
                        description, writer)

    def _check(self, student: dspy.Module, teachers: list, trainset: list, valset: list | None,
               config: Config) -> ProgramPlan:
        """Stage 1: every problem of the program, teachers, targets, examples and user code, raised at once."""
        if not teachers:
            raise ProgramError("teacher: an empty list; pass a program, a list of programs, or None for the student.")
        plan = check_program(student, teachers, target=config.train.target,
                             multitask=config.bootstrap.multitask, teacher_settings=self.teacher_settings)
        problems = [p for t in dict.fromkeys(plan.target_of.values())
                    if (p := check_target(t, config.train.trust_remote_code))]
        problems += check_examples(trainset, student, "trainset")
        if valset is not None:
            problems += check_examples(valset, student, "valset")
        for i, t in enumerate(teachers):
            problems += check_picklable(t, "teacher" if len(teachers) == 1 else f"teacher[{i}]")
        if self.metric is not None:
            problems += check_picklable(self.metric, "metric")
        problems += check_picklable(driver_settings(), "dspy.configure settings")
        problems += check_user_code()
        if problems:
            raise ProgramError(problems)
        if valset and (overlap := valset_overlap(trainset, valset)):
            logger.warning("valset: %d example(s) have the same inputs as trainset examples; the after-metric "
                           "will overstate generalisation. Hold them out of one set.", overlap)
        return plan

    def _open_run(self, config: Config, plan: ProgramPlan, identity: dict[str, Any], inputs: dict[str, Any],
                  lock_scope: ExitStack, operation: str) -> tuple[RunDir, RunWriter, TraceStore]:
        """The run directory, its writer lock (taken into `lock_scope`) and the trace store; an earlier run's
        outputs that the changed inputs make stale are dropped."""
        run = RunDir.at(config.run.storage_path, config.run.run_name or run_name_of(inputs))
        if run.remote is not None:  # a bucket that cannot be written fails now, not after bootstrapping
            problem = check_writable(config.run.storage_path)
            if problem:
                raise ConfigError([problem])
        # One writer per run: another compile of this run makes this one wait or stop here, naming it.
        writer = lock_scope.enter_context(writer_for(run, config.run, operation))
        run.pull()  # after the lock: what a writer we waited for finished is resumed, not redone
        self.run_dir = run
        if run.config_json.exists():
            invalidate_changed(run, run.read_description().inputs, inputs)
        store = TraceStore.at(config.run.storage_path, plan.program_name, identity)
        logger.info("%s: %s, predictors %s -> model(s) %s; run directory %s", stage_label("checks"),
                    plan.program_name, ", ".join(plan.predictors),
                    ", ".join(f"{k} ({plan.target_of[k]})" for k in plan.keys()), run.location)
        return run, writer, store

    def _bootstrap(self, run: RunDir, config: Config, teachers: list, store: TraceStore, trainset: list,
                   valset: list | None) -> tuple[BootstrapResult, BootstrapResult | None]:
        """Stage 2: the teachers over the trainset and the valset, on one actor pool; (train, val or None)."""
        secrets = collect_secrets(*(p.lm for t in teachers for p in t.predictors()),
                                  self.teacher_settings.get("lm"), dspy.settings.lm)
        logger.info("%s: the teacher over %d trainset and %d valset examples on %d Ray Data actor(s) x %d threads",
                    stage_label("bootstrap"), len(trainset), len(valset or []), config.bootstrap.num_actors,
                    config.bootstrap.num_threads)
        splits = {"train": list(trainset), **({"val": list(valset)} if valset else {})}
        # The teacher writes its prompts with the adapter in use too (teacher_settings may still name another).
        booted = run_bootstrap_splits(run, splits=splits, teachers=list(teachers), metric=self.metric,
                                      config=config.bootstrap, teacher_settings=self.teacher_settings,
                                      secrets=secrets, store=store, settings=self._teacher_settings_in_actors())
        boot, val_boot = booted["train"], booted.get("val")
        s = boot.summary
        logger.info("  trainset: %d kept of %d, %d failed, %d teacher calls, %d example(s) from the trace store, "
                    "%.1fs%s", s.kept, s.examples, s.failed, s.teacher_calls, s.reused, s.seconds,
                    " (read back)" if boot.resumed else "")
        logger.info("  teacher tokens (trainset and valset): %s",
                    teacher_usage({**asdict(s), "val": asdict(val_boot.summary) if val_boot else {}}))
        return boot, val_boot

    def _build_datasets(self, run: RunDir, config: Config, plan: ProgramPlan, student: dspy.Module,
                        boot: BootstrapResult, val_boot: BootstrapResult | None
                        ) -> tuple[dict[str, DataSummary], dict[str, DataSummary]]:
        """Stage 3: each model key's finetuning data from the kept traces; (train, val) summaries by key."""
        options = dict(adapter=self.adapter, exclude_demos=config.bootstrap.exclude_demos,
                       drop_duplicates=config.bootstrap.drop_duplicates)
        data = build_datasets(run, boot.calls, plan, student, **options)
        val_data = build_datasets(run, val_boot.calls, plan, student, split="val", **options) if val_boot else {}
        if not val_boot:  # eval files of an earlier valset must not reach a later finetune
            run.remove("data", "val")
        logger.info("%s: %s", stage_label("data"), ", ".join(f"{k}: {d.records} records" for k, d in data.items()))
        return data, val_data

    def _token_plans(self, run: RunDir, plan: ProgramPlan, student: dspy.Module, config: Config,
                     val_data: dict[str, DataSummary]) -> dict[str, TokenPlan]:
        """Checks every answer against its target's tokenizer with the adapter in use; raises before training."""
        parse = adapter_parse(resolve_adapter(self.adapter), {n: p.signature for n, p in student.named_predictors()})
        plans = {key: plan_for_files(key, plan.target_of[key],
                                     [run.data_file(key), val_data[key].path if key in val_data else None], parse,
                                     trust_remote_code=config.train.trust_remote_code) for key in plan.keys()}
        raise_if_unfixable(plans.values())
        check_lora(plans.values(), config.train.lora)
        return plans

    def _teacher_settings_in_actors(self) -> dict[str, Any]:
        """The driver's settings the actors apply, with the adapter in use: what the teacher runs under."""
        return {**driver_settings(), "adapter": resolve_adapter(self.adapter)}

    def _inputs(self, config: Config, plan: ProgramPlan, student, teachers, trainset,
                valset) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the trace identity, the run's inputs as config.json records them; see `run_name_of`)."""
        identity = trace_identity(student=student, teachers=list(teachers), teacher_settings=self.teacher_settings,
                                  settings=self._teacher_settings_in_actors(), metric=self.metric,
                                  metric_threshold=config.bootstrap.metric_threshold)
        inputs = {
            "program": plan.program_name,
            "traces": trace_id(identity),
            "trace_parts": {part: fingerprint(value) for part, value in identity.items()},
            "examples": {"train": [example_key(ex) for ex in trainset],
                         "val": [example_key(ex) for ex in valset] if valset else []},
            "adapter": type(self.adapter).__name__ if self.adapter else None,
            "options": identity_options(config),
        }
        return identity, inputs

    def _describe(self, config: Config, plan: ProgramPlan, student, teachers, **more: Any) -> RunDescription:
        """config.json: the resolved options and what the plan decided; never an API key."""
        return RunDescription(
            program_class=class_path(student),
            options=config.to_dict(),  # RunDescription.to_json redacts the URIs in it
            predictors=plan.predictors,
            model_keys={key: {"target": plan.target_of[key], "predictors": plan.predictors_of(key)}
                        for key in plan.keys()},
            folders=folder_names(plan.keys()),
            teachers=[{p: lm_identity(pred.lm) for p, pred in t.named_predictors()} for t in teachers],
            teacher_settings_lm=lm_identity(self.teacher_settings.get("lm")),
            driver_lm=lm_identity(dspy.settings.lm),
            metric=callable_identity(self.metric),
            adapter=adapter_spec(resolve_adapter(self.adapter)),
            **more,
        )


COMPILE_OPTION_ARGS = tuple(name for name in inspect.signature(BootstrapFinetune.compile).parameters if name in FIELDS)
"""compile()'s documented arguments that are options of ours under the same name (target, bsize, ... bf16)."""


__all__ = ["BootstrapFinetune", "Prepared", "ConfigError", "ProgramError"]
