"""An S3-compatible server on 127.0.0.1 for the cloud-storage tests (moto's server, a real HTTP API)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bootfinetune-test", "AWS_SECRET_ACCESS_KEY": "bootfinetune-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
"""Dummy credentials the server accepts; set in the environment (never in a URI or a file)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's server in a subprocess; `uri(bucket, prefix)` names a path on it for pyarrow and Ray."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # The moto installed beside the tests (`python -m moto.server`), never a `moto_server`
        # that happens to come first on PATH: a stray one (say a global moto 5.2.1) answers
        # CompleteMultipartUpload with the wrong XML root, and every pyarrow write then fails.
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto's server did not start on {self.endpoint}")
                time.sleep(0.2)

    def uri(self, bucket: str, prefix: str = "") -> str:
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def make_bucket(self, bucket: str) -> None:
        from bootfinetune.run.storage import filesystem

        fs, _ = filesystem(self.uri(bucket) + "&allow_bucket_creation=true")
        fs.create_dir(bucket)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
