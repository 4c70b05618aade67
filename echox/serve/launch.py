"""`echox serve` in a child process, for tests and benchmarks that need a real server on loopback.

    with ServerProcess(["--model", folder, "--threads", "1"]) as server:
        ... connect to server.ws_url (or server.http_url for the page) ...
The child listens on a free port (`--port 0`) and prints where; this waits for that line (or
for the child to end, or `start_timeout_s`, whichever comes first). A subclass may start another
command that prints the same line (`command()`), `echox serve-ray` say.
"""

import collections
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
        self.log: collections.deque[str] = collections.deque(maxlen=200)  # the child's last lines, for failure messages

    def command(self) -> list[str]:
        return [sys.executable, "-m", "echox.cli", "serve", "--port", "0", *self.args]

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.address: str | None = None
        self.listening = threading.Event()
        # Read the child's output all along (so it never blocks on a full pipe), watching for the line.
        threading.Thread(target=self.collect, daemon=True).start()
        if not self.listening.wait(self.start_timeout_s) or self.address is None:
            self.__exit__()
            raise EchoXError("echox serve did not start:\n" + self.tail(30))
        self.http_url, self.ws_url = f"http://{self.address}", f"ws://{self.address}/v1/realtime"
        return self

    def printed(self, text: str, seconds: float) -> bool:
        """Whether the child prints a line holding `text` within `seconds` (or has printed it)."""
        deadline = time.monotonic() + seconds
        while not any(text in line for line in list(self.log)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def tail(self, lines: int) -> str:
        """The child's last `lines` lines of output."""
        return "".join(list(self.log)[-lines:])

    def collect(self):
        for line in self.process.stdout:
            self.log.append(line)
            if not self.listening.is_set() and (found := READY.search(line)):
                self.address = found.group(1)
                self.listening.set()
        self.listening.set()  # the child ended (before listening, if `address` is still None)

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
