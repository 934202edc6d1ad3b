"""The run directory: where every stage reads its input and writes its output.

```
{storage_path}/{run_name}/
  config.json        resolved configuration (no secrets)
  bootstrap/         {split}.calls.jsonl, {split}.failures.jsonl, {split}.summary.json (written last: done)
  data/{folder}.jsonl   finetuning records (chat messages) per model key
  models/{folder}/      Hugging Face export + manifest.json (written last: the model is done)
  checkpoints/{folder}/ that key's resumable checkpoints (epoch_{NNN}/: its best epoch and its latest) and
                        bootfinetune_job.json (what they were trained on)
  report.json           counts, losses, metrics, time and tokens per stage (report.html: drawn as a page)
  program.json          the compiled program's state
  evaluations/{name}.json  scores of the evaluate job
  writer.lock           held (flock) by the one process writing the run, naming it (`bootfinetune.run.writer`)
```

`{folder}` is the model key's safe folder name, recorded in config.json (`folders`; the key itself
when it is a safe name, see `bootfinetune.common.names`). Every path handed out here is checked to stay
inside the run (`paths.inside`), and so is every delete (`remove`, `remove_checkpoints`).

Every run file is read and written here, each JSON file through its record (`bootfinetune.run.runfiles`);
files are written to a temporary name and renamed (`bootfinetune.run.jsonio`), so a crash never
leaves a half file where a finished one is expected.

`storage_path` may also be a cloud URI (`s3://`, `gs://`): a run directory is a `Mirror`, so `root` is
then a local mirror of `{uri}/{run_name}`, `pull()` fetches the URI's files into it and `push()` uploads
what a stage wrote. For a folder both are no-ops.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

from bootfinetune.run import storage
from bootfinetune.run.jsonio import (atomic_write, fingerprint, fsync_folder, iter_jsonl, read_json, write_json,
                                     write_jsonl)
from bootfinetune.common.names import SLUG_LENGTH, folder_names, run_name_problem, safe_name
from bootfinetune.run.mirror import Mirror
from bootfinetune.run.paths import RunPathError, checked_folder, inside, inside_uri
from bootfinetune.run.runfiles import (BootstrapSummary, JobStamp, ModelManifest, RunDescription, RunFileError,
                                       RunReport, read_record)


def run_name_for(program_name: str, inputs: Any) -> str:
    """`{program}-{hash of inputs}`: the same inputs give the same name, so a rerun resumes.

    >>> run_name_for("RAG", {"a": 1}) == run_name_for("RAG", {"a": 1})
    True
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", program_name).lstrip(".-")[:SLUG_LENGTH - 4].rstrip(".-") or "program"
    return f"{slug}-{fingerprint(inputs)}"  # a safe name (`names.is_safe_name`): at most 73 characters


def run_name_of(inputs: dict[str, Any]) -> str:
    """The run name a compile's inputs give: the same inputs, the same run, so a rerun resumes.

    `inputs` is what config.json records under "inputs": the program's name, the trace
    identity, the examples, the training-data adapter and every option but resources.
    """
    return run_name_for(inputs["program"], {"traces": inputs["traces"], "examples": fingerprint(inputs["examples"]),
                                            "adapter": inputs["adapter"], "options": inputs["options"]})


def _check_run_name(run_name: str) -> None:
    problem = run_name_problem(run_name)
    if problem:
        raise RunPathError(problem)


@dataclass(frozen=True)
class RunDir(Mirror):
    """Paths inside one run directory (a `Mirror`: its folder, and its URI on cloud storage). Nothing is
    created until a stage writes."""

    @classmethod
    def at(cls, storage_path: str, run_name: str) -> "RunDir":
        """The run directory `run_name` under `storage_path`; a name that is not a safe name (`?`, `#`, `%`,
        `/`, NUL, too long) is refused (`paths.RunPathError`): appended to a URI it would change what it names."""
        _check_run_name(run_name)
        return cls.under(storage_path, run_name)

    def sibling(self, run_name: str) -> "RunDir":
        """The run directory named `run_name` beside this one (same folder or same URI prefix)."""
        _check_run_name(run_name)
        if self.remote is None:
            return RunDir(self.root.parent / run_name)
        s = urlsplit(self.remote)
        parent = s.path.rstrip("/").rpartition("/")[0]
        return RunDir.from_location(urlunsplit((s.scheme, s.netloc, f"{parent}/{run_name}", s.query, s.fragment)))

    def checkpoint_storage(self) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Ray Train's RunConfig: checkpoints/ on the URI, or the folder."""
        if self.remote is None:
            return str(self.checkpoints_dir()), None
        fs, path = storage.filesystem(self._uri("checkpoints"))
        return path, fs

    def checkpoint_location(self, key: str) -> str:
        """Where model key `key`'s checkpoints go: checkpoints/{folder} on the URI, or in the folder."""
        if self.remote is None:
            return str(self.checkpoint_dir(key))
        return self._uri("checkpoints", self.folder(key))

    def remove_checkpoints(self, key: str) -> None:
        """Deletes checkpoints/{folder} (in the folder, and on the URI when there is one)."""
        self.remove("checkpoints", self.folder(key))
        if self.remote is not None:
            storage.remove(self._uri("checkpoints", self.folder(key)))

    def model_uri(self, key: str) -> str | None:
        """models/{folder} on the URI, or None for a folder."""
        if self.remote is None:
            return None
        return self._uri("models", self.folder(key))

    def path(self, *parts: str) -> Path:
        """`root/parts`, refused (`paths.RunPathError`) when it resolves outside the run: every path of the run
        goes through here."""
        return inside(self.root, *parts)

    def _uri(self, *parts: str) -> str:
        """The run's URI with `parts` appended, checked to stay under it (`paths.inside_uri`)."""
        inside_uri(str(self.remote), *parts)
        return storage.join_uri(str(self.remote), *parts)

    def remove(self, *parts: str) -> None:
        """Deletes the folder `root/parts` and what it holds (checked to be inside the run first)."""
        path = self.path(*parts)
        if path.is_symlink():  # a link inside the run pointing in: drop the link, never what it points at
            path.unlink()
        shutil.rmtree(path, ignore_errors=True)

    def folder(self, key: str) -> str:
        """Model key `key`'s folder name under data/, models/ and checkpoints/, as config.json records it.

        A run without the record (made before it, or a stage run on its own) uses the rule,
        `names.safe_name`: the key itself when it is a safe name, as those runs had it.
        """
        recorded = self._folders()
        if key in recorded:
            return checked_folder(key, recorded[key], self.config_json)
        return safe_name(key, taken=recorded.values())

    def _folders(self) -> dict[str, str]:
        try:
            folders = self.read_description().folders
        except (OSError, ValueError, RunFileError):
            return {}
        return folders if isinstance(folders, dict) else {}

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config_json(self) -> Path:
        return self.path("config.json")

    @property
    def bootstrap_dir(self) -> Path:
        return self.path("bootstrap")

    def bootstrap_file(self, split: str, part: str) -> Path:
        """bootstrap/{split}.{part}: part is "calls.jsonl", "failures.jsonl" or "summary.json"."""
        return self.path("bootstrap", f"{split}.{part}")

    def read_bootstrap(self, split: str) -> tuple[Iterator[dict], Iterator[dict], BootstrapSummary] | None:
        """A finished bootstrap of `split`: (its calls, its failures, as dicts; its summary), or None unfinished."""
        summary = self.bootstrap_file(split, "summary.json")
        if not summary.exists():
            return None
        return (iter_jsonl(self.bootstrap_file(split, "calls.jsonl")),
                iter_jsonl(self.bootstrap_file(split, "failures.jsonl")), read_record(BootstrapSummary, summary))

    def write_bootstrap(self, split: str, calls: Iterable[dict], failures: Iterable[dict],
                        summary: BootstrapSummary) -> None:
        """Writes a bootstrap of `split`; the summary last: its presence marks the stage done."""
        write_jsonl(self.bootstrap_file(split, "calls.jsonl"), calls)
        write_jsonl(self.bootstrap_file(split, "failures.jsonl"), failures)
        write_json(self.bootstrap_file(split, "summary.json"), summary.to_json())

    def forget_bootstrap(self, split: str) -> None:
        """Marks the bootstrap of `split` unfinished (its summary deleted): the next compile runs it again."""
        self.bootstrap_file(split, "summary.json").unlink(missing_ok=True)

    @property
    def data_dir(self) -> Path:
        return self.path("data")

    def data_file(self, key: str, split: str = "train") -> Path:
        """data/{folder}.jsonl, or data/{split}/{folder}.jsonl for another split ("val")."""
        name = f"{self.folder(key)}.jsonl"
        return self.path("data", name) if split == "train" else self.path("data", split, name)

    def write_data(self, key: str, rows: Iterable[dict], split: str = "train") -> int:
        """Writes model key `key`'s finetuning records of `split` (`data_file`); returns how many."""
        return write_jsonl(self.data_file(key, split), rows)

    @property
    def models_dir(self) -> Path:
        return self.path("models")

    def model_dir(self, key: str) -> Path:
        return self.path("models", self.folder(key))

    def checkpoints_dir(self) -> Path:
        return self.path("checkpoints")

    def checkpoint_dir(self, key: str) -> Path:
        """checkpoints/{folder}: model key `key`'s checkpoints (`epoch_{NNN}/`), in the local folder or mirror."""
        return self.path("checkpoints", self.folder(key))

    def read_job_stamp(self, key: str) -> JobStamp | None:
        """What model key `key`'s checkpoints were trained on, or None when they carry no stamp."""
        path = self.checkpoint_dir(key) / JobStamp.FILE
        return read_record(JobStamp, path) if path.exists() else None

    def write_job_stamp(self, stamp: JobStamp) -> None:
        write_json(self.checkpoint_dir(stamp.key) / JobStamp.FILE, stamp.to_json())

    def evaluation_json(self, name: str) -> Path:
        """evaluations/{safe name}.json: an evaluation's scores (report.json's `evaluations` maps the name to it)."""
        known = self.read_report().evaluations if self.report_json.exists() else {}
        file = known.get(name) or f"{safe_name(name, taken=[f.removesuffix('.json') for f in known.values()])}.json"
        return self.path("evaluations", checked_folder(name, file, self.report_json))

    @property
    def report_json(self) -> Path:
        return self.path("report.json")

    def write_evaluation(self, name: str, scores: dict[str, Any]) -> None:
        """Writes evaluations/{file}.json (`scores` and `name`) and records the file in report.json's `evaluations`."""
        path = self.evaluation_json(name)
        write_json(path, {**scores, "name": name})
        self.update_report(evaluations={name: path.name})

    @property
    def program_json(self) -> Path:
        return self.path("program.json")

    def read_program(self) -> dict[str, Any]:
        """program.json: the compiled program's state (`dspy.Module.dump_state`)."""
        return read_json(self.program_json)

    def write_program(self, state: dict[str, Any]) -> None:
        write_json(self.program_json, state)

    def manifest_json(self, key: str) -> Path:
        """models/{key}/manifest.json: written last, its presence means the model is finished."""
        return self.model_dir(key) / ModelManifest.FILE

    def read_description(self) -> RunDescription:
        """config.json as its record (FileNotFoundError when the run has none)."""
        return read_record(RunDescription, self.config_json)

    def write_description(self, description: RunDescription) -> None:
        """Writes config.json, recording a folder (`folders`) for each model key that has none yet."""
        description.folders = folder_names(description.model_keys, recorded=description.folders)
        write_json(self.config_json, description.to_json())

    def read_manifest(self, key: str) -> ModelManifest | None:
        """The manifest of model `key`, or None while it is not finished."""
        path = self.manifest_json(key)
        return read_record(ModelManifest, path) if path.exists() else None

    def finished_models(self) -> dict[str, ModelManifest]:
        """Every finished model's manifest, by key (models/*/manifest.json)."""
        manifests = (read_record(ModelManifest, p) for p in sorted(self.models_dir.glob(f"*/{ModelManifest.FILE}"))
                     if not p.parent.name.startswith("."))  # a staged export (`model_staging`) is not a model
        return {m.key: m for m in manifests}

    def write_manifest(self, manifest: ModelManifest) -> None:
        write_json(self.manifest_json(manifest.key), manifest.to_json())

    def model_staging(self, key: str) -> Path:
        """An empty folder beside models/{folder} (`models/.{folder}.new.tmp`, never synced) for a new export
        of model `key`; `swap_model` puts it in place once complete, so the model there is kept until then.

        A swap cut short between its two renames (a crash) is finished first: the complete export found
        beside the folder (the new one, else the old one) takes the folder's place.
        """
        out = self.model_dir(key)
        new, old = self.path("models", f".{out.name}.new.tmp"), self.path("models", f".{out.name}.old.tmp")
        if not out.exists():
            done = next((d for d in (new, old) if (d / ModelManifest.FILE).exists()), None)
            if done is not None:
                os.replace(done, out)
        for stale in (new, old):
            self.remove("models", stale.name)
        new.mkdir(parents=True)
        return new

    def swap_model(self, manifest: ModelManifest, staged: Path) -> None:
        """Writes the manifest into a staged export (`model_staging`), last, then puts the export in place of
        models/{folder}; the model that was there is deleted only then."""
        write_json(staged / ModelManifest.FILE, manifest.to_json())
        out = self.model_dir(manifest.key)
        old = self.path("models", f".{out.name}.old.tmp")
        if out.exists():
            os.replace(out, old)
        os.replace(staged, out)
        fsync_folder(out.parent)
        self.remove("models", old.name)

    def read_report(self) -> RunReport:
        """report.json as its record (an empty one before any stage wrote it)."""
        return read_record(RunReport, self.report_json) if self.report_json.exists() else RunReport()

    def update_report(self, **sections: Any) -> RunReport:
        """Merges top-level sections into report.json (dicts merge one level deep)."""
        report = self.read_report().merge(**sections)
        write_json(self.report_json, report.to_json())
        return report

    def write_report_page(self, html: str) -> Path:
        """Writes report.html (report.json drawn as a page) and returns its path."""
        path = self.path("report.html")
        atomic_write(path, html)
        return path
