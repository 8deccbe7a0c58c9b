"""The models this server serves, by id: engine, tokenizer, sizes and pruning report of each."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from server.engines.base import Engine
from server.errors import model_not_found


@dataclass(frozen=True)
class CheckpointSize:
    parameters: int
    weight_bytes: int


def checkpoint_size(directory: Path) -> CheckpointSize:
    """Parameters and weight bytes from the safetensors headers alone (no tensor is read)."""
    parameters = weight_bytes = 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            parameters += math.prod(entry["shape"])
            start, end = entry["data_offsets"]
            weight_bytes += end - start
    return CheckpointSize(parameters=parameters, weight_bytes=weight_bytes)


@dataclass
class ServedModel:
    model_id: str
    directory: Path
    engine: Engine
    tokenizer: object  # the checkpoint's own HF tokenizer: chat template and usage counts
    created: int
    size: CheckpointSize
    unpruned_size: CheckpointSize  # the checkpoint it was pruned from (itself when not pruned)
    report: dict | None = None  # hywia_report.json of a pruned export
    cache_hit: bool | None = None  # whether the export came from the cache at this start


class ModelRegistry:
    def __init__(self):
        self._models: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        self._models[model.model_id] = model

    def get(self, model_id: str) -> ServedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise model_not_found(model_id, list(self._models)) from None

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models
