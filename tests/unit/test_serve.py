"""The OpenAI-compatible servers over real HTTP on 127.0.0.1: a tiny model's and the scripted teacher's."""

import json
import threading
import urllib.error
import urllib.request

import dspy
import pytest

from bootfinetune.serving.lm import FinetunedEngine
from bootfinetune.serving.serve import ModelServer, serve_model, served_model, stop_model
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal, build_tiny_t5, toy_records


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"causal": str(build_tiny_causal(root / "tiny-llama")), "t5": str(build_tiny_t5(root / "tiny-t5"))}


def post(url, body, raw=None):
    """(status, JSON body) of a POST to {url}/chat/completions."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def prompts(n):
    return [r["messages"][:-1] for r in toy_records(n, seed=5)]


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_concurrent_requests_all_answered_and_greedy_matches_the_lm(models, kind):
    conversations = prompts(6)
    reference = FinetunedEngine(models[kind], max_tokens=10)
    expected = [reference.generate([c])[0] for c in conversations]  # one at a time: no batch padding
    with ModelServer(models[kind], max_tokens=10, batch_size=4) as server:
        sequential = [post(server.url, {"messages": c}) for c in conversations]
        assert all(code == 200 for code, _ in sequential)
        assert [body["choices"][0]["message"]["content"] for _, body in sequential] == expected

        results = [None] * 12
        def ask(i):
            results[i] = post(server.url, {"messages": conversations[i % 6], "max_tokens": 4 + i % 3})
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [code for code, _ in results] == [200] * 12
        for i, (_, body) in enumerate(results):
            usage, choice = body["usage"], body["choices"][0]
            assert 0 < usage["completion_tokens"] <= 4 + i % 3  # each request's own max_tokens, batched or not
            assert usage["prompt_tokens"] > 20
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
        assert server.calls == 18 and get(f"{server.url}/stats")["calls"] == 18


def test_n_temperature_and_dspy_lm_through_the_server(models):
    with ModelServer(models["causal"], max_tokens=6) as server:
        code, body = post(server.url, {"messages": prompts(1)[0], "n": 3, "temperature": 1.0, "max_tokens": 5})
        assert code == 200 and len(body["choices"]) == 3
        assert body["usage"]["completion_tokens"] <= 3 * 5 and body["usage"]["prompt_tokens"] > 20
        lm = dspy.LM(f"openai/bootfinetune:{models['causal']}", api_base=server.url, api_key="local", cache=False,
                     num_retries=0)
        assert len(lm("Repeat the word apple.")) == 1
        assert lm.history[-1]["usage"]["prompt_tokens"] > 0
        assert [m["id"] for m in get(f"{server.url}/models")["data"]] == ["tiny-llama"]  # an id, not a path
        assert get(server.url.removesuffix("/v1") + "/health") == {"status": "ok"}


def test_bad_requests_get_400_with_the_field_named(models):
    with ModelServer(models["causal"], max_tokens=4) as server:
        code, body = post(server.url, None, raw=b"{not json")
        assert code == 400 and "not valid JSON" in body["error"]["message"]
        cases = [({}, "messages: must be a non-empty list"),
                 ({"messages": []}, "messages: must be a non-empty list"),
                 ({"messages": [{"content": "hi"}]}, "messages[0]: must be an object with a string \"role\""),
                 ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n=0"),
                 ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens=-3"),
                 ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature='hot'"),
                 ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream=true")]
        for request, message in cases:
            code, body = post(server.url, request)
            assert code == 400 and message in body["error"]["message"], (request, body)
        assert server.calls == 0  # refused requests are not counted
        code, body = post(server.url, {"messages": [{"role": "user", "content": "hi"}]})
        assert code == 200  # the connection and the server are still fine


def test_teacher_server_keeps_its_behaviour():
    def script(inputs, outputs):
        if "boom" in inputs["question"]:
            raise RuntimeError("script exploded")
        return {name: inputs["question"].upper() for name in outputs}

    system = {"role": "system", "content": "Your output fields are:\n1. `answer` (str):\nAll interactions"}
    def ask(question):
        return {"messages": [system, {"role": "user", "content": f"[[ ## question ## ]]\n{question}"}]}

    with TeacherServer(script, model_name="t") as server:
        code, body = post(server.url, ask("hi"))
        assert code == 200
        assert body["choices"][0]["message"]["content"] == "[[ ## answer ## ]]\nHI\n\n[[ ## completed ## ]]\n"
        code, body = post(server.url, ask("boom"))
        assert code == 500 and "RuntimeError: script exploded" in body["error"]["message"]
        code, _ = post(server.url, {"messages": "nope"})
        assert code == 400
        assert server.calls == 2 and server.requests[-1][1]["content"].endswith("boom")
        assert get(f"{server.url}/stats") == {"calls": 2} and get(f"{server.url}/models")["data"][0]["id"] == "t"


def test_serve_model_starts_one_server_per_directory(models):
    try:
        first = serve_model(models["causal"], max_tokens=4)
        assert serve_model(models["causal"] + "/", max_tokens=99) is first  # same directory, same server
        assert served_model(models["causal"]) is first
        assert stop_model(models["causal"]) and served_model(models["causal"]) is None
        assert not stop_model(models["causal"])
        assert serve_model(models["causal"]) is not first
    finally:
        stop_model(models["causal"])


def test_servers_bind_loopback_unless_told(tmp_path):
    from bootfinetune.serving.serve import ChatServer
    from bootfinetune.testing.teacher_server import TeacherServer

    for server in (TeacherServer(lambda i, o: {}), ChatServer()):
        try:
            assert server.address[0] == "127.0.0.1" and "//127.0.0.1:" in server.url
        finally:
            server.stop()
