"""LoRA end to end: a per-predictor compile on 2 CPU workers (ZeRO-3) gives one adapter per predictor on one base."""

import json

import dspy
import pytest

from bootfinetune import BootstrapFinetune
from bootfinetune.config import InferenceConfig
from bootfinetune.run.jsonio import read_json
from bootfinetune.serving.lm import finetuned_engine, load_model
from bootfinetune.training.lora import adapter_base, is_adapter, merge_adapter
from bootfinetune.stages.rebind import rebind
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.faults import resident_kib
from bootfinetune.testing.tiny_models import build_tiny_causal
from tests.integration.test_compile import greedy_outputs
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script

pytestmark = pytest.mark.integration
KEYS = ("rewrite", "answer.predict")
INPUTS = [{"text": "item 901"}, {"text": "item 77"}, {"text": "bad item 3"}]


@pytest.fixture(scope="module")
def lora_compile(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    # Big enough (5.3M parameters, 21 MB) that a second copy shows in resident memory.
    base = build_tiny_causal(root / "base", hidden_size=256, num_layers=4, num_heads=4, vocab_size=4096)
    with TeacherServer(two_step_script) as server:
        teacher = dspy.LM("openai/scripted-teacher", api_base=server.url, api_key="sk-unused-lora", cache=False)
        tp = BootstrapFinetune(metric=two_step_metric, teacher_settings={"lm": teacher}, multitask=False,
                               storage_path=str(root / "runs"), max_tokens=16, num_workers=2, zero_stage=3, lora=True,
                               lora_r=8, lora_alpha=16)
        student = TwoStep()
        # 16 examples, 2 epochs: the train loss falls from the first epoch to the second (what the test
        # asserts) by a wide margin (about 0.6-1.0 at this lr), at a third of the training time of 24 x 4.
        compiled = tp.compile(student, trainset=two_step_examples(16), target=str(base), epochs=2, bsize=4,
                              lr=1e-2)
    return tp, student, compiled, base, root


def test_one_adapter_per_predictor_trained_on_two_workers(lora_compile):
    tp, _, compiled, base, _ = lora_compile
    for key in KEYS:
        model_dir = tp.run_dir.model_dir(key)
        assert is_adapter(model_dir) and adapter_base(model_dir) == str(base)
        assert not (model_dir / "model.safetensors").exists()  # no full copy of the base
        manifest = read_json(model_dir / "manifest.json")
        assert manifest["lora"]["export"] == "adapter" and manifest["lora"]["r"] == 8
        assert manifest["world_size"] == 2 and manifest["predictors"] == [key]
        assert manifest["losses"]["train"][-1] < manifest["losses"]["train"][0]
    assert compiled.rewrite.lm is not compiled.answer.predict.lm


def test_the_base_is_loaded_once_and_answers_match_the_merged_export(lora_compile, tmp_path):
    tp, student, compiled, base, _ = lora_compile
    got = greedy_outputs(compiled, INPUTS)
    shared = {id(load_model(finetuned_engine(p.lm).model, "cpu")[0]) for p in compiled.predictors()}
    assert len(shared) == 1  # both predictors' adapters live on one loaded base

    merged = {key: str(merge_adapter(tp.run_dir.model_dir(key), tmp_path / key)) for key in KEYS}
    plain = rebind(student, {k: k for k in KEYS}, merged, inference=InferenceConfig(max_tokens=16))
    assert not any(is_adapter(finetuned_engine(p.lm).model) for p in plain.predictors())
    assert greedy_outputs(plain, INPUTS) == got

    adapters = resident_kib([str(tp.run_dir.model_dir(k)) for k in KEYS])
    full = resident_kib(list(merged.values()))
    print(f"resident memory for 2 predictors: adapters on one base {adapters} KiB, two merged models {full} KiB")
    assert full > 20_000  # two 21 MB models (resident: what their loading touched)
    assert adapters < 0.75 * full


def test_served_over_http_through_dspy_lm_gives_the_in_process_answers(lora_compile):
    """`bootfinetune serve`'s app on Ray Serve: one model name per adapter, batched, same answers via dspy.LM."""
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    import bootfinetune
    from bootfinetune.training.distributed import free_port
    from bootfinetune.serving.ray_serve import serve_run

    tp, _, compiled, _, _ = lora_compile
    expected = greedy_outputs(compiled, INPUTS)
    url = serve_run(tp.run_dir.root, port=free_port(), num_cpus=0.5, max_batch_size=8, batch_wait_timeout_s=0.05)
    try:
        assert url.startswith("http://127.0.0.1:")

        def call(path, body=None):
            req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, listed = call("/models")
        assert status == 200 and sorted(m["id"] for m in listed["data"]) == sorted(KEYS)

        served = bootfinetune.load(tp.run_dir.root, TwoStep(), serve_url=url)
        assert {n: p.lm.model for n, p in served.named_predictors()} == {k: f"openai/{k}" for k in KEYS}
        assert all(type(p.lm) is dspy.LM for p in served.predictors())  # over HTTP, no model in this process
        assert greedy_outputs(served, INPUTS) == expected

        # Concurrent requests are answered in shared batches.
        lm = served.rewrite.lm
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: lm(messages=[{"role": "user", "content": f"hello {i}"}])[0],
                                    range(8)))
        assert len(answers) == 8 and all(isinstance(a, str) for a in answers)
        status, stats = call("/stats")
        assert status == 200 and stats["largest_batch"] >= 2, stats

        status, body = call("/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert status == 404 and "rewrite" in body["error"]["message"]
        status, body = call("/chat/completions", {"model": "rewrite", "messages": []})
        assert status == 400 and "messages" in body["error"]["message"]

        # The in-process server's limits hold here too: a huge max_tokens is clamped to the ceiling (from the
        # longest training answer) while a normal request is answered; n, body size and names are checked.
        ceiling = call("/stats")[1]["max_tokens_ceiling"]["rewrite"]
        assert 64 < ceiling < 4096
        hello = [{"role": "user", "content": "hello"}]
        with ThreadPoolExecutor(1) as pool:
            huge = pool.submit(call, "/chat/completions", {"model": "rewrite", "messages": hello, "max_tokens": 10**9})
            status, body = call("/chat/completions", {"model": "rewrite", "messages": hello, "max_tokens": 2})
            assert status == 200 and body["usage"]["completion_tokens"] <= 2
            status, body = huge.result(timeout=60)
        assert status == 200 and body["usage"]["completion_tokens"] <= ceiling
        assert call("/chat/completions", {"model": "rewrite", "messages": hello, "n": 9})[0] == 400
        status, body = call("/chat/completions", {"model": "../../etc/passwd", "messages": hello})
        assert status == 404 and "passwd" not in body["error"]["message"]
        import httpx

        big = json.dumps({"model": "rewrite", "messages": [{"role": "user", "content": "x" * (8 << 20)}]})
        assert httpx.post(url + "/chat/completions", content=big.encode(), timeout=60).status_code == 413
    finally:
        serve.shutdown()
