"""`ensure_ray`, the package's one way into Ray, against the clusters users have on their machines.

A `ray start --head` runs in its own temp folder (`RAY_TMPDIR`), ports and HOME, with token
authentication on as Ray >= 2.59 sets it up where Ray ran before (`~/.ray/auth_token` exists), and
is stopped by terminating it. Drivers are subprocesses that see only that temp folder, so they
never meet the test session's cluster or another one on the machine. (A stale pointer, left by a
`ray start` that died, is ignored with a warning: tests/integration/test_user_modules.py, whose driver
starts its own cluster anyway.)
"""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bootfinetune.runtime.ray_env import is_reachable
from tests.s3server import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

DEMO_STYLE = """
import ray
from bootfinetune.runtime.ray_env import ensure_ray

print(ensure_ray({address!r}, num_cpus=3, log_to_driver=False))
print("GCS", ray.get_runtime_context().gcs_address)
print("CPUS", int(ray.cluster_resources()["CPU"]))
"""


def isolated_env(temp_dir: str) -> dict[str, str]:
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), RAY_TMPDIR=temp_dir, TMPDIR=temp_dir,
               HOME=os.path.join(temp_dir, "home"), PYTHONPATH=str(REPO), RAY_DISABLE_USAGE_STATS="1")
    os.makedirs(os.path.join(temp_dir, "home", ".ray"), exist_ok=True)
    return env


def driver(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=env["TMPDIR"], capture_output=True, text=True,
                          timeout=300)


def start_head(temp_dir: str, env: dict[str, str]) -> tuple[subprocess.Popen | None, str, str]:
    """Starts `ray start --head --block`; returns it and its address, or None and its log when it died."""
    port = free_port()
    log = os.path.join(temp_dir, "head.log")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats",
         # Its own agent and metrics ports: the test session's cluster already holds Ray's defaults.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    pointer = Path(temp_dir, "ray", "ray_current_cluster")
    deadline = time.time() + 120
    while not pointer.exists() or not is_reachable(pointer.read_text().strip()):
        if head.poll() is not None or time.time() > deadline:
            stop_head(head)
            return None, "", open(log).read()[-3000:]
        time.sleep(1)
    return head, pointer.read_text().strip(), ""  # the GCS address as Ray wrote it (the node's IP)


def stop_head(head: subprocess.Popen) -> None:
    head.terminate()  # --block: the command stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, 9)


@pytest.fixture(scope="module")
def local_head():
    """`ray start --head` as a user runs it, on a machine where Ray ran before (token auth on)."""
    temp_dir = tempfile.mkdtemp(prefix="bfjn", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = isolated_env(temp_dir)
    with open(os.path.join(env["HOME"], ".ray", "auth_token"), "w") as f:
        f.write(secrets.token_hex(32))
    # A second try: on a loaded machine the raylet can give up waiting for its agent (a Ray check, not ours).
    head, address, log = start_head(temp_dir, env)
    if head is None:
        head, address, log = start_head(temp_dir, env)
    if head is None:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"ray start --head did not come up: {log}")
    yield address, env
    stop_head(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_running_local_cluster_is_joined_where_ray_init_with_num_cpus_raised(local_head):
    address, env = local_head
    # What the demo did before: Ray refuses resources when it finds the running cluster.
    old = driver("import ray; ray.init(num_cpus=3)", env)
    assert old.returncode != 0 and "num_cpus and num_gpus must not be provided" in old.stderr
    new = driver(DEMO_STYLE.format(address=None), env)
    assert new.returncode == 0, new.stderr[-3000:]
    assert f"Ray: joined the cluster already running on this machine at {address}" in new.stdout
    assert f"GCS {address}" in new.stdout and "CPUS 1" in new.stdout  # the head's 1 CPU, not the 3 asked


def test_an_explicit_address_wins_over_the_pointer(local_head):
    address, head_env = local_head
    temp_dir = tempfile.mkdtemp(prefix="bfex", dir="/tmp")
    try:
        env = isolated_env(temp_dir)
        shutil.copy(os.path.join(head_env["HOME"], ".ray", "auth_token"), os.path.join(env["HOME"], ".ray"))
        os.makedirs(os.path.join(temp_dir, "ray"))
        Path(temp_dir, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # stale: not read
        env.update(RAY_ADDRESS=address, RAY_AUTH_MODE="token")  # an explicit address sends the token when asked to
        proc = driver(DEMO_STYLE.format(address=None), env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"Ray: joined {address} (ray_address or $RAY_ADDRESS)" in proc.stdout and "CPUS 1" in proc.stdout
        assert "Ignoring" not in proc.stderr
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
