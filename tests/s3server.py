"""An S3-compatible server on 127.0.0.1 for the cloud-storage tests (moto's server, a real HTTP API)."""

from __future__ import annotations

import os
import shutil
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
    """`moto_server` in a subprocess; `uri(bucket, prefix)` names a path on it for pyarrow and Ray."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}")
                time.sleep(0.2)

    def uri(self, bucket: str, prefix: str = "") -> str:
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def make_bucket(self, bucket: str) -> None:
        from bootfinetune.storage import filesystem

        fs, _ = filesystem(self.uri(bucket) + "&allow_bucket_creation=true")
        fs.create_dir(bucket)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
