"""docs/clusters.md's `ray job submit --working-dir . -- python ray_jobs/compile.py --config ...` against a real head.

The head is `ray start --head --block` on 127.0.0.1 in its own temp dir (so it never meets the
test session's cluster), stopped by terminating that process. The job compiles the demo task
from a small JSONL trainset, with the demo config and `--set` overrides.
"""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bootfinetune.demo.task import make_datasets
from tests.s3server import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


DOC = REPO / "docs" / "clusters.md"


def readme_shell_env(env: dict[str, str]) -> dict[str, str]:
    """The environment docs/clusters.md's line before `ray start --head` leaves in a shell, run as written."""
    readme = DOC.read_text()
    block = readme[readme.index("\nray start --head") - 300:readme.index("\nray start --head")]
    line = block.splitlines()[-1].split("  #")[0]
    assert line.startswith("export RAY_AUTH_MODE=token"), line
    proc = subprocess.run(["bash", "-c", f"{line} && env -0"], env=env, capture_output=True, text=True, check=True)
    token = open(os.path.join(env["HOME"], ".ray", "auth_token")).read().strip()
    assert token not in proc.stdout + proc.stderr  # the line keeps the token off the terminal
    return dict(item.split("=", 1) for item in proc.stdout.split("\0") if "=" in item)


@pytest.fixture(scope="module")
def ray_head():
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    temp_dir = tempfile.mkdtemp(prefix="bfjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    # A machine where Ray has run before: ~/.ray/auth_token exists (any ray.init() writes one), so Ray >= 2.59
    # turns token authentication on for `ray start --head`. HOME is the test's own.
    home = os.path.join(temp_dir, "home")
    os.makedirs(os.path.join(home, ".ray"))
    with open(os.path.join(home, ".ray", "auth_token"), "w") as f:
        f.write(secrets.token_hex(32))
    env.update(HOME=home)
    env.pop("RAY_AUTH_MODE", None)
    env = readme_shell_env(env)
    port, dash = free_port(), free_port()
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Its own agent and metrics ports: the test session's cluster already holds Ray's defaults (52365...).
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=env, stdout=open(os.path.join(temp_dir, "head.log"), "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (token authentication may refuse us): it is up
            break
        except Exception:
            if head.poll() is not None or time.time() > deadline:
                head.kill()
                log = open(os.path.join(temp_dir, "head.log")).read()[-3000:]
                raise RuntimeError(f"ray start --head did not come up: {log}")
            time.sleep(1)
    yield address, env
    head.terminate()  # --block: the command stops the processes it started
    try:
        head.wait(timeout=3)  # after the jobs a graceful stop took 32 s, for nothing kept: then the kill below
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, 9)  # its GCS, raylet, dashboard and agents share its process group
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cmd, env, timeout):
    """Runs `ray job submit`; retries while the head's job agent is still starting (nothing was submitted)."""
    deadline = time.time() + 240
    while True:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


def test_readme_ray_job_submit_line_compiles(ray_head, tmp_path):
    address, env = ray_head
    readme = DOC.read_text()
    line = next(l for l in readme.splitlines() if l.startswith("ray job submit --working-dir . -- python ray_jobs/compile.py"))
    assert "--config ray_jobs/configs/demo_cpu.yaml" in line
    train, val = make_datasets(24, 8)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"message": e.message, "city": e.city, "country": e.country}) + "\n"
                            for e in train))
    overrides = ["--set", f"trainset={{path: {data}, inputs: [message]}}", "--set", "valset=null",
                 "--set", "epochs=2", "--set", f"storage_path={tmp_path / 'runs'}", "--set", "num_actors=1"]
    cmd = line.split() + overrides
    cmd[cmd.index("submit") + 1:cmd.index("submit") + 1] = ["--address", address]
    proc = submit(cmd, {**env, "BOOTFINETUNE_STAGING": str(tmp_path / "staging"),
                        "XDG_CACHE_HOME": str(tmp_path / "cache")}, timeout=900)
    out = proc.stdout + proc.stderr
    if os.environ.get("BOOTFINETUNE_TEST_DUMP"):  # the log, to measure it (docs/clusters.md, "What a compile prints")
        Path(os.environ["BOOTFINETUNE_TEST_DUMP"]).write_text(out)
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    result = json.loads(re.search(r"BOOTFINETUNE_RESULT (\{.*\})", out).group(1))
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == tmp_path / "runs"
    assert (run_dir / "models" / "all" / "manifest.json").exists() and (run_dir / "program.json").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stages"]["bootstrap"]["examples"] == 24 and report["stages"]["bootstrap"]["teacher_calls"] == 48
    assert_readable_log(out, budget=60)


def assert_readable_log(out: str, budget: int) -> None:
    """A job's log without a terminal: no redrawn bars, none of Ray's per-dataset or worker lines, few lines."""
    lines = out.splitlines()
    assert "\r" not in out and "\x1b[A" not in out, "a progress bar was redrawn"
    for noise in ("execution finished", "Starting execution of Dataset", "Failed to query Ray Train",
                  "(RayTrainWorker", "(TrainController", "Loading weights"):
        assert noise not in out, noise
    assert len(lines) <= budget, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert any(line.startswith("[bootfinetune] finetune all: ") for line in lines)


def test_a_bad_config_fails_the_job_before_any_work(ray_head, tmp_path):
    address, env = ray_head
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--", "python",
           "ray_jobs/compile.py", "--config", "ray_jobs/configs/demo_cpu.yaml", "--set", "epoch=3",
           "--set", f"storage_path={tmp_path / 'runs'}"]
    proc = submit(cmd, env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Did you mean 'epochs'" in out
    assert not (tmp_path / "runs").exists()
