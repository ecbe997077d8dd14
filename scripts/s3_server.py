"""A local S3-compatible server for the tests and benchmarks: moto's standalone server in its own
process on 127.0.0.1 (DALI's S3 client stalls against a server thread in the caller's process),
with its request log kept, so that a caller can count the GETs of each object.

    from s3_server import MotoServer          # scripts/ on sys.path (tests load it by path)
    server = MotoServer(Path("requests.log"))
    os.environ.update(server.env())            # AWS_ENDPOINT_URL and dummy credentials
    mark = server.mark(); ...; server.gets(mark, bucket="bench", prefix="shards/")

moto is a test server written in Python, not a storage system: it shows how many requests a
reader makes and what each costs here, not what a real store would give.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto_server on a free port; `auth`: IAM checks on after the first 3 requests (which the
    caller spends making a user and its key)."""

    def __init__(self, log: Path, auth: bool = False):
        self.port, self.log = free_port(), Path(log)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if auth else {})}
        self._log = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1)  # answers without auth
                return
            except OSError:
                if time.time() - t0 > 30 or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def env(self, key: str = "test", secret: str = "test") -> dict:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._log.close()

    def mark(self) -> int:
        """Where the log ends now: count from here with gets(mark)."""
        return self.log.stat().st_size

    def gets(self, since: int = 0, bucket: str = "", prefix: str = "", ext: str = ".tar") -> dict[str, int]:
        """GETs answered since byte `since` of the log, per key under bucket/prefix ending in ext
        (a whole object's 200 or a ranged 206)."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text()[since:])  # werkzeug colours some lines
        pattern = rf'"GET /{re.escape(bucket)}/({re.escape(prefix)}[^ ?]*{re.escape(ext)}) HTTP/1\.1" 20[06]'
        counts: dict[str, int] = {}
        for key in re.findall(pattern, text):
            counts[key] = counts.get(key, 0) + 1
        return counts
