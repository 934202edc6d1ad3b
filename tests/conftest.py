"""Shared fixtures: one local Ray cluster for the whole session, started lazily."""

from __future__ import annotations

import os

import pytest

# Keep DSPy's on-disk cache out of the user's home and out of the way of call counts.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")
os.environ.setdefault("DSPY_CACHEDIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "bootfinetune-test-dspy-cache"))
# Dummy credentials for the S3-compatible test server, set before Ray starts so every worker has them;
# tests never talk to a real cloud. Mirrors of cloud runs go under the test's temp folders.
from tests.s3server import CREDENTIALS  # noqa: E402

os.environ.update(CREDENTIALS)
os.environ.setdefault("BOOTFINETUNE_STAGING", os.path.join(os.environ.get("TMPDIR", "/tmp"), "bootfinetune-test-staging"))
# Ray Train settings for the tests' tiny runs, set before any driver (this process, or the subprocess drivers
# that inherit its environment) starts a TorchTrainer; Ray Train passes them to its controller and workers.
# - The controller polls the workers every 2 s by default: a run of a few seconds then waits up to 2 s to
#   register each report and again to see the workers finish. 0.5 s cuts that wait; a poll that takes longer
#   is not a failure (a worker counts as hung only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min).
# - The preemption watcher is one more actor process per run, watching for node drains no test makes.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


RAY_TESTS = "tests/integration/"
"""Where every test that uses Ray lives: they share one session cluster (`ray_cluster`), so they run in one process."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pyproject's addopts run the suite on 2 pytest-xdist workers: every test under `RAY_TESTS` on one worker, in
    collection order, on its one session cluster, as a serial run runs them; the unit tests, a module at a time,
    on the other. The unit tests mostly wait (retry back-offs, leases, slow clients), which then overlaps the
    integration tests' CPU work. (xdist's own `--dist loadgroup` cannot group them: it renames the tests' nodeids,
    which pytest 9.2 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "ray" if module.startswith(RAY_TESTS) else module

    return RayTestsOnOneWorker(config, log)


def pytest_collection_modifyitems(config, items):
    elsewhere = [item.nodeid for item in items
                 if "ray_cluster" in getattr(item, "fixturenames", ()) and not item.nodeid.startswith(RAY_TESTS)]
    if elsewhere:
        raise pytest.UsageError(f"tests that use the session's Ray cluster belong under {RAY_TESTS} (they run in one "
                                f"process, on one cluster): {elsewhere}")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every integration test (starting Ray costs seconds)."""
    import ray

    from bootfinetune.runtime.ray_env import ensure_ray

    # 8 logical CPUs on a 2-core machine: bootstrap actors mostly wait on HTTP, and two
    # training workers plus actors must fit side by side.
    # address="local": always a cluster of the session's own, even where a `ray start` runs (or left a
    # stale pointer), which would otherwise be joined or fail the start.
    ensure_ray("local", num_cpus=8, log_to_driver=False, env_vars={"OMP_NUM_THREADS": "1"})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1 with a bucket named "runs"."""
    from tests.s3server import S3Server

    server = S3Server()
    server.make_bucket("runs")
    yield server
    server.stop()


@pytest.fixture
def teacher_server():
    """A scripted OpenAI-compatible teacher on 127.0.0.1 for the TwoStep program."""
    from bootfinetune.testing.teacher_server import TeacherServer
    from tests.programs import two_step_script

    with TeacherServer(two_step_script) as server:
        yield server


@pytest.fixture
def teacher_lm(teacher_server):
    import dspy

    return dspy.LM("openai/scripted-teacher", api_base=teacher_server.url, api_key="sk-test-secret-123456",
                   cache=False, num_retries=0)


@pytest.fixture(autouse=True)
def environment_restored():
    """Each test gets os.environ back as it found it: a variable a library sets for its subprocesses (as
    `mlflow.set_tracking_uri` sets $MLFLOW_TRACKING_URI) would reach the drivers and Ray heads of the tests after."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def package_logger_restored():
    """Each test gets the package logger back as it found it: a job entrypoint run in process adds a handler
    on the stdout of its moment (the test's captured one, closed after it), which a later test would write to."""
    import logging

    logger = logging.getLogger("bootfinetune")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
