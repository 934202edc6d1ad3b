"""Which modules count as the user's own, and that they travel by value (no Ray cluster here)."""

import importlib
import json
import socket
import subprocess
import sys
import textwrap

import pytest

from bootfinetune.runtime import ray_env

from bootfinetune.runtime import user_code


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package of the user's (`myshop`, with a submodule), importable only through a sys.path entry."""
    pkg = tmp_path / "src" / "myshop"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rules.py").write_text(textwrap.dedent('''
        TABLE = {"red": 1, "blue": 2}


        def score(color):
            return TABLE[color] * 10


        class Judge:
            def __call__(self, color):
                return score(color) + 1
        '''))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    module = importlib.import_module("myshop.rules")
    yield module
    for name in ("myshop.rules", "myshop"):
        sys.modules.pop(name, None)


def test_installed_and_own_modules_are_not_the_users(user_package):
    import dspy
    import ray

    assert not user_code.is_user_module(json)  # the standard library
    assert not user_code.is_user_module(dspy) and not user_code.is_user_module(ray)  # installed
    assert not user_code.is_user_module(sys.modules["bootfinetune"])
    assert user_code.is_user_module(sys.modules["myshop"])
    names = [m.__name__ for m in user_code.user_modules()]
    assert "myshop" in names and "myshop.rules" not in names  # the package is registered whole


def test_registered_code_unpickles_where_the_module_cannot_be_imported(user_package, tmp_path):
    import ray.cloudpickle

    assert "myshop" in user_code.ship_user_modules()
    assert "myshop" not in user_code.ship_user_modules()  # registered once
    blob = ray.cloudpickle.dumps((user_package.Judge(), user_package.score))
    (tmp_path / "blob").write_bytes(blob)
    # A fresh process, in another directory, with no path to myshop: what a worker without the files sees.
    code = ("import ray.cloudpickle as cp, sys; judge, score = cp.loads(open(sys.argv[1], 'rb').read()); "
            "print(judge('blue'), score('red'))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "blob")], cwd="/", capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["21", "10"]


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
