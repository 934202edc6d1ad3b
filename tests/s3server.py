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


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 server that answers 503 while told to fail.

    `fail_next(n, method)` makes the next `n` requests (of one HTTP method, or any) fail (a bucket having a
    bad minute); `always_fail = True` fails every one. `uri(bucket, prefix)` names a path through the proxy.
    """

    def __init__(self, upstream: S3Server) -> None:
        import http.client
        import http.server
        import threading

        proxy = self
        self.upstream, self.failures_left, self.always_fail, self.failed, self.forwarded = upstream, 0, False, 0, 0
        self.failing_method: str | None = None
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline().strip():  # trailers, up to the blank line
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                if proxy._should_fail(self.command):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("expect", "connection", "transfer-encoding", "content-length")}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for name, value in reply.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _should_fail(self, method: str) -> bool:
        with self._lock:
            if self.always_fail or (self.failures_left > 0 and self.failing_method in (None, method)):
                self.failures_left -= 1
                self.failed += 1
                return True
            self.forwarded += 1
            return False

    def fail_next(self, n: int, method: str | None = None) -> None:
        with self._lock:
            self.failures_left, self.failing_method = n, method

    def uri(self, bucket: str, prefix: str = "") -> str:
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
