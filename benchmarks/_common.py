"""Small helpers the benchmark scripts share: comma lists on the command line, atomic JSON results."""

from __future__ import annotations

import json
from pathlib import Path


def numbers(text: str, kind) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def names(text: str, allowed) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in chosen if name not in allowed]
    if unknown:
        raise SystemExit(f"unknown: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return chosen


def write_json(path: Path, payload: dict) -> None:
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    staging.replace(path)  # atomic: an interrupted run never leaves half a file
