"""A compile on a two-node local cluster (`ray.cluster_utils.Cluster`): bootstrap actors and Ray Train
workers land on both nodes and the run completes.

Each node has 2 CPUs and each actor / worker asks for 1.5, so two of them cannot share a node:
the placement itself forces both nodes into use, and the run records where each piece ran
(bootstrap summary `nodes`, the model manifest's `nodes` per rank). It runs in its own process,
as a second cluster cannot join the test session's.

The second test gives only the second node a custom resource standing in for a GPU, and the compile asks for it
(`resources_per_worker`): training, the export and the metric before and after all run there, none in the driver.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import dspy, ray
from ray.cluster_utils import Cluster
from bootfinetune import BootstrapFinetune
from bootfinetune.runtime.ray_env import ensure_ray
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script

out = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ensure_ray(cluster.address, log_to_driver=False, env_vars={"OMP_NUM_THREADS": "1"})
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
target = str(build_tiny_causal(out + "/tiny"))
with TeacherServer(two_step_script) as server:
    teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="x", cache=False)
    tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher}, storage_path=out + "/runs",
                           num_actors=2, actor_cpus=1.5, num_threads=2, batch_size=4,
                           num_workers=2, cpus_per_worker=1.5, zero_stage=2, max_tokens=16)
    compiled = tp.compile(TwoStep(), trainset=two_step_examples(16), target=target, epochs=1, bsize=4, lr=3e-3)
manifest = json.load(open(tp.run_dir.model_dir("all") / "manifest.json"))
print("RESULT " + json.dumps({"cluster_nodes": nodes, "bootstrap_nodes": tp.report["stages"]["bootstrap"]["nodes"],
                              "train_nodes": manifest["nodes"], "world_size": manifest["world_size"],
                              "kept": tp.report["stages"]["bootstrap"]["kept"]}))
ray.shutdown()
cluster.shutdown()
"""


def test_bootstrap_actors_and_training_workers_use_both_nodes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert len(result["cluster_nodes"]) == 2
    assert sorted(result["bootstrap_nodes"]) == result["cluster_nodes"]  # examples ran on both nodes
    assert sum(result["bootstrap_nodes"].values()) == 16
    assert result["world_size"] == 2 and sorted(result["train_nodes"]) == result["cluster_nodes"]  # a rank on each
    assert result["kept"] > 0


ACCELERATOR = r"""
import json, logging, sys
import dspy, ray
from ray.cluster_utils import Cluster
from dspy.utils.exceptions import AdapterParseError
from bootfinetune import BootstrapFinetune
from bootfinetune.runtime.ray_env import ensure_ray
from bootfinetune.serving.lm import loaded_models
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script

logging.basicConfig(level=logging.WARNING)
out = sys.argv[1]
# The head (where this driver runs) has CPUs only; the second node also carries "accel", standing in for a GPU.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=2, resources={"accel": 2})
cluster.wait_for_nodes()
ensure_ray(cluster.address, log_to_driver=False, env_vars={"OMP_NUM_THREADS": "1"})
accel_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("accel"))
head_node = ray.get_runtime_context().get_node_id()
target = str(build_tiny_causal(out + "/tiny", hidden_size=32, num_layers=1))
examples = two_step_examples(10)
with TeacherServer(two_step_script) as server:
    teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="x", cache=False)
    tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher}, storage_path=out + "/runs",
                           num_actors=1, actor_cpus=0.5, num_threads=4, num_workers=1, cpus_per_worker=1,
                           resources_per_worker={"accel": 1}, device="cuda", max_tokens=8)
    compiled = tp.compile(TwoStep(), trainset=examples[:6], valset=examples[6:], target=target, epochs=1,
                          bsize=4, lr=3e-3)
    loads_in_driver = loaded_models()  # the compile loaded no model here
    try:  # the program handed back: its model loads on this head's CPU
        answer = compiled(text=examples[0].text).answer
    except AdapterParseError as e:  # a 1-epoch tiny model may not write the format: its text still came back
        answer = e.lm_response
manifest = json.load(open(tp.run_dir.model_dir("all") / "manifest.json"))
print("RESULT " + json.dumps({
    "accel_node": accel_node, "head_node": head_node, "train_nodes": manifest["nodes"],
    "export_node": manifest["export_node"], "evaluate_nodes": tp.report["stages"]["evaluate"]["nodes"],
    "metric": tp.report["metric"], "loads_in_driver": loads_in_driver, "loads_after_answer": loaded_models(),
    "answer": answer}))
ray.shutdown()
cluster.shutdown()
"""


def test_every_model_load_runs_where_the_accelerator_is_not_in_the_driver(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", ACCELERATOR, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    print(json.dumps(result, indent=1))  # the Show section: which node loaded each model
    accel = result["accel_node"]
    assert accel != result["head_node"]
    assert result["train_nodes"] == [accel] and result["export_node"] == accel  # training and the HF export
    assert result["evaluate_nodes"] == {"before": {accel: 4}, "after": {accel: 4}}  # 4 valset examples, twice
    assert result["metric"]["before"] is not None and result["metric"]["after"] is not None
    assert result["loads_in_driver"] == []
    # Handed back to a driver without CUDA, the program's model loads on its CPU ("device" was the workers'), said so.
    assert [device for _, device in result["loads_after_answer"]] == ["cpu"]
    assert "is not on this machine" in proc.stderr and "bootfinetune serve RUN_DIR" in proc.stderr
