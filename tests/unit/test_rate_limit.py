"""The teacher's rate limit, in one process: a real HTTP teacher that enforces a limit, the real runner."""

import json

import dspy
import pytest

from bootfinetune.run.records import example_to_json
from bootfinetune.stages.ratelimit import BudgetClock, rate_limited
from bootfinetune.stages.runner import TeacherRunner
from bootfinetune.testing.faults import RateLimitedTeacherServer
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script


def expected_kept(n):
    return [not (i % 7 != 3 and i % 5 == 4) for i in range(n)]  # two_step_examples: every 5th answer is wrong


def run(runner, examples):
    batch = {"example_index": list(range(len(examples))), "example": [example_to_json(e) for e in examples]}
    return [json.loads(r) for r in runner(batch)["result"]]


def test_a_shared_budget_keeps_every_slot_to_the_providers_limit():
    rate = 30.0
    # A provider tolerates some jitter (a bucket of a third of a second); a loaded box wakes threads late.
    with RateLimitedTeacherServer(two_step_script, calls_per_second=rate, burst=rate / 3, latency=0.05) as server:
        lm = dspy.LM("openai/limited", api_base=server.url, api_key="unused", cache=False, num_retries=3)
        runner = TeacherRunner([TwoStep()], metric=two_step_metric, teacher_settings={"lm": lm}, num_threads=16,
                               budget=BudgetClock(calls_per_second=rate))
        results = run(runner, two_step_examples(40))  # 3 calls per example (2 on the skip branch)
        accepted, limited = list(server.accepted), list(server.limited)
    assert [r["kept"] for r in results] == expected_kept(40) and not any("failure" in r for r in results)
    assert sum(r["teacher_calls"] for r in results) == len(accepted) >= 100
    low, high = accepted[len(accepted) // 10], accepted[len(accepted) * 9 // 10]  # start and drain left out
    achieved = (len(accepted) * 8 // 10) / (high - low)
    assert 0.75 * rate <= achieved <= 1.05 * rate, achieved
    # Paced calls meet no 429 (a quiet box sees none at all); a starved one wakes threads, the server's
    # included, late and in bunches, so a few are allowed (bench/bootstrap.py --rate-limit measures them).
    assert len([t for t in limited if t > accepted[0] + 1.0]) <= max(3, len(accepted) // 20), (limited, accepted[0])
    usage = results[0]["usage"]["openai/limited"]
    assert usage["calls"] == 3 and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


def test_without_a_budget_429s_are_obeyed_and_calls_in_flight_adapt():
    # No retries in the LM: every 429 reaches the runner, which must run its example again after Retry-After
    # rather than record a failure, and halve the calls it keeps in flight.
    with RateLimitedTeacherServer(two_step_script, calls_per_second=40, latency=0.05) as server:
        lm = dspy.LM("openai/limited", api_base=server.url, api_key="unused", cache=False, num_retries=0)
        runner = TeacherRunner([TwoStep()], metric=two_step_metric, teacher_settings={"lm": lm}, num_threads=16)
        results = run(runner, two_step_examples(24))
        limited = len(server.limited)
    assert limited > 0 and runner.pacer.throttled > 0
    assert runner.pacer.lowest < 16
    assert [r["kept"] for r in results] == expected_kept(24) and not any("failure" in r for r in results)
    # A retried example counts every call it made, the rate-limited ones included.
    assert sum(r["teacher_calls"] for r in results) >= 24 * 3 - 8 + 1


def test_rate_limit_errors_are_told_apart_with_their_retry_after():
    from dspy.utils.exceptions import LMRateLimitError

    assert rate_limited(LMRateLimitError(message="slow down", retry_after=2.5)) == 2.5
    assert rate_limited(LMRateLimitError(message="slow down")) == 0.0
    assert rate_limited(ValueError("429 in a message is not a status")) is None


def test_the_clock_charges_what_an_example_used_beyond_its_estimate():
    clock = BudgetClock(calls_per_second=10, tokens_per_minute=600, headroom=1.0)  # a call, a token: 0.1 s
    assert clock.reserve(1, 0, now=0.0) == 0.0
    clock.settle(2, 5)  # the example made 3 calls and used 5 tokens
    assert round(clock.reserve(1, 0, now=0.0), 3) == 0.8
    clock.settle(-1, 0)  # a refund: it made no call
    assert round(clock.reserve(1, 0, now=5.0), 3) == 0.0


def test_a_remote_reservation_starts_at_its_booked_time_not_after_the_reply():
    """The reply's latency is not added to the wait when the budget's clock places the start; a clock that
    disagrees (another node) can move a call no earlier than the reservation was sent plus its delay, and
    never later than the reply plus its delay (the wait before this change)."""
    from bootfinetune.stages.ratelimit import wait_for_start

    sent, received = 100.0, 100.3
    assert wait_for_start(1.0, 101.0, sent, received) == pytest.approx(0.7)  # booked 1 s after sending
    assert wait_for_start(0.0, 100.0, sent, received) == 0.0  # already due
    for skew in (-50.0, -0.2, 0.0, 0.1, 0.2, 50.0):
        for delay in (0.0, 0.05, 1.0):
            booked_here = 100.1 + delay + skew  # the budget got it at 100.1 (this clock), its clock off by skew
            wait = wait_for_start(delay, booked_here, sent, received)
            assert max(0.0, sent + delay - received) - 1e-9 <= wait <= delay + 1e-9
            if skew == 0.0:
                assert received + wait == pytest.approx(max(received, 100.1 + delay))


# -- issue 30 (13): the teacher cannot stall the cluster ----------------------------------------------

HOUR_LONG_RETRY_AFTER = r"""
import json, sys, time
import dspy
from bootfinetune.run.records import example_to_json
from bootfinetune.stages.runner import TeacherRunner
from bootfinetune.testing.faults import FaultyTeacherServer, HTTPFault
from tests.programs import TwoStep, two_step_examples, two_step_metric, two_step_script

class HourLong(FaultyTeacherServer):  # each prompt's first request: 429 with Retry-After: 3600
    def answer(self, messages):
        key = json.dumps(messages, sort_keys=True)
        with self._lock:
            first = self.attempts.setdefault(key, 0) == 0
            self.attempts[key] += 1
        if first:
            raise HTTPFault(429, "come back in an hour", retry_after=3600)
        return super(FaultyTeacherServer, self).answer(messages)

with HourLong(two_step_script, faults=lambda inputs, attempt: None) as server:
    lm = dspy.LM("openai/slow-down", api_base=server.url, api_key="unused", cache=False, num_retries=int(sys.argv[1]))
    runner = TeacherRunner([TwoStep()], metric=two_step_metric, teacher_settings={"lm": lm}, num_threads=2,
                           max_retry_after_s=1.0)
    examples = two_step_examples(2)
    out = runner({"example_index": [0, 1], "example": [example_to_json(e) for e in examples]})
    print(json.dumps([json.loads(r).get("kept") for r in out["result"]]))
"""


@pytest.mark.parametrize("num_retries", [1, 0])  # DSPy's own retry waits, or the runner's pause after a 429
def test_a_retry_after_of_an_hour_is_capped(num_retries):
    """In a subprocess: an uncapped wait sleeps an hour in threads nothing can stop (killed at the timeout)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", HOUR_LONG_RETRY_AFTER, str(num_retries)], cwd=repo,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected_kept(2)


def test_a_teacher_lm_without_a_timeout_gets_the_default_one_in_the_actors():
    import ray.cloudpickle

    from bootfinetune.config import DEFAULT_TEACHER_TIMEOUT
    from bootfinetune.serving.lm import FinetunedLM
    from bootfinetune.stages.runner import pack_for_actors
    from bootfinetune.testing.tiny_models import build_tiny_causal

    plain = dspy.LM("openai/teacher", api_key="unused")
    timed = dspy.LM("openai/teacher", api_key="unused", timeout=5.0)
    program = TwoStep()
    program.rewrite.lm = timed
    local = FinetunedLM(str(build_tiny_causal(__import__("tempfile").mkdtemp() + "/tiny")))
    packed = pack_for_actors({"teachers": [program], "teacher_settings": {"lm": plain}, "settings": {"lm": local}})
    shipped = ray.cloudpickle.loads(packed["packed"])
    assert shipped["teacher_settings"]["lm"].kwargs["timeout"] == DEFAULT_TEACHER_TIMEOUT  # LiteLLM's 600 s otherwise
    assert shipped["teachers"][0].rewrite.lm.kwargs["timeout"] == 5.0  # the user's own timeout wins
    assert "timeout" not in shipped["settings"]["lm"].kwargs  # a custom engine owns its connection
    assert "timeout" not in plain.kwargs  # the user's LM is left as it is
