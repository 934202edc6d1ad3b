"""Secrets in every form: the LM allow-list, URL and storage-URI redaction, failure-message redaction."""

import json

import dspy

from bootfinetune.common.redaction import (LM_PUBLIC_ARGS, collect_secrets, public_lm_args, redact, redact_uri,
                                           redact_url, redact_urls_in)
from bootfinetune.stages.checks import lm_identity
from bootfinetune.stages.traces import stable_identity

HEADER = "Bearer sk-hdr-0123456789"
SECRETS = ["sk-hdr-0123456789", "pw-in-url-42", "q-key-abcdef", "aws-secret-xyz123", "tok-abcdef123", "sk-plain-987"]


def teacher_lm(**overrides):
    args = dict(temperature=0.7, max_tokens=64, top_p=0.9, stop=["\n\n"], n=1,
                api_base="http://alice:pw-in-url-42@127.0.0.1:9/v1?key=q-key-abcdef",
                extra_headers={"Authorization": HEADER}, aws_secret_access_key="aws-secret-xyz123",
                token="tok-abcdef123", api_key="sk-plain-987", some_new_provider_arg="sk-plain-987")
    return dspy.LM("openai/teacher", **{**args, **overrides})


def test_lm_identity_is_an_allow_list():
    ident = lm_identity(teacher_lm())
    text = json.dumps(ident)
    for secret in SECRETS + ["alice"]:
        assert secret not in text, secret
    kwargs = ident["kwargs"]
    assert ident["model"] == "openai/teacher"
    assert {k: kwargs[k] for k in ("temperature", "max_tokens", "top_p", "stop", "n")} == \
        {"temperature": 0.7, "max_tokens": 64, "top_p": 0.9, "stop": ["\n\n"], "n": 1}
    assert kwargs["api_base"] == "http://***@127.0.0.1:9/v1?key=***"
    assert kwargs["extra_headers"] == {"Authorization": "***"}  # the header's name stays, its value goes
    assert kwargs["some_new_provider_arg"] == "***"  # an argument we do not know is not shown
    assert "some_new_provider_arg" not in LM_PUBLIC_ARGS


def test_identity_stable_for_the_same_teacher_and_blind_to_secret_values():
    assert lm_identity(teacher_lm()) == lm_identity(teacher_lm())
    assert stable_identity(teacher_lm()) == stable_identity(teacher_lm())
    rotated = teacher_lm(extra_headers={"Authorization": "Bearer other-key-55555"}, api_key="other-key-66666",
                         api_base="http://bob:other@127.0.0.1:9/v1?key=other")
    assert lm_identity(rotated) == lm_identity(teacher_lm())  # rotating a key does not re-run the teacher
    assert lm_identity(teacher_lm(temperature=0.1)) != lm_identity(teacher_lm())
    assert lm_identity(teacher_lm(api_base="http://127.0.0.1:10/v1")) != lm_identity(teacher_lm())


def test_url_redaction():
    assert redact_url("https://u:p@h:8/v1?key=sk&region=eu#frag") == "https://***@h:8/v1?key=***&region=eu#***"
    # a storage URI without credentials prints as it is, so it can be passed back (`--run-dir`)
    local_s3 = "s3://b/runs/R-1?endpoint_override=127.0.0.1:9&scheme=http"
    assert redact_uri(local_s3) == local_s3
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact_url("relative/runs") == "relative/runs" and redact_url("/tmp/a?b") == "/tmp/a?b"
    assert redact_uri("s3://b/runs?access_key=AKIA123&secret_key=xyz") == "s3://b/runs?access_key=***&secret_key=***"
    assert redact_uri("gs://bucket/runs") == "gs://bucket/runs"
    assert redact_urls_in("ConnectionError: http://u:pw@h/v1?k=zz refused") == \
        "ConnectionError: http://***@h/v1?k=*** refused"


def test_public_lm_args_masks_nested_values():
    shown = public_lm_args({"extra_headers": {"X-Api-Key": "abc", "X-Org": {"id": "o"}}, "model_type": "chat"})
    assert shown == {"extra_headers": {"X-Api-Key": "***", "X-Org": {"id": "***"}}, "model_type": "chat"}


def test_failure_messages_lose_every_secret_form():
    secrets = collect_secrets(teacher_lm())
    message = (f"401 from http://alice:pw-in-url-42@127.0.0.1:9/v1?key=q-key-abcdef: header '{HEADER}' rejected; "
               f"aws-secret-xyz123 tok-abcdef123 sk-plain-987 sk-hdr-0123456789")
    redacted = redact(message, secrets)
    for secret in SECRETS:
        assert secret not in redacted, (secret, redacted)
    assert "401 from http://***@127.0.0.1:9/v1" in redacted
    assert "0.7" not in secrets and "openai/teacher" not in secrets  # public values are not treated as secrets


def test_program_json_lm_state_keeps_its_shape_without_credentials():
    from bootfinetune.common.redaction import public_lm_state

    state = public_lm_state(teacher_lm().dump_state())
    assert state["_dspy_lm_class"] == "dspy.clients.lm.LM" and state["temperature"] == 0.7
    assert not [s for s in SECRETS + ["alice"] if s in json.dumps(state)]


def test_job_result_line_shows_no_uri_credentials(capsys):
    from bootfinetune.entrypoints.jobs import _result

    _result("compile", run_dir="s3://AKIA-x:secret-y-123@bucket/runs/R-1?endpoint_override=h:9&scheme=http")
    line = capsys.readouterr().out
    assert line.startswith("BOOTFINETUNE_RESULT ") and "AKIA-x" not in line and "secret-y-123" not in line
    assert json.loads(line.split(" ", 1)[1])["run_dir"] == "s3://***@bucket/runs/R-1?endpoint_override=h:9&scheme=http"


# -- issue 30: credentials in every spelling ----------------------------------------------------------

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_url_credentials_with_unencoded_separators_are_masked_whole():
    # a '/', '?' or '#' in the password hid the '@' from urlsplit: the URL came back unchanged
    uri = f"s3://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@bucket/runs?endpoint_override=h:9&scheme=http"
    assert redact_uri(uri) == "s3://***@bucket/runs?endpoint_override=h:9&scheme=http"
    assert redact_url("https://user:p#ss@host/v1") == "https://***@host/v1"
    assert redact_url("https://user:p?ss@host:8/v1?key=k1") == "https://***@host:8/v1?key=***"
    assert redact_url("https://us@er:p@ss@host/v1") == "https://***@host/v1"  # the last '@' ends it
    text = f"cannot write there: s3://AKIA:{AWS_SECRET}@bucket/runs refused"
    assert AWS_SECRET not in redact_urls_in(text) and "bucket/runs refused" in redact_urls_in(text)
    found = collect_secrets(dspy.LM("openai/x", api_base=f"https://alice:{AWS_SECRET}@host/v1"))
    assert AWS_SECRET in found and "alice" not in redact(f"alice:{AWS_SECRET} failed", found)
    assert "p#ss-word" in collect_secrets(dspy.LM("openai/x", api_base="https://user:p#ss-word@host/v1"))
    assert redact_url("https://user:123?abc-pw@host/v1") == "https://***@host/v1"  # not host "user", port 123


def test_a_public_query_option_loses_its_user_info():
    uri = "s3://b/runs?endpoint_override=http://minio:s3cr3t-pw@h:9000&scheme=http"
    assert redact_uri(uri) == "s3://b/runs?endpoint_override=http://***@h:9000&scheme=http"
    assert redact_uri("s3://b/runs?endpoint_override=minio:s3cr3t-pw@h:9000") == "s3://b/runs?endpoint_override=***@h:9000"


def test_lm_state_parts_are_allow_listed_too():
    from bootfinetune.common.redaction import public_lm_state

    lm = dspy.LM("openai/x", launch_kwargs={"port": 8000, "hf_token": "hf-secret-launch-1"},
                 train_kwargs={"epochs": 2, "hf_token": "hf-secret-train-2", "wandb_api_key": "wb-secret-3"})
    state = public_lm_state({**lm.dump_state(), "_private_token": "priv-secret-4"})
    text = json.dumps(state)
    assert not [s for s in ("hf-secret-launch-1", "hf-secret-train-2", "wb-secret-3", "priv-secret-4") if s in text]
    assert state["launch_kwargs"] == {"port": 8000, "hf_token": "***"}
    assert state["train_kwargs"] == {"epochs": 2, "hf_token": "***", "wandb_api_key": "***"}
    assert state["_dspy_lm_class"] == "dspy.clients.lm.LM" and state["_private_token"] == "***"


def test_a_command_line_shows_only_what_the_allow_list_lets_through(monkeypatch):
    from bootfinetune.common.redaction import public_command

    monkeypatch.setenv("MY_SERVICE_TOKEN", "envtok-0123456789")
    argv = ["/usr/bin/python3", "train.py", "--api-key", "sk-live-0123456789", "--lr=1e-4", "--epochs", "3",
            "-H", "Authorization: Bearer bearer-0123456789", "--storage", f"s3://AKIA:{AWS_SECRET}@b/runs",
            "--password=pw-0123456789", "envtok-0123456789", "--token", "t0k-0123456789", "data/train.jsonl"]
    shown = public_command(argv)
    for secret in ("sk-live-0123456789", "bearer-0123456789", AWS_SECRET, "pw-0123456789", "envtok-0123456789",
                   "t0k-0123456789", "Authorization"):
        assert secret not in shown, (secret, shown)
    assert shown.startswith("python3 train.py --api-key *** --lr=1e-4 --epochs 3 -H *** --storage s3://***@b/runs")
    assert shown.endswith("data/train.jsonl")
