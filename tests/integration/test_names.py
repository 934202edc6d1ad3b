"""A predictor named like a path (`x/../../../../escaped`, held in a dict attribute) through a real compile.

With `multitask=False` the predictor's name is the model key, and the key used to become folder names:
the data stage and the checkpoints wrote outside the storage folder. Now the key maps to a safe folder
name recorded in config.json, every reader uses the record, and nothing is written outside the run
(the trace store beside it excepted). One tiny model, 12 examples, one epoch.
"""

from pathlib import Path

import dspy
import pytest

import bootfinetune
from bootfinetune import BootstrapFinetune
from bootfinetune.pipeline import evaluate_run
from bootfinetune.run.jsonio import read_json, read_jsonl
from bootfinetune.common.names import is_safe_name
from bootfinetune.serving.lm import finetuned_engine
from bootfinetune.serving.ray_serve import model_specs
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.programs import two_step_script

pytestmark = pytest.mark.integration
KEY = "x/../../../../escaped"
NAME = f"steps['{KEY}']"


class PathNamed(dspy.Module):
    """One predictor, held in a dict under a path-like key: its name is `steps['x/../../../../escaped']`."""

    def __init__(self):
        super().__init__()
        self.steps = {KEY: dspy.Predict("text -> rewritten")}

    def forward(self, text):
        return self.steps[KEY](text=text)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_a_path_like_predictor_name_writes_nothing_outside_the_run(ray_cluster, tmp_path):
    target = build_tiny_causal(tmp_path / "model")
    storage = tmp_path / "d1" / "d2" / "d3" / "runs"  # deep enough that any escape still lands in tmp_path
    storage.mkdir(parents=True)
    before = _files(tmp_path)
    examples = [dspy.Example(text=f"item {i}", rewritten=f"item {i}!").with_inputs("text") for i in range(12)]
    with TeacherServer(two_step_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-unused-names", cache=False)
        tp = BootstrapFinetune(teacher_settings={"lm": teacher}, multitask=False, storage_path=str(storage),
                               max_tokens=8, evaluate=False)
        compiled = tp.compile(PathNamed(), trainset=examples, target=str(target), epochs=1, bsize=8)
    run = tp.run_dir
    traces = storage / "traces"
    outside = sorted(str(p) for p in _files(tmp_path) - before
                     if run.root not in p.parents and traces not in p.parents)
    assert outside == [], outside  # the escaped'].jsonl and escaped']/epoch_001 of the issue are gone

    described = run.read_description()
    folder = described.folders[NAME]
    assert list(described.model_keys) == [NAME] and is_safe_name(folder) and folder != NAME
    assert folder.startswith("steps-x-escaped-")  # readable slug + a hash of the key
    assert read_jsonl(run.root / "data" / f"{folder}.jsonl")[0]["predictor"] == NAME
    assert (run.root / "checkpoints" / folder).is_dir()
    manifest = read_json(run.root / "models" / folder / "manifest.json")
    assert manifest["key"] == NAME and manifest["folder"] == folder and manifest["version"] == 2
    assert sorted(p.name for p in (run.root / "models").iterdir()) == [folder]
    assert Path(finetuned_engine(compiled.steps[KEY].lm).model) == run.root / "models" / folder

    # Readers use the recorded folder: load, serve's model table, and an evaluation with a path-like name.
    loaded = bootfinetune.load(run.root)
    assert Path(finetuned_engine(loaded.steps[KEY].lm).model) == run.root / "models" / folder
    specs = model_specs(run)
    assert list(specs) == [NAME] and Path(specs[NAME]["model"]) == run.root / "models" / folder
    out = evaluate_run(str(run.root), examples[:2], lambda ex, pred, trace=None: True, name="../../evil name")
    assert out["examples"] == 2 and out["score"] is not None  # scored (a tiny model's answer may not parse)
    file = read_json(run.report_json)["evaluations"]["../../evil name"]
    assert is_safe_name(file) and read_json(run.root / "evaluations" / file)["name"] == "../../evil name"
    outside = sorted(str(p) for p in _files(tmp_path) - before
                     if run.root not in p.parents and traces not in p.parents)
    assert outside == [], outside
