"""The backfill end to end (issue 6 section 1): the mixed workload through Ray Data into LanceDB, against the
bare embedder on the same data, with how busy the GPU was.

    python -m benchmarks.backfill_bench                   # the tiny model on the CPU, a local Ray (regressions)
    python -m benchmarks.backfill_bench --shape 2b --packed --compile --json out.json   # a GPU machine with
                                                          # Ray and LanceDB (../shared/tools/device-wheels)

The corpus is written to disk first (a JSONL of texts with BENCHMARK.md's log-normal lengths, in words, and a
folder of random square PNGs), so the backfill reads, decodes and tokenizes like a real job. Three figures:
- `bare_forward`: the embedder alone on already prepared items (`embed_prepared`): what the GPU can do;
- `bare_end_to_end`: the embedder alone, preparing in this one process (`embed_batch`);
- `backfill`: `run_backfill(config)` (Ray already started, so its start-up is not counted; the actor's model
  load and warm-up are), rows/s over the whole run; target >= 90% of `bare_forward`; with its start-up
  (`BackfillSummary.start_up`: when the first embedding worker's process started, its actor began, its model
  loaded and warmed up, and when the first batch was embedded, in seconds from the run's start), the part of
  the whole run no steady rate can win back;
- `backfill_steady`: rows/s from the first commit to the last.
GPU busy: the mean of `nvidia-smi`'s utilization sampled every 0.25 s during each phase.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def sample_words() -> list[str]:
    """The words of the bundled sample texts: a vocabulary every tokenizer here knows."""
    from pipelines.sample import SAMPLE_DIR

    lines = (SAMPLE_DIR / "texts.jsonl").read_text().splitlines()
    return sorted({word for line in lines if line.strip() for word in json.loads(line)["text"].split()})


def write_corpus(root: Path, texts: int, images: int, side: int, seed: int = 0) -> tuple[Path, Path, list]:
    """`texts.jsonl` (id, text) and `images/NNNN.png` under `root`; returns their paths and the same items."""
    from PIL import Image

    from pipelines.synthetic import lognormal_lengths

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    text_path, image_dir = root / "texts.jsonl", root / "images"
    image_dir.mkdir(exist_ok=True)
    items: list[Any] = []
    words = sample_words()
    with text_path.open("w") as out:
        for index, n in enumerate(lognormal_lengths(rng, texts)):
            text = " ".join(rng.choice(words, int(n)))
            out.write(json.dumps({"id": f"t{index}", "text": text}) + "\n")
            items.append(text)
    for index in range(images):
        path = image_dir / f"{index:05d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(path)
        items.append({"image": str(path)})
    return text_path, image_dir, items


def job_config(
    root: Path,
    text_path: Path,
    image_dir: Path,
    model: str,
    embedder_options: dict,
    batch_rows: int,
    commit_rows: int = 4096,
):
    from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig

    return Config(
        embedder=EmbedderConfig(model=model, **embedder_options),
        sources=[
            SourceConfig(kind="jsonl", path=str(text_path), name="texts", id_column="id", text_column="text"),
            SourceConfig(kind="images", path=str(image_dir), name="images"),
        ],
        table=TableConfig(uri=str(root / "db"), commit_rows=commit_rows, fts_index=False),
        resources=ResourcesConfig(batch_rows=batch_rows, prepare_batch_rows=min(batch_rows, 64)),
    )


class GpuSampler:
    """The GPU's utilization (percent), sampled with nvidia-smi in a thread; `mean` is None without a GPU."""

    def __init__(self, period_s: float = 0.25):
        self.period_s, self.samples = period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return  # no GPU, no nvidia-smi: nothing to sample
            self._stop.wait(self.period_s)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipelines.backfill import connect_ray, run_backfill
    from pipelines.embedder import Embedder

    options: dict[str, Any] = {"max_batch_tokens": args.max_batch_tokens}
    if args.packed:
        options["attention_layout"] = "packed"
    if args.compile:
        options.update(attention_layout="packed", compile=True)
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp:
        root = Path(args.workdir or tmp)
        text_path, image_dir, items = write_corpus(root, args.texts, args.images, args.image_side, args.seed)
        model = args.model or ("tiny" if args.shape == "tiny" else save_random_checkpoint(args.shape, root))
        config = job_config(root, text_path, image_dir, model, options, args.batch_rows, args.commit_rows)
        result: dict[str, Any] = {"rows": len(items), "model": args.shape, "options": options}

        result.update(measure_bare(Embedder.from_config(config.embedder), items, args.image_side))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the embedding actor needs the GPU

        connect_ray(config.resources)
        arrivals: list[tuple[float, int]] = []  # (when, rows) of each batch the sink took
        with GpuSampler() as sampler:
            summary = run_backfill(config, on_batch=lambda rows: arrivals.append((time.perf_counter(), rows)))
        result["backfill"] = {
            "seconds": summary.seconds,
            "rows_per_s": summary.embedded / summary.seconds,
            "gpu_busy": sampler.mean,
            "embedded": summary.embedded,
            "errored": summary.errored,
            "vectors_in_table": summary.vectors_in_table,
            "start_up": summary.start_up,
        }
        result["backfill_steady"] = steady_state(arrivals)
        result["backfill_over_bare_forward"] = (
            result["backfill"]["rows_per_s"] / result["bare_forward"]["rows_per_s"]
        )
        if result["backfill_steady"] is not None:
            result["steady_over_bare_forward"] = (
                result["backfill_steady"]["rows_per_s"] / result["bare_forward"]["rows_per_s"]
            )
        return result


def steady_state(arrivals: list[tuple[float, int]]) -> dict[str, Any] | None:
    """Rows/s once rows flow: the rows after the first commit over the time from the first commit to the last,
    which leaves out the start-up every run pays once (the actors' model load and warm-up, the first read).
    The driver sees one arrival per commit (a group of about `commit_rows` rows): None with fewer than two
    commits."""
    if len(arrivals) < 2 or arrivals[-1][0] <= arrivals[0][0]:
        return None
    rows = sum(n for _, n in arrivals[1:])
    seconds = arrivals[-1][0] - arrivals[0][0]
    return {"seconds": seconds, "rows_per_s": rows / seconds, "gpu_busy": None, "batches": len(arrivals)}


def measure_bare(embedder, items: list, image_side: int) -> dict[str, Any]:
    """The embedder alone on the same rows: on prepared items, then preparing them itself."""
    import torch

    embedder.warm_up(image_side=image_side)
    prepared = [embedder.prepare(item, i) for i, item in enumerate(items)]
    figures = {}
    for name, work in (
        ("bare_forward", lambda: embedder.embed_prepared(prepared)),
        ("bare_end_to_end", lambda: embedder.embed_batch(items)),
    ):
        with GpuSampler() as sampler:
            began = time.perf_counter()
            work()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began
        figures[name] = {"seconds": seconds, "rows_per_s": len(items) / seconds, "gpu_busy": sampler.mean}
    return figures


def save_random_checkpoint(shape: str, root: Path) -> str:
    """A random-weight checkpoint at a real shape, with the tiny tokenizer and Qwen3-VL's image processor, saved
    where `Embedder.load` and the backfill's actors can load it (seconds on a GPU machine's disk)."""
    import torch

    from pipelines.model_shapes import random_model, shape_processor_parts

    tokenizer, image_processor = shape_processor_parts()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(shape, tokenizer, device=device, dtype=torch.bfloat16, generation=True)
    path = root / f"random-{shape}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    del model
    return str(path)


def format_result(result: dict[str, Any]) -> str:
    from pipelines.embed_pool import start_up_line

    def busy(value):
        return "-" if value is None else f"{value:.0f}%"

    lines = [f"backfill end to end, {result['model']}, {result['rows']} rows, options {result['options']}"]
    for name in ("bare_forward", "bare_end_to_end", "backfill", "backfill_steady"):
        figures = result.get(name)
        if figures is None:
            continue
        lines.append(
            f"  {name:<16} {figures['rows_per_s']:10.1f} rows/s  {figures['seconds']:8.1f} s  "
            f"GPU busy {busy(figures['gpu_busy'])}"
        )
    lines.append(f"  backfill / bare forward: {result['backfill_over_bare_forward']:.0%} (start-up included)")
    if result["backfill"].get("start_up"):
        lines.append(f"  start-up: {start_up_line(result['backfill']['start_up'])}")
    if "steady_over_bare_forward" in result:
        lines.append(
            f"  steady backfill / bare forward: {result['steady_over_bare_forward']:.0%} (target >= 90%; "
            f"the first batch's start-up left out)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.backfill_bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--shape", default="tiny", choices=["tiny", "2b", "8b"])
    p.add_argument("--model", help="a checkpoint directory instead of --shape's model")
    p.add_argument("--texts", type=int, default=64, help="text rows (BENCHMARK.md: 2048)")
    p.add_argument("--images", type=int, default=8, help="image rows (BENCHMARK.md: 256)")
    p.add_argument("--image-side", type=int, default=64, help="image side in pixels (BENCHMARK.md: 448)")
    p.add_argument("--packed", action="store_true", help="attention_layout=packed")
    p.add_argument("--compile", action="store_true", help="attention_layout=packed and compile=True")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--batch-rows", type=int, default=256, help="rows handed to the embedding actor at a time")
    p.add_argument(
        "--commit-rows",
        type=int,
        default=4096,
        help="about this many rows per commit (a group); the steady rate needs two or more (default: 4096)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the corpus and the table here (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="write the result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(format_result(result))
    return 0 if result["backfill"]["errored"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
