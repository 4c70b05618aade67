"""`echox serve` in a child process, for tests and benchmarks that need a real server on loopback.

    with ServerProcess(["--model", folder, "--threads", "1"]) as server:
        ... connect to server.ws_url (or server.http_url for the page) ...
The child listens on a free port (`--port 0`) and prints where; this waits for that line.
"""

import re
import subprocess
import sys
import threading
import time

from ..errors import EchoXError

READY = re.compile(r"listening on http://([^/]+)/")


class ServerProcess:
    def __init__(self, args: list[str], start_timeout_s: float = 120.0):
        self.args, self.start_timeout_s = [str(a) for a in args], start_timeout_s
        self.process: subprocess.Popen | None = None
        self.log: list[str] = []  # the child's output, for failure messages

    def __enter__(self) -> "ServerProcess":
        command = [sys.executable, "-m", "echox.cli", "serve", "--port", "0", *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        address = self.wait_until_listening()
        self.http_url, self.ws_url = f"http://{address}", f"ws://{address}/v1/realtime"
        # Keep reading the child's output, so it never blocks on a full pipe.
        threading.Thread(target=self.collect, daemon=True).start()
        return self

    def wait_until_listening(self) -> str:
        deadline = time.monotonic() + self.start_timeout_s
        for line in self.process.stdout:
            self.log.append(line)
            if found := READY.search(line):
                return found.group(1)
            if time.monotonic() > deadline:
                break
        self.__exit__()
        raise EchoXError("echox serve did not start:\n" + "".join(self.log[-30:]))

    def collect(self):
        for line in self.process.stdout:
            self.log.append(line)

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
