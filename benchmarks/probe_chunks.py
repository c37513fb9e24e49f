"""Where the packed path spends a step, and how the chunk sizes move it (issue 6, a probe before a change).

    python -m benchmarks.probe_chunks --shape 2b            # on a GPU machine (a minute or two)
    python -m benchmarks.probe_chunks --shape tiny --items 8   # anywhere, as a smoke test

For the text and image workloads of `benchmarks.bench`, with `packed+compile`: items/s for a sweep of
(max_batch_tokens, tokens_per_call, patches_per_call), then a profile of one run at the defaults: the share of
wall time the GPU was busy and the kernels that took the most of it. Not a unit test; prints a table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SWEEP = [  # (max_batch_tokens, tokens_per_call, patches_per_call)
    (16384, 8192, 8192),
    (16384, 16384, 8192),
    (16384, 16384, 32768),
    (32768, 32768, 32768),
    (32768, 32768, 65536),
    (65536, 65536, 131072),
]


def timed(embedder, items, device, repeats: int = 2) -> float:
    import torch

    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        embedder.embed_prepared(items)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return best


def profile(embedder, items, device, top: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    began = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        embedder.embed_prepared(items)
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - began
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = sum(
        getattr(e, key)
        for e in events
        if e.device_type == (torch.autograd.DeviceType.CUDA if device.type == "cuda" else e.device_type)
    )
    print(
        f"  profiled run: wall {wall * 1e3:.0f} ms, kernels {busy / 1e3:.0f} ms ({busy / 1e6 / wall:.0%} busy)"
    )
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    for e in rows:
        print(f"    {getattr(e, key) / 1e3:8.1f} ms  {e.count:6d}x  {e.key[:100]}")


def latency(model, tokenizer, image_processor, device, shape: str) -> int:
    """What one Serve batch costs the embedder alone: `embed_batch` of 1 and of 64 short texts (the load
    test's ~24 words), per layout, best of 5."""
    import json

    from benchmarks.load_test import make_bodies
    from pipelines.config import EmbedderConfig
    from pipelines.embedder import Embedder

    texts = [json.loads(body)["input"][0] for body, _ in make_bodies(items_per_request=1, words=24)][:64]
    padded = {"attention_layout": "padded", "compile": False}
    for options in (
        padded,
        {"attention_layout": "packed", "compile": False},
        {"attention_layout": "packed", "compile": True},
    ):
        config = EmbedderConfig(model=shape, **options)
        embedder = Embedder(model.model, tokenizer, image_processor=image_processor, config=config)
        embedder.warm_up()
        tokens = sum(embedder.prepare(t).num_tokens for t in texts) / len(texts)
        for n in (1, 64):
            embedder.embed_batch(texts[:n])
            best = min(_once(embedder, texts[:n], device) for _ in range(5))
            print(f"  {str(options):<50} {n:3d} texts (~{tokens:.0f} tokens): {best * 1e3:7.1f} ms")
    return 0


def _once(embedder, texts, device) -> float:
    import torch

    began = time.perf_counter()
    embedder.embed_batch(texts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.bench import Settings, load_models
    from pipelines import synthetic
    from pipelines.config import EmbedderConfig
    from pipelines.embedder import Embedder

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.probe_chunks", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--shape", default="tiny", choices=["tiny", "2b", "8b"])
    p.add_argument("--items", type=int, help="items per workload (default: BENCHMARK.md's, 2048 and 256)")
    p.add_argument("--top", type=int, default=12, help="kernels to list")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument(
        "--latency", action="store_true", help="only: one short text, then 64, per layout (as Serve)"
    )
    args = p.parse_args(argv)
    Settings(shapes=[args.shape])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer, image_processor = load_models(args.shape, device, dtype)
    rng = np.random.default_rng(0)
    side = 448 if args.shape != "tiny" else 64
    workloads = {
        "text": [
            synthetic.text_item(rng, int(n), model.config)
            for n in synthetic.lognormal_lengths(rng, args.items or 2048)
        ],
        "image": [
            synthetic.image_item(rng, model.config, side, text_tokens=20) for _ in range(args.items or 256)
        ],
    }
    if args.latency:
        return latency(model, tokenizer, image_processor, device, args.shape)
    print(
        f"{args.shape} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
        f"compile={not args.no_compile}"
    )
    print(f"{'workload':>8} {'batch tok':>9} {'tok/call':>8} {'patch/call':>10} {'items/s':>9} {'GiB':>6}")
    for workload, items in workloads.items():
        for max_tokens, tokens_per_call, patches_per_call in SWEEP:
            config = EmbedderConfig(
                model=args.shape,
                attention_layout="packed",
                compile=not args.no_compile,
                max_batch_tokens=max_tokens,
                engine="legacy",  # the engine with a tokens-per-call split
            )
            embedder = Embedder(model.model, tokenizer, image_processor=image_processor, config=config)
            embedder.engine.tokens_per_call = tokens_per_call
            embedder.engine.patches_per_call = patches_per_call
            embedder.warm_up(image_side=side if workload == "image" else None)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(embedder, items, device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            print(
                f"{workload:>8} {max_tokens:9d} {tokens_per_call:8d} {patches_per_call:10d} "
                f"{len(items) / seconds:9.1f} {peak:6.1f}",
                flush=True,
            )
        config = EmbedderConfig(model=args.shape, attention_layout="packed", compile=not args.no_compile)
        embedder = Embedder(model.model, tokenizer, image_processor=image_processor, config=config)
        print(f"  {workload}, defaults:")
        profile(embedder, items, device, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
