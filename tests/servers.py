"""A real `python -m src.serve` process on 127.0.0.1 for the server and page tests."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALLOWED_ORIGIN = "http://allowed.example"  # the shared server's one --cors-origin (conftest.tiny_server)


class Server:
    """`python -m src.serve ... --port 0` in a subprocess; `url` once it listens."""

    def __init__(self, *args, timeout: float = 120):
        self.process = subprocess.Popen([sys.executable, "-m", "src.serve", "--port", "0", *map(str, args)], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()  # blocks until the first stdout line (or exit)
        if not line.startswith("serving on "):
            self.process.kill()
            raise AssertionError(f"server did not start: {line!r} {self.process.stderr.read()[-3000:]}")
        self.url = line.split()[2]
        self.stderr: list[str] = []  # drained as it comes, so a chatty server never blocks on a full pipe
        self.drain = threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True)
        self.drain.start()

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> tuple[int, float, str]:
        """Send `sig`; (exit code, seconds to exit, stderr)."""
        start = time.monotonic()
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.drain.join(timeout)
        return code, time.monotonic() - start, "".join(self.stderr)

    def close(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; waits for the exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
