"""What one request cannot do to the in-process servers, probed over real sockets on 127.0.0.1.

A huge `max_tokens` is clamped to the ceiling (derived from the longest training answer) while
other requests keep being answered; a deadline gives a 504 and stops generation; a client that
goes away stops its generation; oversized or malformed bodies and unknown model names are
refused; 100 connections at once are all answered.
"""

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bootfinetune.run.runfiles import ModelManifest
from bootfinetune.serving.lm import FinetunedEngine
from bootfinetune.serving.limits import MAX_N, token_ceiling
from bootfinetune.serving.serve import ModelServer
from bootfinetune.testing.teacher_server import TeacherServer
from bootfinetune.testing.tiny_models import build_tiny_causal, toy_records

MESSAGES = toy_records(1, seed=5)[0]["messages"][:-1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_tiny_causal(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """The tiny model as a run's export whose longest training answer was 4 tokens (ceiling 68)."""
    export = tmp_path_factory.mktemp("run") / "Probe-1a2b" / "models" / "all"
    shutil.copytree(model, export)
    (export / ModelManifest.FILE).write_text(json.dumps(ModelManifest(key="all", answer_tokens_max=4).to_json()))
    return str(export)


def post(url, body, raw=None, timeout=60):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def raw_http(address, head: bytes, body: bytes = b"") -> bytes:
    """The whole response to bytes sent as they are (the server closes, or 10 s pass)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head + body)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b"connection: close" not in out.lower():
                    break  # kept alive: the status line is what we want
        except socket.timeout:
            pass
    return out


def test_the_ceiling_comes_from_the_longest_training_answer(trained, model):
    assert [token_ceiling(n, 512) for n in (4, 20, 300, 10_000, None)] == [68, 84, 600, 4096, 512]
    engine = FinetunedEngine(trained, device="cpu")
    assert engine.ceiling == 68 and engine.limit() == 68 and engine.limit(10**12) == 68 and engine.limit(5) == 5
    assert FinetunedEngine(trained, device="cpu", max_tokens_ceiling=300).limit(10**12) == 300  # the option wins
    assert FinetunedEngine(model, device="cpu", max_tokens=40).limit(10**12) == 40  # no record: max_tokens


def test_huge_max_tokens_is_clamped_while_other_requests_are_answered(trained):
    with ModelServer(trained, device="cpu", batch_size=4) as server:
        huge = ThreadPoolExecutor(1).submit(post, server.url, {"messages": MESSAGES, "max_tokens": 10**12})
        started = time.monotonic()
        while server.engine.steps == 0 and time.monotonic() - started < 30:
            time.sleep(0.01)
        waits = []
        for _ in range(3):  # short requests, sent while the long one generates
            t = time.monotonic()
            code, body = post(server.url, {"messages": MESSAGES, "max_tokens": 2}, timeout=30)
            waits.append(time.monotonic() - t)
            assert code == 200 and body["usage"]["completion_tokens"] <= 2
        code, body = huge.result(timeout=120)
        assert code == 200 and body["usage"]["completion_tokens"] == 68  # the ceiling, not 10**12
        assert body["choices"][0]["finish_reason"] == "length"
        assert max(waits) < 20, waits


def test_a_deadline_gives_504_and_stops_generating(model):
    with ModelServer(model, device="cpu", max_tokens_ceiling=1000, request_timeout=1.0) as server:
        t = time.monotonic()
        code, body = post(server.url, {"messages": MESSAGES, "max_tokens": 1000})
        assert code == 504 and "deadline" in body["error"]["message"]
        assert time.monotonic() - t < 5
        steps = server.engine.steps
        time.sleep(1.0)
        assert server.engine.steps == steps  # nothing generates for a request that got its 504
        code, _ = post(server.url, {"messages": MESSAGES, "max_tokens": 2})
        assert code == 200


def test_a_client_that_goes_away_stops_its_generation(model):
    with ModelServer(model, device="cpu", max_tokens_ceiling=1000) as server:
        body = json.dumps({"messages": MESSAGES, "max_tokens": 1000}).encode()
        sock = socket.create_connection(server.address, timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        started = time.monotonic()
        while server.engine.steps < 3 and time.monotonic() - started < 30:
            time.sleep(0.01)
        assert server.engine.steps >= 3  # generating
        sock.close()
        time.sleep(1.0)  # the server notices, the next decoding step stops the row
        steps = server.engine.steps
        time.sleep(1.5)
        assert server.engine.steps == steps, "generation went on after the client left"
        assert steps < 500


def test_bodies_model_names_and_n_are_checked(trained):
    with ModelServer(trained, device="cpu", max_body_bytes=64 << 10) as server:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * (8 << 20)}]}).encode()
        for _ in range(3):  # Content-Length over the limit: refused unread (httpx reads the answer the server
            # sends before the body is through, as the OpenAI client does; urllib stops at the closed socket)
            reply = httpx.post(f"{server.url}/chat/completions", content=big, timeout=30)
            assert reply.status_code == 413 and "bytes" in reply.json()["error"]["message"]
        chunked = raw_http(server.address, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n", (b"10000\r\n" + b"x" * 0x10000 + b"\r\n") * 3
                           + b"0\r\n\r\n")
        assert chunked.startswith(b"HTTP/1.1 413")  # no length given: refused once the limit is passed
        for length in (b"abc", b"-1"):
            reply = raw_http(server.address, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: " + length + b"\r\n\r\n", b"{}")
            assert reply.startswith(b"HTTP/1.1 400"), reply[:100]
        for name in ("../../etc/passwd", "/etc/passwd", "nope"):
            code, body = post(server.url, {"model": name, "messages": MESSAGES})
            assert code == 404 and name not in body["error"]["message"] and "Probe-1a2b/all" in body["error"]["message"]
        for name in ("Probe-1a2b/all", f"bootfinetune:{trained}", f"bootfinetune:{os.path.relpath(trained)}", None):
            assert post(server.url, {"model": name, "messages": MESSAGES, "max_tokens": 2})[0] == 200
        code, body = post(server.url, {"messages": MESSAGES, "n": MAX_N + 1})
        assert code == 400 and f"1 to {MAX_N}" in body["error"]["message"]
        with urllib.request.urlopen(f"{server.url}/models", timeout=10) as response:
            listed = response.read().decode()
        assert json.loads(listed)["data"][0]["id"] == "Probe-1a2b/all" and trained not in listed
        assert server.calls == 4 and len(server.requests) == 4  # refused requests were neither counted nor kept


def test_a_hundred_connections_at_once_are_all_answered():
    system = {"role": "system", "content": "Your output fields are:\n1. `answer` (str):\nAll interactions"}
    with TeacherServer(lambda inputs, outputs: {o: "ok" for o in outputs}, latency=0.2) as server:
        barrier = threading.Barrier(100)

        def ask(i):
            barrier.wait(30)
            return post(server.url, {"messages": [system, {"role": "user", "content": f"[[ ## q ## ]]\n{i}"}]})

        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(ask, range(100)))  # a reset would raise here
    assert [code for code, _ in results] == [200] * 100 and server.calls == 100
