"""Which modules count as the user's own, and that they reach a worker as code, not as state (no Ray here)."""

import importlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bootfinetune.runtime import ray_env, user_code, worker_pickle
from bootfinetune.stages.checks import check_picklable, check_user_code

REPO = Path(__file__).resolve().parents[2]


RULES = """
import os
import socket
import sqlite3
import threading

LOCK = threading.Lock()
DB = sqlite3.connect(":memory:", check_same_thread=False)
DB.execute("create table colors (name text, score int)")
DB.executemany("insert into colors values (?, ?)", [("red", 1), ("blue", 2)])
MADE_IN = os.getpid()


class Client:
    \"\"\"Stands in for a vector-store client: a lock and an open socket.\"\"\"

    def __init__(self):
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.pid = os.getpid()

    def close(self):
        self.sock.close()


CLIENT = Client()


def score(color):
    with LOCK:
        return DB.execute("select score from colors where name = ?", (color,)).fetchone()[0] * 10


class Judge:
    def __call__(self, color):
        return score(color) + 1
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package of the user's (`myshop`, a submodule holding a lock, a connection and a client), importable
    only through a sys.path entry, imported after `keep_sources` ran (as a driver importing bootfinetune first)."""
    pkg = tmp_path / "src" / "myshop"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rules.py").write_text(RULES)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "stale.py").write_text("raise SystemExit('a cache file was shipped')")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    user_code.keep_sources()
    module = importlib.import_module("myshop.rules")
    yield module
    module.CLIENT.close()
    for name in ("myshop.rules", "myshop"):
        sys.modules.pop(name, None)
    user_code._kept.pop("myshop", None)


def test_installed_and_own_modules_are_not_the_users(user_package):
    import dspy
    import ray

    assert not user_code.is_user_module(json)  # the standard library
    assert not user_code.is_user_module(dspy) and not user_code.is_user_module(ray)  # installed
    assert not user_code.is_user_module(sys.modules["bootfinetune"])
    assert user_code.is_user_module(sys.modules["myshop"])
    names = [m.__name__ for m in user_code.user_modules()]
    assert "myshop" in names and "myshop.rules" not in names  # the package is shipped whole


def run_elsewhere(tmp_path, blob: bytes, pickled: bytes, code: str) -> list[str]:
    """A fresh process in another directory, with no path to myshop: what a worker without the files sees.
    It installs the shipped zip (`user_code.install`, as an actor does first), unpickles, and runs `code`."""
    (tmp_path / "code.zip").write_bytes(blob)
    (tmp_path / "objects.pkl").write_bytes(pickled)
    (tmp_path / "worker-tmp").mkdir(exist_ok=True)
    script = ("import os, pickle, sys\n"
              "from pathlib import Path\n"
              "from bootfinetune.runtime import user_code\n"
              "blob = Path(sys.argv[1], 'code.zip').read_bytes()\n"
              "root = user_code.install(user_code.UserCode('d' + str(len(blob)), ('myshop',), blob))\n"
              "assert root == user_code.install(user_code.UserCode('d' + str(len(blob)), ('myshop',), blob))\n"
              "assert sys.path.count(str(root)) == 1  # installed once, however many times asked\n"
              "objects = pickle.loads(Path(sys.argv[1], 'objects.pkl').read_bytes())\n" + code)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd="/", capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                            "TMPDIR": str(tmp_path / "worker-tmp")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_shipped_modules_are_imported_where_they_cannot_be_found_and_make_their_own_state(user_package, tmp_path):
    files, names, problems = user_code.collect_sources()
    assert problems == [] and "myshop" in names
    assert {"myshop/__init__.py", "myshop/rules.py"} <= set(files) and "myshop/__pycache__/stale.py" not in files
    blob = user_code.zip_sources(files)
    assert blob == user_code.zip_sources(dict(reversed(files.items())))  # same files, same bytes (the digest)
    # The function and class travel by reference (the lock and the connection they use never do); the client,
    # a module-level object that cannot be pickled, by reference to its attribute.
    pickled = worker_pickle.dumps((user_package.Judge(), user_package.score, user_package.CLIENT))
    out = run_elsewhere(tmp_path, blob, pickled,
                        "judge, score, client = objects\n"
                        "import myshop.rules as rules\n"
                        "print(judge('blue'), score('red'), client is rules.CLIENT, rules.MADE_IN == os.getpid(),\n"
                        "      client.pid == os.getpid(), rules.__file__.startswith(str(root)))\n")
    assert out == ["21", "10", "True", "True", "True", "True"]


def test_files_moved_after_the_import_are_shipped_as_they_were(user_package, tmp_path):
    (tmp_path / "src").rename(tmp_path / "moved")  # no one finds myshop on disk now, this process included
    files, names, problems = user_code.collect_sources()
    assert problems == [] and "myshop" in names and files["myshop/rules.py"].decode() == RULES
    out = run_elsewhere(tmp_path, user_code.zip_sources(files), worker_pickle.dumps(user_package.Judge()),
                        "print(objects('red'))\n")
    assert out == ["11"]


def test_a_user_module_whose_files_are_gone_is_named_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "lostmod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lost"))
    module = importlib.import_module("lostmod")  # imported without bootfinetune seeing it (no keeper)...
    user_code._kept.pop("lostmod", None)
    (tmp_path / "lost").rename(tmp_path / "gone")  # ...then moved
    try:
        problems = user_code.collect_sources()[2]
        assert len(problems) == 1 and "'lostmod'" in problems[0] and "cannot be read" in problems[0]
        assert check_user_code() == problems
    finally:
        sys.modules.pop("lostmod", None)
    assert module.VALUE == 1


def test_what_truly_cannot_travel_is_still_refused(user_package):
    class Holder:  # an object of the driver's (not a module-level one): by value, with its socket
        def __init__(self):
            self.conn = socket.socket()

    holder = Holder()
    try:
        problems = check_picklable({"rm": holder}, "dspy.configure settings")
    finally:
        holder.conn.close()
    assert len(problems) == 1 and problems[0].startswith("dspy.configure settings.rm.conn cannot be sent")
    assert check_picklable({"rm": user_package.CLIENT, "metric": user_package.score}, "settings") == []


def test_local_cluster_pointer_and_reachability(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert ray_env.local_cluster_pointer() is None  # no `ray start` here
    (tmp_path / "ray").mkdir()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
        assert ray_env.local_cluster_pointer() == (str(tmp_path / "ray" / "ray_current_cluster"), address)
        assert ray_env.is_reachable(address)
    assert not ray_env.is_reachable(address)  # closed: what a dead cluster's pointer leads to
    assert not ray_env.is_reachable("not-an-address")
