"""A driver's own modules reach the Ray workers, however the driver was started.

Each test writes a small user project to a temp folder: a package `shop` (the program, the
retriever and the metric, split over submodules) that is not installed, and a driver. The driver
runs in a subprocess started from another folder, changes directory before Ray starts, and
starts its own Ray (an isolated temp folder, so it never joins another cluster). Without the
user modules travelling by value, every actor fails with `ModuleNotFoundError: No module named 'shop'`:
Ray only puts the script's folder (not under `python -m`) and the current folder at `ray.init` on
the workers' path.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

FILES = {
    "shop/__init__.py": "",
    "shop/retrieve.py": '''
        from dspy.dsp.utils import dotdict

        COLORS = {f"thing{i}": ["red", "blue", "green", "gold"][i % 4] for i in range(64)}


        def colors_rm(query, k=3, **kwargs):
            name = query.rstrip("?").split()[-1]
            return [dotdict(long_text=f"{name} is {COLORS.get(name, 'grey')}.")][:k]
        ''',
    "shop/task.py": '''
        import re

        import dspy

        from shop import retrieve


        class Answer(dspy.Signature):
            """Answer with the color the context gives."""

            context: list[str] = dspy.InputField()
            question: str = dspy.InputField()
            answer: str = dspy.OutputField()


        class ColorRAG(dspy.Module):
            def __init__(self):
                super().__init__()
                self.retrieve = dspy.Retrieve(k=1)
                self.answer = dspy.Predict(Answer)

            def forward(self, question):
                return self.answer(context=self.retrieve(question).passages, question=question)


        def exact_color(example, prediction, trace=None):
            return prediction.answer.strip().lower() == example.answer


        def teacher_script(inputs, outputs):
            return {"answer": re.search(r"thing\\d+ is (\\w+)", inputs["context"]).group(1)}


        def examples(n):
            return [dspy.Example(question=f"What color is thing{i}?", answer=retrieve.COLORS[f"thing{i}"])
                    .with_inputs("question") for i in range(n)]
        ''',
    "shop/driver.py": '''
        """Run as `python -m shop.driver OUT ELSEWHERE [evaluate|prepare]`, or through scripts/run.py."""

        import json
        import os
        import sys

        import dspy

        from bootfinetune.stages.evaluate import evaluate_program
        from bootfinetune.runtime.ray_env import ensure_ray
        from bootfinetune.testing.teacher_server import TeacherServer
        from shop.retrieve import colors_rm
        from shop.task import ColorRAG, exact_color, examples, teacher_script


        def main(out, elsewhere, mode):
            os.chdir(elsewhere)  # before Ray starts: the workers get this folder, not the project's
            print(ensure_ray(num_cpus=4))  # which cluster: joined or started
            dspy.configure(rm=colors_rm)
            with TeacherServer(teacher_script) as server:
                teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="local", cache=False)
                result = {"cwd": os.getcwd()}
                if mode == "prepare":  # compile's checks, bootstrap and data stages
                    from bootfinetune import BootstrapFinetune

                    tp = BootstrapFinetune(metric=exact_color, teacher_settings={"lm": teacher},
                                           storage_path=os.path.join(out, "runs"), num_actors=2, max_errors=0)
                    prepared = tp.prepare(ColorRAG(), trainset=examples(8), target=os.environ["TINY_TARGET"])
                    s = prepared.bootstrap.summary
                    result["bootstrap"] = {"examples": s.examples, "kept": s.kept, "failed": s.failed}
                    result["records"] = sum(1 for _ in open(prepared.run.data_file("all")))
                else:
                    program = ColorRAG()
                    program.set_lm(teacher)
                    score = evaluate_program(program, examples(12), exact_color, use_ray=True, num_actors=2)
                    result.update(score=score.score, failed=score.failed)
                result["teacher_calls"] = server.calls
            with open(os.path.join(out, "result.json"), "w") as f:
                json.dump(result, f)


        if __name__ == "__main__":
            main(*sys.argv[1:3], sys.argv[3] if len(sys.argv) > 3 else "evaluate")
        ''',
    # A script in a subfolder that finds its package by extending sys.path, as many projects do.
    "scripts/run.py": '''
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

        from shop.driver import main

        main(*sys.argv[1:3], sys.argv[3] if len(sys.argv) > 3 else "evaluate")
        ''',
}


def write_project(root: Path) -> Path:
    for name, text in FILES.items():
        path = root / "project" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    (root / "elsewhere").mkdir()
    (root / "launch").mkdir()
    return root / "project"


def run_driver(args: list[str], cwd: Path, out: Path, mode: str = "evaluate", extra_env: dict | None = None,
               stale_pointer: str | None = None) -> tuple[dict, str]:
    """Runs a driver with its own Ray in an isolated temp folder; returns its result.json and its output.

    `stale_pointer` leaves a `ray_current_cluster` there naming a cluster that is gone.
    """
    ray_tmp = tempfile.mkdtemp(prefix="bfum", dir="/tmp")  # short: Ray's socket paths have a length limit
    if stale_pointer:
        os.makedirs(os.path.join(ray_tmp, "ray"))
        Path(ray_tmp, "ray", "ray_current_cluster").write_text(stale_pointer)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # bootfinetune itself is importable (as if installed); the project is not on any path.
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=ray_tmp, TMPDIR=ray_tmp, RAY_DISABLE_USAGE_STATS="1",
               **(extra_env or {}))
    try:
        proc = subprocess.run([sys.executable, *args, str(out), str(out / "elsewhere"), mode], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "ModuleNotFoundError" not in output, output[-4000:]
    return json.loads((out / "result.json").read_text()), output


def test_python_m_driver_that_changes_directory_evaluates_on_ray_actors(tmp_path):
    from tests.s3server import free_port

    project = write_project(tmp_path)
    # The machine also has a pointer left by a `ray start` that died: ensure_ray ignores it, says so, and starts
    # a cluster (left to Ray, `ray.init(num_cpus=4)` raised and `ray.init()` hung on it).
    dead = f"127.0.0.1:{free_port()}"
    result, output = run_driver(["-m", "shop.driver"], cwd=project, out=tmp_path, stale_pointer=dead)
    assert f"Ray cluster at {dead} that is not running" in output and "started a new local cluster" in output
    assert result["cwd"] == str(tmp_path / "elsewhere")
    # 12 questions answered by the actors with the user's program, retriever and metric: all right.
    assert result["failed"] == 0 and result["score"] == 1.0 and result["teacher_calls"] == 12


def test_script_in_a_subfolder_bootstraps_with_its_package_from_another_directory(tmp_path):
    from bootfinetune.testing.tiny_models import build_tiny_causal

    project = write_project(tmp_path)
    target = build_tiny_causal(tmp_path / "tiny-llama", hidden_size=32, num_layers=1)
    result, _ = run_driver([str(project / "scripts" / "run.py")], cwd=tmp_path / "launch", out=tmp_path,
                        mode="prepare", extra_env={"TINY_TARGET": str(target)})
    # compile's first stages ran the user's program, retriever and metric in two actors: every trace kept.
    assert result["cwd"] == str(tmp_path / "elsewhere")
    assert result["bootstrap"] == {"examples": 8, "kept": 8, "failed": 0} and result["teacher_calls"] == 8
    assert result["records"] == 8


# A driver beside the module holding its retriever's live state: a lock, an sqlite3 connection and a client
# object, as real retrieval helpers hold them. The module records in MARKS who imported it (the process and the
# file it was imported from), so the test sees it created on the workers, not pickled there.
STATEFUL = {
    "retrieval.py": '''
        import os
        import re
        import socket
        import sqlite3
        import threading

        import dspy
        from dspy.dsp.utils import dotdict

        LOCK = threading.Lock()
        DB = sqlite3.connect(":memory:", check_same_thread=False)
        DB.execute("create table colors (name text primary key, color text)")
        DB.executemany("insert into colors values (?, ?)",
                       [(f"thing{i}", ["red", "blue", "green", "gold"][i % 4]) for i in range(64)])
        with open(os.path.join(os.environ["MARKS"], f"{os.getpid()}.txt"), "w") as mark:
            mark.write(__file__)


        class VectorClient:
            """Stands in for a vector-store client: its own lock and an open socket, neither picklable."""

            def __init__(self):
                self.lock = threading.Lock()
                self.sock = socket.socket()
                self.calls = 0

            def search(self, name):
                with self.lock, LOCK:
                    self.calls += 1
                    row = DB.execute("select color from colors where name = ?", (name,)).fetchone()
                return row[0] if row else "grey"


        CLIENT = VectorClient()


        class Retriever:
            """The retriever handed to dspy.configure(rm=...): a module-level object holding the client."""

            def __init__(self, client):
                self.client = client

            def __call__(self, query, k=3, **kwargs):
                name = query.rstrip("?").split()[-1]
                return [dotdict(long_text=f"{name} is {self.client.search(name)}.")][:k]


        RM = Retriever(CLIENT)


        class Answer(dspy.Signature):
            """Answer with the color the context gives."""

            context: list[str] = dspy.InputField()
            question: str = dspy.InputField()
            answer: str = dspy.OutputField()


        class ColorRAG(dspy.Module):
            def __init__(self):
                super().__init__()
                self.retrieve = dspy.Retrieve(k=1)
                self.answer = dspy.Predict(Answer)

            def forward(self, question):
                return self.answer(context=self.retrieve(question).passages, question=question)


        def exact_color(example, prediction, trace=None):
            with LOCK:
                return prediction.answer.strip().lower() == example.answer


        def teacher_script(inputs, outputs):
            return {"answer": re.search(r"thing\\d+ is (\\w+)", inputs["context"]).group(1)}


        def examples(n):
            return [dspy.Example(question=f"What color is thing{i}?", answer=CLIENT.search(f"thing{i}"))
                    .with_inputs("question") for i in range(n)]
        ''',
    "driver.py": '''
        """python driver.py OUT ELSEWHERE MODE: MODE "renamed" moves this folder away first."""

        import json
        import os
        import sys

        import dspy
        from dspy.utils.exceptions import AdapterParseError

        from bootfinetune import BootstrapFinetune
        from bootfinetune.runtime.ray_env import ensure_ray
        from bootfinetune.testing.teacher_server import TeacherServer
        from retrieval import RM, ColorRAG, exact_color, examples, teacher_script


        def main(out, elsewhere, mode):
            here = os.path.dirname(os.path.abspath(__file__))
            if mode == "renamed":  # neither the workers nor this driver can read the module's file now
                os.rename(here, here + "-moved")
            os.chdir(elsewhere)  # before Ray starts: the workers get this folder, not the driver's
            print(ensure_ray(num_cpus=4))
            dspy.configure(rm=RM)
            with TeacherServer(teacher_script) as server:
                teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="local", cache=False)

                def teleprompter(storage):
                    return BootstrapFinetune(metric=exact_color, teacher_settings={"lm": teacher}, num_actors=2,
                                             storage_path=os.path.join(out, storage), max_errors=0, max_tokens=12)

                result = {"cwd": os.getcwd()}
                # the checks, the bootstrap and the data stage
                prepared = teleprompter("prepared").prepare(ColorRAG(), trainset=examples(8),
                                                            target=os.environ["TINY_TARGET"])
                s = prepared.bootstrap.summary
                result["prepare"] = {"examples": s.examples, "kept": s.kept, "failed": s.failed,
                                     "teacher_calls": server.calls}
                # the whole compile, in a run of its own
                tp = teleprompter("runs")
                compiled = tp.compile(ColorRAG(), trainset=examples(8), target=os.environ["TINY_TARGET"],
                                      epochs=1, bsize=4, lr=3e-3)
                s = tp.report["stages"]["bootstrap"]
                result["compile"] = {"examples": s["examples"], "kept": s["kept"], "failed": s["failed"],
                                     "teacher_calls": server.calls - result["prepare"]["teacher_calls"]}
                try:  # answered in this process by the finetuned model; the retriever is this process's RM
                    result["first_answer"] = compiled(question="What color is thing9?").answer
                except AdapterParseError as e:  # a 1-epoch tiny model may not write the format yet
                    result["first_answer"] = e.lm_response
            result["driver_pid"] = os.getpid()
            with open(os.path.join(out, "result.json"), "w") as f:
                json.dump(result, f)


        if __name__ == "__main__":
            main(*sys.argv[1:4])
        ''',
}


def run_stateful(tmp_path: Path, mode: str) -> tuple[dict, dict[int, str], str]:
    """Writes the stateful project, builds the tiny student, runs the driver from its folder; returns its result,
    the marks (pid -> file the module was imported from) and its output."""
    from bootfinetune.testing.tiny_models import build_tiny_causal

    project, marks = tmp_path / "project", tmp_path / "marks"
    for name, text in STATEFUL.items():
        project.mkdir(exist_ok=True)
        (project / name).write_text(textwrap.dedent(text).lstrip())
    marks.mkdir()
    (tmp_path / "elsewhere").mkdir()
    target = build_tiny_causal(tmp_path / "tiny-llama", hidden_size=32, num_layers=1)
    result, output = run_driver(["driver.py"], cwd=project, out=tmp_path, mode=mode,
                                extra_env={"TINY_TARGET": str(target), "MARKS": str(marks)})
    imported = {int(p.stem): p.read_text() for p in marks.glob("*.txt")}
    return result, imported, output


@pytest.fixture(scope="module")
def stateful_run(tmp_path_factory):
    """One driver for the module's two tests (a driver and its cluster cost seconds): it imports the module, moves
    its own folder away, then runs a prepare and a whole compile, each in a run of its own."""
    root = tmp_path_factory.mktemp("stateful")
    return (root, *run_stateful(root, "renamed"))


def test_a_sibling_module_with_live_state_is_imported_on_the_workers(stateful_run):
    root, result, imported, output = stateful_run
    print("stateful driver:", json.dumps(result))  # the Show section: teacher calls, the first answer
    assert "cannot be sent to Ray workers" not in output
    assert result["cwd"] == str(root / "elsewhere")
    assert result["compile"] == {"examples": 8, "kept": 8, "failed": 0, "teacher_calls": 8}
    assert isinstance(result["first_answer"], str)
    # The module (its lock, connection and client) was made by the driver and again by each worker that ran it.
    imported = dict(imported)
    assert imported.pop(result["driver_pid"]) == str(root / "project" / "retrieval.py")
    assert len(imported) >= 1


def test_the_module_still_reaches_the_workers_after_its_folder_is_renamed(stateful_run):
    root, result, imported, _ = stateful_run
    assert not (root / "project").exists() and (root / "project-moved").exists()
    assert result["prepare"] == {"examples": 8, "kept": 8, "failed": 0, "teacher_calls": 8}
    imported = dict(imported)
    assert imported.pop(result["driver_pid"]) == str(root / "project" / "retrieval.py")
    # Each actor imported it from the files bootfinetune shipped (no path on disk leads to the project).
    assert imported and all("/bootfinetune-code/" in path for path in imported.values()), imported
