"""The reranker's benchmark: pairs/s of our `Reranker` against the official procedure, in one run.

    python -m benchmarks.rerank_bench                        # the tiny reranker on the CPU
    python -m benchmarks.rerank_bench --shape 2b --json r.json   # on a GPU: random weights at the 2B shape

The workload is what a search hands the reranker: one query (20 tokens) against `--pairs` documents, text
documents of BENCHMARK.md's text lengths (log-normal, median 110 tokens) and, for `image`, one image each (448
px on a GPU, 64 on the tiny model) plus 20 tokens; each pair also carries the template's ~50 tokens. Pairs are
random prepared items (`pipelines.synthetic`): the table measures the model side, not tokenizing. The baseline
is the official `Qwen3VLReranker.process`, which scores the pairs one at a time: the base model on each pair,
the last position, through the LM head's "yes" minus "no" row, a sigmoid. Every timed pass is printed, with
pairs/s, tokens/s, peak GPU memory, the ratio to the baseline's pairs/s and the largest score difference to it.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("tiny", "2b", "8b")
WORKLOADS = ("text", "image")
VARIANTS = {"padded": {"attention_layout": "padded"}, "packed": {"attention_layout": "packed"}}
TEMPLATE_TOKENS = 50  # the judge system prompt, the Instruct/Query/Document markers, the generation prompt
QUERY_TOKENS = 20


def pairs_for(rng, workload: str, count: int, model_config, image_side: int):
    """Random prepared pairs of the workload (one query against `count` documents)."""
    from pipelines.synthetic import image_item, lognormal_lengths, text_item

    if workload == "text":
        lengths = lognormal_lengths(rng, count) + QUERY_TOKENS + TEMPLATE_TOKENS
        return [text_item(rng, int(n), model_config) for n in lengths]
    extra = QUERY_TOKENS + TEMPLATE_TOKENS + 20
    return [image_item(rng, model_config, image_side, text_tokens=extra) for _ in range(count)]


def official_scores(generation_model, pairs, direction) -> np.ndarray:
    """The official loop: one pair at a time, the last position's state through the yes-minus-no row."""
    import torch

    device = direction.device
    scores = []
    with torch.inference_mode():
        for pair in pairs:
            inputs: dict[str, Any] = {"input_ids": torch.from_numpy(pair.input_ids)[None].to(device)}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            if pair.pixel_values is not None:
                image = generation_model.config.image_token_id
                inputs["mm_token_type_ids"] = (inputs["input_ids"] == image).int()
                inputs["pixel_values"] = torch.from_numpy(pair.pixel_values).to(device, direction.dtype)
                inputs["image_grid_thw"] = torch.from_numpy(pair.image_grids).to(device)
            hidden = generation_model.model(**inputs, use_cache=False).last_hidden_state[:, -1]
            scores.append(torch.sigmoid(hidden.float() @ direction.float()).item())
    return np.array(scores, np.float32)


def _timed(device, fn):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return out, seconds, peak


def run(args) -> list[dict[str, Any]]:
    import torch

    from benchmarks.bench import load_models
    from pipelines.config import RerankerConfig
    from pipelines.reranker import Reranker

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape in args.shapes or ["tiny"]:
        model, tokenizer, image_processor = load_models(shape, device, dtype)
        side = args.image_side or (64 if shape == "tiny" else 448)
        for workload in args.workloads or list(WORKLOADS):
            rng = np.random.default_rng(args.seed)
            count = args.pairs or (64 if shape == "tiny" else 100)
            pairs = pairs_for(rng, workload, count, model.config, side)
            tokens = sum(p.num_tokens for p in pairs)
            rerankers = {
                name: Reranker(
                    model,
                    tokenizer,
                    image_processor=image_processor,
                    config=RerankerConfig(model=shape, max_batch_tokens=args.max_batch_tokens, **options),
                )
                for name, options in VARIANTS.items()
            }
            direction = rerankers["padded"]._direction
            rerankers["padded"].score_prepared(pairs[:4])  # warm up both paths once
            official_scores(model, pairs[:2], direction)
            baseline, seconds, peak = _timed(
                device, functools.partial(official_scores, model, pairs, direction)
            )
            base_rate = count / seconds
            rows.append(
                _row(shape, workload, "official (one pair at a time)", 1, count, tokens, seconds, peak)
            )
            for name, reranker in rerankers.items():
                reranker.score_prepared(pairs)  # warm-up pass (compiles, allocates): not timed
                for number in range(1, args.passes + 1):
                    scores, seconds, peak = _timed(device, functools.partial(reranker.score_prepared, pairs))
                    row = _row(shape, workload, name, number, count, tokens, seconds, peak)
                    row["ratio"] = row["pairs_per_s"] / base_rate
                    row["max_score_diff"] = float(np.abs(scores - baseline).max())
                    rows.append(row)
            for row in rows[-len(VARIANTS) * args.passes - 1 :]:
                print(format_row(row), flush=True)
    if args.json_path:
        args.json_path.write_text(json.dumps({"rows": rows}, indent=2))
    return rows


def _row(shape, workload, recipe, number, count, tokens, seconds, peak) -> dict[str, Any]:
    return {
        "model": shape,
        "workload": workload,
        "recipe": recipe,
        "pass": number,
        "pairs": count,
        "pairs_per_s": count / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_gib": peak,
        "ratio": 1.0 if recipe.startswith("official") else None,
        "max_score_diff": 0.0 if recipe.startswith("official") else None,
    }


HEADER = f"{'model':>5} {'workload':>8} {'recipe':<30} {'pass':>4} {'pairs/s':>9} {'tokens/s':>10} {'GiB':>6} {'x base':>7} {'max |d|':>8}"


def format_row(row: dict[str, Any]) -> str:
    def cell(value, fmt, width):
        return ("-" if value is None else fmt.format(value)).rjust(width)

    return (
        f"{row['model']:>5} {row['workload']:>8} {row['recipe']:<30} {row['pass']:>4} "
        f"{cell(row['pairs_per_s'], '{:,.1f}', 9)} {cell(row['tokens_per_s'], '{:,.0f}', 10)} "
        f"{cell(row['peak_gib'], '{:.1f}', 6)} {cell(row['ratio'], '{:.2f}x', 7)} "
        f"{cell(row['max_score_diff'], '{:.1e}', 8)}"
    )


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The median pass of each variant, for NOTES (every pass is printed above it)."""
    lines = []
    keys = sorted(
        {(r["model"], r["workload"], r["recipe"]) for r in rows if not r["recipe"].startswith("official")}
    )
    for model, workload, recipe in keys:
        rates = [
            r["pairs_per_s"]
            for r in rows
            if (r["model"], r["workload"], r["recipe"]) == (model, workload, recipe)
        ]
        lines.append(
            f"{model} {workload} {recipe}: median {statistics.median(rates):,.1f} pairs/s over {len(rates)} passes"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rerank_bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", dest="shapes", action="append", choices=SHAPES, help="model shape (repeat)")
    p.add_argument("--workload", dest="workloads", action="append", choices=WORKLOADS, help="(repeat)")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda")
    p.add_argument("--pairs", type=int, help="documents per query (default: 100; tiny: 64)")
    p.add_argument("--image-side", type=int, help="image side in pixels (default: 448; tiny: 64)")
    p.add_argument("--passes", type=int, default=3, help="timed passes of each variant (default: 3)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="our token budget per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", type=Path, help="write the rows here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(HEADER, flush=True)
    rows = run(args)
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
