"""What the routes read about the running service: its start-up phase, served models and metrics."""

from __future__ import annotations

import enum
import threading

from server.metrics import ServerMetrics
from server.registry import ModelRegistry


class Phase(str, enum.Enum):
    LOADING = "loading"
    PRUNING = "pruning"
    STARTING_ENGINE = "starting-engine"
    READY = "ready"
    FAILED = "failed"


class ServerState:
    """The start-up phase (what /health says), the served models, the metrics."""

    def __init__(self, metrics: ServerMetrics | None = None):
        self.phase = Phase.LOADING
        self.error: str | None = None
        self.registry = ModelRegistry()
        self.metrics = metrics or ServerMetrics()
        # Set when the server begins to stop: start-up work running in a thread (recovery's training
        # loop) polls it and ends early, with nothing written to the cache.
        self.stopping = threading.Event()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY
