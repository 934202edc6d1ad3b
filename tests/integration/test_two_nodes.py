"""A compile on a two-node local cluster (`ray.cluster_utils.Cluster`): bootstrap actors and Ray Train
workers land on both nodes and the run completes.

Each node has 2 CPUs and each actor / worker asks for 1.5, so two of them cannot share a node:
the placement itself forces both nodes into use, and the run records where each piece ran
(bootstrap summary `nodes`, the model manifest's `nodes` per rank). It runs in its own process,
as a second cluster cannot join the test session's.

Only the second node carries a custom resource standing in for a GPU; the second compile asks for it
(`resources_per_worker`): training, the export and the metric before and after all run there, none in the driver.
Both compiles share one cluster and one driver (the module's fixture); each test reads its own.
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
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
accel_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("accel"))
head_node = ray.get_runtime_context().get_node_id()
results = {"cluster_nodes": nodes, "accel_node": accel_node, "head_node": head_node}
with TeacherServer(two_step_script) as server:
    teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="x", cache=False)

    # 1. Both nodes: each actor / worker asks for 1.5 of a node's 2 CPUs, so two of them cannot share a node.
    target = str(build_tiny_causal(out + "/tiny"))
    tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher}, storage_path=out + "/runs",
                           num_actors=2, actor_cpus=1.5, num_threads=2, batch_size=4,
                           num_workers=2, cpus_per_worker=1.5, zero_stage=2, max_tokens=16)
    tp.compile(TwoStep(), trainset=two_step_examples(16), target=target, epochs=1, bsize=4, lr=3e-3)
    manifest = json.load(open(tp.run_dir.model_dir("all") / "manifest.json"))
    results["both"] = {"bootstrap_nodes": tp.report["stages"]["bootstrap"]["nodes"], "train_nodes": manifest["nodes"],
                       "world_size": manifest["world_size"], "kept": tp.report["stages"]["bootstrap"]["kept"]}

    # 2. Only the accelerator node: the compile asks for "accel" (resources_per_worker), "device" names the workers'.
    small = str(build_tiny_causal(out + "/small", hidden_size=32, num_layers=1))
    examples = two_step_examples(10)
    tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher}, storage_path=out + "/accel-runs",
                           num_actors=1, actor_cpus=0.5, num_threads=4, num_workers=1, cpus_per_worker=1,
                           resources_per_worker={"accel": 1}, device="cuda", max_tokens=8)
    compiled = tp.compile(TwoStep(), trainset=examples[:6], valset=examples[6:], target=small, epochs=1,
                          bsize=4, lr=3e-3)
    loads_in_driver = loaded_models()  # the compile loaded no model here
    try:  # the program handed back: its model loads on this head's CPU
        answer = compiled(text=examples[0].text).answer
    except AdapterParseError as e:  # a 1-epoch tiny model may not write the format: its text still came back
        answer = e.lm_response
manifest = json.load(open(tp.run_dir.model_dir("all") / "manifest.json"))
results["accel"] = {
    "train_nodes": manifest["nodes"], "export_node": manifest["export_node"],
    "evaluate_nodes": tp.report["stages"]["evaluate"]["nodes"], "metric": tp.report["metric"],
    "loads_in_driver": loads_in_driver, "loads_after_answer": loaded_models(), "answer": answer}
print("RESULT " + json.dumps(results))
ray.shutdown()
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """Both compiles of the module on one two-node cluster, in a driver process of their own."""
    out = tmp_path_factory.mktemp("two-nodes")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]), proc.stderr


def test_bootstrap_actors_and_training_workers_use_both_nodes(two_node_run):
    result, _ = two_node_run
    both = result["both"]
    assert len(result["cluster_nodes"]) == 2
    assert sorted(both["bootstrap_nodes"]) == result["cluster_nodes"]  # examples ran on both nodes
    assert sum(both["bootstrap_nodes"].values()) == 16
    assert both["world_size"] == 2 and sorted(both["train_nodes"]) == result["cluster_nodes"]  # a rank on each
    assert both["kept"] > 0


def test_every_model_load_runs_where_the_accelerator_is_not_in_the_driver(two_node_run):
    result, stderr = two_node_run
    print(json.dumps(result, indent=1))  # the Show section: which node loaded each model
    accel, run = result["accel_node"], result["accel"]
    assert accel != result["head_node"]
    assert run["train_nodes"] == [accel] and run["export_node"] == accel  # training and the HF export
    assert run["evaluate_nodes"] == {"before": {accel: 4}, "after": {accel: 4}}  # 4 valset examples, twice
    assert run["metric"]["before"] is not None and run["metric"]["after"] is not None
    assert run["loads_in_driver"] == []
    # Handed back to a driver without CUDA, the program's model loads on its CPU ("device" was the workers'), said so.
    assert [device for _, device in run["loads_after_answer"]] == ["cpu"]
    assert "is not on this machine" in stderr and "bootfinetune serve RUN_DIR" in stderr
