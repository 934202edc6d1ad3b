"""Every YAML in ray_jobs/ and cluster/ loads and validates; bad job configs fail with every problem named."""

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootfinetune.errors import ConfigError
from bootfinetune.entrypoints.jobconfig import JobConfig, check_environment, load_job_config, parse_job_config

REPO = Path(__file__).resolve().parents[2]
YAMLS = sorted(p for folder in ("ray_jobs", "cluster") for p in (REPO / folder).rglob("*.y*ml"))


def validate_launcher(config: dict) -> None:
    """Ray's own cluster schema (ray-schema.json), then Ray's filled-in checks."""
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))


CRDS = {kind: json.loads((REPO / "tests" / "kuberay" / f"ray.io_{kind.lower()}s.v1.json").read_text())
        for kind in ("RayJob", "RayCluster")}
"""KubeRay's published schemas (tests/kuberay/README.md names the release and the files)."""


def strict(schema: Any) -> Any:
    """A Kubernetes structural schema as JSON Schema with unknown fields refused, as `kubectl apply` refuses them
    (strict field validation): an object listing its properties takes no others unless it says it keeps them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def kuberay_docs() -> list[dict]:
    return [d for p in sorted((REPO / "cluster" / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]


def image_tags() -> set[str]:
    """The tags cluster/Dockerfile's header builds the image under."""
    return set(re.findall(r"-t (\S+) \.", (REPO / "cluster" / "Dockerfile").read_text()))


def validate_kuberay(doc: dict) -> None:
    import jsonschema

    if doc["kind"] in ("Secret", "ServiceAccount"):  # Kubernetes' own kinds: what the Ray resources refer to
        assert doc["apiVersion"] == "v1" and doc["metadata"]["name"]
        text = yaml.safe_dump(doc)
        assert "sk-" not in text and all(v == "${OPENAI_API_KEY}" for v in (doc.get("stringData") or {}).values())
        return
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayCluster")
    jsonschema.validate(doc, strict(CRDS[doc["kind"]]))
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert cluster["authOptions"]["mode"] == "token"  # Ray's token auth: job submission is code execution
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["ttlSecondsAfterFinished"] > 0
        assert doc["spec"]["entrypoint"].startswith("python /app/ray_jobs/compile.py --config /app/ray_jobs/configs/")
        config = doc["spec"]["entrypoint"].split("--config ")[1].split()[0]
        assert (REPO / config.removeprefix("/app/")).exists()  # the image holds the repository at /app
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]  # a CPU head
    groups = cluster["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["minReplicas"] <= g["maxReplicas"] for g in gpu)
    assert {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "bootfinetune-teacher",
                                                                     "key": "OPENAI_API_KEY"}}} in head["env"]


def test_kuberay_manifests_name_only_what_cluster_defines():
    docs = kuberay_docs()
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("Secret", "ServiceAccount", "ConfigMap")}
    referenced: set[tuple[str, str]] = set()
    images: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "serviceAccountName":
                    referenced.add(("ServiceAccount", value))
                elif key in ("secretKeyRef", "secretRef"):
                    referenced.add(("Secret", value["name"]))
                elif key in ("configMapKeyRef", "configMapRef", "configMap"):
                    referenced.add(("ConfigMap", value["name"]))
                elif key == "secret" and isinstance(value, dict):
                    referenced.add(("Secret", value["secretName"]))
                elif key == "image":
                    images.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk([d for d in docs if d["kind"] in ("RayJob", "RayCluster")])
    assert referenced == defined  # each defined, none unused (a ConfigMap nobody mounts included)
    assert images and images <= image_tags()  # the image cluster/Dockerfile builds


def test_the_image_installs_what_ci_installs():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN ")]
    installs = [line for line in runs if "install" in line]
    assert installs == ['RUN TORCH_INDEX="${TORCH_INDEX}" bash cluster/install.sh']
    assert "bash cluster/install.sh" in ci.splitlines() and "pip install" not in ci
    script = (REPO / "cluster" / "install.sh").read_text()
    assert 'pip install --quiet -e ".[test]"' in script and "torch==2.13.0" in script
    base = re.search(r"ARG BASE=rayproject/ray:(\S+)-py311-gpu", dockerfile).group(1)
    versions = {d["spec"].get("rayVersion") or d["spec"]["rayClusterSpec"]["rayVersion"]
                for d in kuberay_docs() if d["kind"] in ("RayJob", "RayCluster")}
    assert versions == {base}  # one Ray version in every recipe
    for launcher in ("aws.yaml", "gcp.yaml"):
        assert yaml.safe_load((REPO / "cluster" / launcher).read_text())["docker"]["image"] == \
            f"rayproject/ray:{base}-py311-gpu"
    ignored = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv/" in ignored and ".git/" in ignored


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_validates(path):
    doc = yaml.safe_load(path.read_text())
    rel = path.relative_to(REPO).as_posix()
    if rel.startswith("ray_jobs/"):
        job = load_job_config(path)
        assert isinstance(job, JobConfig) and job.program and job.trainset
        header = path.read_text().splitlines()[:8]
        assert any(f"--config {rel}" in line for line in header), "header comment gives the command"
        if job.teacher is not None and job.teacher.model:
            assert job.teacher.api_key_env  # a hosted teacher names its key's variable
    elif rel == "cluster/runtime_env.yaml":
        from ray.runtime_env import RuntimeEnv

        env = RuntimeEnv(**doc)
        assert ".venv/" in env["excludes"] and all(v.startswith("${") or "KEY" not in k for k, v in doc["env_vars"].items())
    elif rel.startswith("cluster/kuberay/"):
        validate_kuberay(doc)
    elif rel.startswith("cluster/"):
        validate_launcher(doc)
        kinds = doc["available_node_types"]
        assert "GPU" not in kinds[doc["head_node_type"]]["resources"]
        assert any(t.get("max_workers", 0) > t.get("min_workers", 0) for n, t in kinds.items() if n != doc["head_node_type"])
        head, workers = " ".join(doc["head_start_ray_commands"]), " ".join(doc["worker_start_ray_commands"])
        assert "BOOTFINETUNE_STORAGE=" in head
        # The dashboard (job submission: code execution) on loopback, reached through `ray dashboard`; token auth on
        # every node, the token from the machine that runs `ray up`.
        assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
        assert doc["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
        # The teacher's key from the user's environment (a file of theirs), loaded before the head's `ray start`.
        assert doc["file_mounts"]["~/.bootfinetune/teacher.env"] == "~/.bootfinetune/teacher.env"
        assert doc["head_start_ray_commands"][-1].startswith("set -a && . ~/.bootfinetune/teacher.env && set +a;")
        # This checkout, installed the way CI installs it.
        assert doc["file_mounts"]["~/bootfinetune"] == "." and ".venv" in doc["rsync_exclude"]
        assert doc["setup_commands"] == ["bash ~/bootfinetune/cluster/install.sh"]
        if doc["provider"]["type"] == "gcp":  # NVIDIA's driver, as Ray's GCP GPU example installs it
            for name, kind in kinds.items():
                if kind["resources"].get("GPU"):
                    assert {"key": "install-nvidia-driver", "value": "True"} in kind["node_config"]["metadata"]["items"]
                    assert "nvidia-smi" in " ".join(kind["initialization_commands"])
    else:  # pragma: no cover - a new folder needs a validator here
        pytest.fail(f"no validator for {rel}")


def test_the_config_folder_holds_cpu_and_gpu_runs():
    jobs = {p.name: load_job_config(p) for p in (REPO / "ray_jobs" / "configs").glob("*.yaml")}
    configs = {name: j.config for name, j in jobs.items()}
    assert any(not c.train.use_gpu for c in configs.values())
    assert any(c.train.use_gpu and "flan-t5-base" in c.train.target for c in configs.values())
    assert any(c.train.use_gpu and c.train.zero_stage == 3 and "1B" in c.train.target for c in configs.values())


def test_a_launcher_with_a_typo_fails_ray_schema():
    doc = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    doc["available_node_types"]["gpu_workers"]["max_worker"] = 3
    with pytest.raises(Exception, match="max_worker"):
        validate_launcher(doc)


def test_a_kuberay_manifest_with_a_typo_fails_the_crd_schema():
    import jsonschema

    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate_kuberay(doc)
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError, match="tokens"):
        validate_kuberay(doc)


def test_bad_job_config_names_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "program": "bootfinetune.demo.task:NoSuchProgram", "trainset": {"path": "t.jsonl"},
        "teacher": {"model": "openai/gpt-4o-mini", "api_key": "sk-live-123"}, "epoch": 3, "lr": -1,
        "api_key": "sk-live-456"}))
    with pytest.raises(ConfigError) as info:
        load_job_config(bad)
    text = "\n".join(info.value.problems)
    assert "NoSuchProgram" in text and "trainset.inputs" in text
    assert "teacher.api_key must not be written" in text and "api_key must not be written" in text
    assert "'epoch'" in text and "Did you mean 'epochs'" in text and "lr=-1" in text
    assert "sk-live" not in text  # the key itself is never echoed
    assert str(bad) in text


def test_overrides_and_missing_file(tmp_path):
    job = load_job_config(REPO / "ray_jobs" / "configs" / "demo_cpu.yaml",
                          ["epochs=3", "trainset={path: /tmp/t.jsonl, inputs: [message]}"])
    assert job.config.train.epochs == 3 and job.trainset == {"path": "/tmp/t.jsonl", "inputs": ["message"]}
    with pytest.raises(ConfigError, match="no such file"):
        load_job_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="--set 'epochs'"):
        load_job_config(REPO / "ray_jobs" / "configs" / "demo_cpu.yaml", ["epochs"])


def test_unset_api_key_variable_stops_the_job_before_it_starts(monkeypatch):
    job = parse_job_config({"program": "tests.programs:TwoStep", "trainset": "tests.programs:two_step_examples",
                            "teacher": {"model": "openai/gpt-4o-mini", "api_key_env": "BFT_TEST_KEY"},
                            "storage_path": "/tmp/x"})
    monkeypatch.delenv("BFT_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="BFT_TEST_KEY is not set"):
        check_environment(job)
    monkeypatch.setenv("BFT_TEST_KEY", "sk-value")
    check_environment(job)


def test_empty_storage_variable_counts_as_unset(monkeypatch):
    from bootfinetune.config import DEFAULT_STORAGE, RunOptions

    monkeypatch.setenv("BOOTFINETUNE_STORAGE", "")  # what a runtime_env "${BOOTFINETUNE_STORAGE}" gives where unset
    assert RunOptions().storage_path == DEFAULT_STORAGE
    assert os.environ["BOOTFINETUNE_STORAGE"] == ""


def test_teacher_timeout_from_the_job_yaml_bounds_each_call(tmp_path, monkeypatch):
    import socket
    import time

    from bootfinetune.entrypoints.jobs import Teacher
    from bootfinetune.entrypoints.teachers import DEFAULT_TEACHER_TIMEOUT

    # A teacher endpoint that accepts connections and never answers (a hung server).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    monkeypatch.setenv("BFT_TIMEOUT_TEST_KEY", "sk-timeout-test")
    config = tmp_path / "job.yaml"
    config.write_text(f"program: tests.programs:TwoStep\ntrainset: tests.programs:two_step_examples\n"
                      f"teacher: {{model: openai/hung, api_base: '{url}', api_key_env: BFT_TIMEOUT_TEST_KEY, "
                      f"timeout: 1.5, num_retries: 0}}\n")
    job = load_job_config(config)
    assert job.teacher.timeout == 1.5
    teacher = Teacher(job.teacher)
    assert teacher.lm.kwargs["timeout"] == 1.5
    started = time.time()
    try:
        with pytest.raises(Exception) as err:
            teacher.lm("hello")
    finally:
        silent.close()
    assert time.time() - started < 10, "the call outlived its timeout"
    assert "timeout" in f"{type(err.value).__name__} {err.value}".lower()
    # The timeout bounds how long a call waits, not what it answers: changing it keeps the trace identity.
    from bootfinetune.entrypoints.jobconfig import TeacherSpec
    from bootfinetune.stages.checks import lm_identity

    default = Teacher(TeacherSpec(model="openai/hung", api_base=url, api_key_env="BFT_TIMEOUT_TEST_KEY", num_retries=0))
    assert default.lm.kwargs["timeout"] == DEFAULT_TEACHER_TIMEOUT
    assert lm_identity(default.lm) == lm_identity(teacher.lm)
    # Without the key the default applies; a bad value is named.
    assert parse_job_config({"teacher": {"model": "openai/x"}}, need=()).teacher.timeout == DEFAULT_TEACHER_TIMEOUT
    with pytest.raises(ConfigError) as bad:
        parse_job_config({"teacher": {"model": "openai/x", "timeout": 0}}, need=())
    assert "teacher.timeout=0" in str(bad.value)
