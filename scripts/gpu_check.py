"""The GPU check's steps (scripts/gpu_check.sh sets up the environment and runs this).

1. build: a random LLaMA-2-7B-shaped model (tests/shapes.py), built in bf16 directly on the device, saved.
2. prune: `hywia.pipeline.prune_to_directory` on the device (the same code `hywia prune --device` runs), with
   the statistics cache off; its report gives seconds, RSS and CUDA peaks per stage.
3. decode: the dense source and the pruned export, one at a time, loaded in bf16 on the device; greedy
   `generate` of --new-tokens tokens (after a warm-up), tokens per second each, and their ratio.
Everything is printed as one JSON summary; `modules` confirms that neither server/ nor vllm was imported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/shapes.py: the real-model shapes

log = logging.getLogger("gpu_check")

PROMPT = "The history of the city begins"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-2-7b",
                        help="a shape in tests/shapes.py (llama-2-7b, llama-1-7b, llama-3-8b-instruct, llama-2-13b, "
                             "…) at full size, or 'tiny' (LLaMA-2-7B's ratios at hidden 512, 2 layers)")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own depth)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--importance", default="hybrid")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--recover", default="none",
                        help="recovery after pruning (hywia prune --recover); none by default: one run must fit the "
                             "15 minutes a lent GPU gives, and this check measures pruning and decoding")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode measurement")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hywia-gpu-check"))
    parser.add_argument("--out", type=Path, default=None, help="where gpu_check.json goes (default $OUT or --workdir)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from hywia.devices import resolve_device

    device = resolve_device(args.device)
    summary = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
               "environment": environment(device)}
    source = args.workdir / "source"
    tick = time.perf_counter()
    config = build_source(source, args.shape, args.layers, device)
    summary["build_seconds"] = time.perf_counter() - tick
    summary["shape"] = {key: config[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads", "vocab_size")}
    export = args.workdir / "export"
    summary["prune"] = prune(source, export, args, device)
    summary["decode"] = {name: decode_speed(path, device, args.new_tokens)
                         for name, path in (("dense", source), ("pruned", export))}
    summary["decode"]["pruned_over_dense"] = (summary["decode"]["pruned"]["tokens_per_second"]
                                              / summary["decode"]["dense"]["tokens_per_second"])
    summary["disk"] = {"source_bytes": _weight_bytes(source), "export_bytes": _weight_bytes(export)}
    summary["modules"] = {name: name in sys.modules for name in ("server", "vllm", "fastapi")}
    text = json.dumps(summary, indent=1)
    print(text)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(text)
    return 0


def environment(device: str) -> dict:
    import torch
    import transformers

    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__}
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        properties = torch.cuda.get_device_properties(index)
        info.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory, gpus=torch.cuda.device_count())
    return info


def build_source(directory: Path, shape_name: str, layers: int, device: str) -> dict:
    """A random bf16 checkpoint of the shape, built on the device (a 7B model never exists in fp32)."""
    import torch

    from tests.shapes import LLAMA_2_7B, SHAPES, save_shape

    if shape_name == "tiny":
        save_shape(directory, LLAMA_2_7B, hidden_size=512, layers=layers or 2, dtype=torch.bfloat16, device=device)
    else:
        save_shape(directory, SHAPES[shape_name], hidden_size=None, layers=layers, dtype=torch.bfloat16, device=device)
    _empty_cache(device)
    return json.loads((directory / "config.json").read_text())


def prune(source: Path, export: Path, args, device: str) -> dict:
    from hywia.pipeline import PruneOptions, prune_to_directory

    options = PruneOptions(ratio=args.ratio, importance=args.importance, samples=args.samples, seq_len=args.seq_len,
                           recover=args.recover)
    tick = time.perf_counter()
    result = prune_to_directory(str(source), options, export, cache_dir=None, device=device)
    seconds = time.perf_counter() - tick
    report = result.report
    _empty_cache(device)
    return {"seconds": seconds, "params_before": report["params_before"], "params_after": report["params_after"],
            "ratio_achieved": report["ratio_achieved"], "peak_rss_bytes": report["peak_rss_bytes"],
            "peak_cuda_bytes": report["peak_cuda_bytes"], "stages": report["memory"]["stages"],
            "export_dtype": json.loads((export / "config.json").read_text()).get("dtype")}


def decode_speed(directory: Path, device: str, new_tokens: int) -> dict:
    """Greedy decode tokens per second with transformers `generate` (batch 1, after a short warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map={"": device}).eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)

    def run(tokens: int) -> float:
        _synchronize(device)
        tick = time.perf_counter()
        with torch.no_grad():
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tokenizer.eos_token_id)
        _synchronize(device)
        assert output.shape[1] == input_ids.shape[1] + tokens
        return time.perf_counter() - tick

    run(min(8, new_tokens))
    seconds = run(new_tokens)
    model = None  # the weights go before the next model loads (`del` would unbind the name `run` reads)
    _empty_cache(device)
    return {"new_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds}


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _empty_cache(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _weight_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
