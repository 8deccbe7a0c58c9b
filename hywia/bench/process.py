"""Run a server as a child process and wait until it is healthy: for tests and benchmarks.

The child gets a session of its own, so stopping it reaches the worker processes it spawned too
(vLLM's engine core); nothing else is signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServerDied(RuntimeError):
    pass


class ServerProcess:
    def __init__(self, command: list[str], port: int, log_path: Path, env: dict | None = None,
                 host: str = "127.0.0.1", health_path: str = "/health"):
        self.command = command
        self.port = port
        self.host = host
        self.log_path = Path(log_path)
        self.env = env
        self.health_path = health_path
        self.process: subprocess.Popen | None = None
        self.health_seen: list[tuple[int, object]] = []  # (status, body) of every health answer

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        return self

    def wait_until_ready(self, timeout: float, poll_seconds: float = 0.2,
                         on_health: Callable[[int, object], None] | None = None) -> None:
        """Poll the health route until it answers 200; raise with the log's tail if the child dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerDied(f"server exited with status {self.process.returncode}:\n{self.log_tail()}")
            status, body = self.health()
            if status is not None:
                self.health_seen.append((status, body))
                if on_health is not None:
                    on_health(status, body)
                if status == 200:
                    return
                # Long start-ups need no fine-grained polling once the port answers; until then keep it fine,
                # so the first phases a fast start-up reports are not slept through.
                poll_seconds = min(poll_seconds * 1.2, 2.0)
            time.sleep(poll_seconds)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def health(self) -> tuple[int | None, object]:
        """(status, parsed body) of the health route, or (None, None) while nothing listens."""
        try:
            with urllib.request.urlopen(self.base_url + self.health_path, timeout=5) as response:
                return response.status, _parse(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _parse(error.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None, None

    def stop(self, grace: float = 30) -> int | None:
        """SIGTERM to the child's session, SIGKILL after `grace` seconds; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self._signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self.process.wait(10)
        finally:
            self._reap_session()

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def _reap_session(self) -> None:
        # Workers that outlived their parent (they should not) still belong to its session.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _parse(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
