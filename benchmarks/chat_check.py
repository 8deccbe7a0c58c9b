"""Chat check: short factual questions asked through the OpenAI endpoint, graded by keyword.

Each question of benchmarks/data/chat_questions.json is sent once with the real `openai` client
(chat completions, greedy: temperature 0, max_tokens 48); a reply is right when it contains one of
the question's answers as a whole word, case-insensitive. The server is either one already running
(--base-url) or started here for a model directory: `hywia serve DIR --ratio 0 --engine torch`
(the built-in engine: same OpenAI surface, starts in seconds), or vLLM's own server with
--server vllm (`python -m vllm.entrypoints.openai.api_server --model DIR`).

    python benchmarks/chat_check.py EXPORT_DIR [EXPORT_DIR ...] --out benchmarks/results/chat_check.json
    python benchmarks/chat_check.py --base-url http://127.0.0.1:8000/v1 [--model ID --model ID2]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = Path(__file__).parent / "data" / "chat_questions.json"
ROOT = Path(__file__).resolve().parents[1]


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    return json.loads(path.read_text())["questions"]


def is_right(reply: str, answers: list[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", reply, re.IGNORECASE) for answer in answers)


def ask_all(base_url: str, questions: list[dict], max_tokens: int = 48, model: str | None = None,
            concurrency: int = 8) -> dict:
    """Every question through the chat endpoint; returns the score and each reply."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=os.environ.get("HYWIA_API_KEY", "unused"), timeout=300)
    model = model or client.models.list().data[0].id
    def ask(item: dict) -> dict:
        reply = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                               messages=[{"role": "user", "content": item["question"]}])
        text = reply.choices[0].message.content or ""
        return {"question": item["question"], "reply": text, "right": is_right(text, item["answers"])}

    started = time.perf_counter()
    # A few at once, as clients do: the server batches them (batch shapes can change greedy answers only
    # through float rounding).
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        rows = list(pool.map(ask, questions))
    right = sum(row["right"] for row in rows)
    return {"model": model, "right": right, "total": len(rows), "fraction": right / len(rows),
            "seconds": time.perf_counter() - started, "replies": rows}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir: Path, server: str = "hywia", timeout: float = 900):
    """Start a server for MODEL_DIR, yield its base URL once /v1/models answers, stop it afterwards."""
    import httpx

    port = _free_port()
    if server == "hywia":
        command = [sys.executable, "-m", "hywia.cli", "serve", str(model_dir), "--ratio", "0", "--engine", "torch",
                   "--port", str(port)]
    else:
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--port", str(port)]
    log_path = Path(f"/tmp/chat_check-{port}.log")
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{shlex.join(command)} exited with {process.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(command)} not ready after {timeout:.0f} s; see {log_path}")
            time.sleep(2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def check_directory(model_dir: Path, server: str = "hywia", questions: list[dict] | None = None) -> dict:
    with serving(model_dir, server) as base_url:
        result = ask_all(base_url, questions or load_questions())
    return {"directory": str(model_dir), "server": server, **result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="*", type=Path, help="model/export directories to serve and ask")
    parser.add_argument("--base-url", default=None, help="ask a server that is already running instead")
    parser.add_argument("--model", action="append", default=None,
                        help="with --base-url: a served model id to ask (repeatable; default: the first listed), "
                             "e.g. both ids of `hywia serve --serve-dense`")
    parser.add_argument("--server", choices=("hywia", "vllm"), default="hywia")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (appended to, keyed by directory)")
    args = parser.parse_args(argv)
    results = []
    if args.model and not args.base_url:
        parser.error("--model names a model of a running server: give --base-url too")
    if args.base_url:
        for model in args.model or [None]:
            results.append({"base_url": args.base_url, **ask_all(args.base_url, load_questions(), model=model)})
    for directory in args.directories:
        results.append(check_directory(directory, args.server))
    for result in results:
        print(f"{result.get('directory', result.get('base_url'))} {result['model']}: {result['right']}/{result['total']} right")
    if args.out:
        previous = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
        previous["runs"].extend({**r, "command": shlex.join(sys.argv), "date": datetime.date.today().isoformat()}
                                for r in results)
        args.out.write_text(json.dumps(previous, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
