"""The benchmark: BENCHMARK.md's workloads through the baseline recipe and through ours, in one run.

    python -m benchmarks.bench                      # the tiny model on the CPU (regressions, seconds)
    python -m benchmarks.bench --shape 2b --shape 8b --json out.json     # on a GPU: the whole table

For each model shape and workload it measures, in the same process: the bf16 matmul ceiling, the baseline
recipe (`benchmarks/baseline.py`) and our embedder's variants (`--variant`, e.g. padded, packed,
packed+compile), and prints items/s, tokens/s, MFU (useful FLOPs as `benchmarks/flops.py` counts them / time /
measured ceiling), peak GPU memory, the ratio to the baseline, the cosine to the baseline's vectors, the
cold start (model load + embedder build + warm-up/compilation) and every timed pass (with what each paid for:
compiles, allocator growth, pinned host blocks). `--cold-start` adds a new process's start to its first vector,
with an empty compiler cache and with the cache it left; the `text1`/`text8` workloads are Serve-sized steps of
1 and 8 short texts (what `cuda_graphs` is for; its buckets, memory and replays are printed with the row). Every row is written to the JSON file as soon
as it is measured, so a run cut short keeps what it measured. Items are random prepared items at the workload's
shapes (`pipelines.synthetic`): the table measures the model side, not tokenization or image decoding.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("tiny", "2b", "8b")
# text1 / text8: short texts (20-60 tokens, Serve's single requests) in steps of 1 and 8 items: the small steps
# that are host-bound on a GPU, what CUDA graphs (`cuda_graphs`) are for
WORKLOADS = ("text", "image", "text1", "text8")
STEP_ITEMS = {"text1": 1, "text8": 8}
# Every variant names its layout and compile setting: the config's defaults (auto) would pick them by device.
# `legacy:` variants run the previous packed engine (`engine: legacy`), the one the README's figures were
# measured with, so that one run compares the two engines.
_PACKED = {"attention_layout": "packed", "compile": False}
_FP8 = {**_PACKED, "compile": True, "quantization": "fp8"}
VARIANTS: dict[str, dict[str, Any]] = {
    "padded": {"attention_layout": "padded", "compile": False},
    "packed": _PACKED,
    "packed+compile": {**_PACKED, "compile": True},
    "packed-flex": {**_PACKED, "varlen_attention": "flex"},
    "packed-sdpa": {**_PACKED, "varlen_attention": "sdpa"},
    "packed+fp8": {**_PACKED, "quantization": "fp8"},
    "packed+compile+fp8": {**_PACKED, "compile": True, "quantization": "fp8"},
    # FP8 variants (issue 17; NOTES "FP8 that keeps the vectors"): fp8_keep what stays in bf16; fp8_fuse
    # (bench-only, default True) False is the first lease's conversion, every projection its own matmul
    "packed+compile+fp8-unfused": {**_FP8, "fp8_fuse": False},
    "packed+compile+fp8-keep-ends": {**_FP8, "fp8_keep": ("first", "last")},
    "packed+compile+fp8-keep-down": {**_FP8, "fp8_keep": ("down_proj",)},
    "packed+compile+fp8-keep-all3": {**_FP8, "fp8_keep": ("first", "last", "down_proj")},
    "packed+graphs": {**_PACKED, "cuda_graphs": True},
    "packed+compile+graphs": {**_PACKED, "compile": True, "cuda_graphs": True},
    "legacy:packed": {**_PACKED, "engine": "legacy"},
    "legacy:packed+compile": {**_PACKED, "compile": True, "engine": "legacy"},
}
# BENCHMARK.md's sizes on a GPU; CI-sized ones for the tiny model on a CPU
SIZES = {
    "tiny": {"text": 256, "image": 16, "image_side": 64, "small": 32},
    "2b": {"text": 2048, "image": 256, "image_side": 448, "small": 256},
    "8b": {"text": 2048, "image": 256, "image_side": 448, "small": 256},
}
TARGETS = {("2b", "text"): 1100, ("8b", "text"): 240, ("2b", "image"): 320, ("8b", "image"): 130}
TARGET_MFU = {("2b", "text"): 0.60, ("8b", "text"): 0.63, ("2b", "image"): 0.50, ("8b", "image"): 0.60}


@dataclass
class Settings:
    shapes: list[str] = field(default_factory=lambda: ["tiny"])
    workloads: list[str] = field(default_factory=lambda: ["text", "image"])
    variants: list[str] | None = None  # default: padded + packed (+ packed+compile on a GPU)
    device: str = "auto"
    dtype: str = "auto"
    text_items: int | None = None
    image_items: int | None = None
    image_side: int | None = None
    seed: int = 0
    max_batch_tokens: int = 16384
    baseline: bool = True
    cached_compile: bool = True
    passes: int = 1  # timed passes of our variants; the row reports the median, and every pass
    small_items: int | None = None  # items in the text1/text8 sets
    cold_start: list[str] | None = None  # variants timed from a new process's start to their first vector
    deadline_s: float | None = None
    json_path: Path | None = None


class Bench:
    """One run: settings, the environment, the ceiling, and the rows measured so far."""

    def __init__(self, settings: Settings):
        import torch

        from benchmarks.flops import matmul_ceiling

        self.settings = settings
        self.started = time.perf_counter()
        if settings.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(settings.device)
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, default_dtype if settings.dtype == "auto" else settings.dtype)
        self.variants = settings.variants or (
            ["padded", "packed", "packed+compile"] if self.device.type == "cuda" else ["padded", "packed"]
        )
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
        self.ceiling = matmul_ceiling(self.device, self.dtype)
        self.rows: list[dict[str, Any]] = []
        self.env = _environment(self.device, self.dtype, self.ceiling)
        log(f"matmul ceiling: {self.ceiling['flops_per_s'] / 1e12:.3g} TFLOP/s ({self.env['device_name']})")

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        for shape in self.settings.shapes:
            if self._out_of_time(f"{shape}: all"):
                continue
            try:
                self._run_shape(shape)
            except Exception as exc:  # a model that cannot be built: record it, go on with the next shape
                self._record({"model": shape, "recipe": "load", "status": _error(exc)})
        self._write()
        return self.rows

    def _run_shape(self, shape: str) -> None:
        import torch

        from benchmarks.flops import Costs

        began = time.perf_counter()
        model, tokenizer, image_processor = load_models(shape, self.device, self.dtype)
        _sync(self.device)
        load_s = time.perf_counter() - began
        log(f"{shape}: model built in {load_s:.1f} s")
        costs = Costs.of(model)
        pad_token_id = _pad_token_id(tokenizer, model.config)
        # FP8 variants convert the model's decoder layers in place: they run after every bf16 measurement
        full = [v for v in self.variants if VARIANTS[v].get("quantization") != "fp8"]
        fp8 = [v for v in self.variants if VARIANTS[v].get("quantization") == "fp8"]
        kept = []
        try:
            for workload in self.settings.workloads:
                items = self.build_workload(shape, workload, model.config)
                context = dict(
                    model=shape,
                    workload=workload,
                    items=len(items),
                    tokens=int(sum(item.num_tokens for item in items)),
                    useful_tflop=_workload_flops(costs, items) / 1e12,
                )
                if workload == "image":
                    context["image_side"] = self.settings.image_side or SIZES[shape]["image_side"]
                reference = None
                if self.settings.baseline and not self._out_of_time(f"{shape} {workload} baseline"):
                    reference = self._baseline(context, model, items, pad_token_id, load_s)
                for variant in full:
                    if self._out_of_time(f"{shape} {workload} {variant}"):
                        continue
                    self._ours(context, variant, model, tokenizer, image_processor, items, reference, load_s)
                if fp8:
                    kept.append((context, items, reference))
                del items, reference
                gc.collect()
            saved = None
            for context, items, reference in kept:
                for variant in fp8:
                    if not self._out_of_time(f"{shape} {context['workload']} {variant}"):
                        saved = _convert_for(model, variant, saved)
                        self._ours(
                            context, variant, model, tokenizer, image_processor, items, reference, load_s
                        )
            kept.clear()
        finally:
            del model
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def build_workload(self, shape: str, workload: str, model_config) -> list:
        from pipelines import synthetic

        s = self.settings
        sizes = SIZES[shape]
        rng = np.random.default_rng(s.seed + WORKLOADS.index(workload))
        if workload == "text":
            count = s.text_items if s.text_items is not None else sizes["text"]
            lengths = synthetic.lognormal_lengths(rng, count)
            return [synthetic.text_item(rng, int(n), model_config) for n in lengths]
        if workload in STEP_ITEMS:
            count = s.small_items if s.small_items is not None else sizes["small"]
            return [synthetic.text_item(rng, int(n), model_config) for n in rng.integers(20, 61, count)]
        count = s.image_items if s.image_items is not None else sizes["image"]
        side = s.image_side or sizes["image_side"]
        return [synthetic.image_item(rng, model_config, side, text_tokens=20) for _ in range(count)]

    def _baseline(self, context, model, items, pad_token_id, load_s) -> np.ndarray | None:
        from benchmarks.baseline import baseline_embed, batch_size_for

        row = dict(context, recipe="baseline", backend=model.config._attn_implementation)
        try:
            size = STEP_ITEMS.get(context["workload"]) or batch_size_for(items)
            warm = time.perf_counter()
            baseline_embed(model, items[:size], pad_token_id, size)
            _sync(self.device)
            row["warm_up_s"] = time.perf_counter() - warm
            row["cold_start_s"] = load_s + row["warm_up_s"]
            seconds, vectors, peak = self._timed(lambda: baseline_embed(model, items, pad_token_id, size))
        except Exception as exc:
            self._record(dict(row, status=_error(exc)))
            return None
        self._record(self._figures(row, seconds, peak, vectors, None))
        return vectors

    def _ours(self, context, variant, model, tokenizer, image_processor, items, reference, load_s) -> None:
        import torch

        row = dict(context, recipe=variant)
        embedder = None
        try:
            graphs_before = _compiled_graphs()
            embedder = self._build_and_warm(row, context, variant, model, tokenizer, image_processor, load_s)
            row["backend"] = _backend(embedder)
            row["graphs_compiled"] = _compiled_graphs() - graphs_before
            _graph_report(row, embedder)
            graphs_before = _compiled_graphs()
            step = STEP_ITEMS.get(context["workload"])
            seconds, vectors, peak = self._timed_passes(row, lambda: embedder.embed_prepared(items, step))
            row["recompiles_in_run"] = _compiled_graphs() - graphs_before
            _graph_report(row, embedder)
            self._record(self._figures(row, seconds, peak, vectors, reference))
            first_workload = context["workload"] == self.settings.workloads[0]
            if VARIANTS[variant].get("compile") and self.settings.cached_compile and first_workload:
                self._cached_cold_start(context, variant, model, tokenizer, image_processor, load_s)
            if variant in (self.settings.cold_start or ()) and first_workload:
                for row in cold_starts(context["model"], variant, self.device, self.settings):
                    self._record(dict(context, **row))
        except Exception as exc:
            self._record(dict(row, status=_error(exc)))
        finally:
            embedder = None  # noqa: F841 (frees the embedder before emptying the cache)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _cached_cold_start(self, context, variant, model, tokenizer, image_processor, load_s) -> None:
        """A new replica's cold start when the compiler's cache (TORCHINDUCTOR_CACHE_DIR) is already warm:
        forget every compiled graph in this process, then build and warm up again."""
        import torch

        row = dict(context, recipe=f"{variant} (cached)")
        try:
            torch._dynamo.reset()
            self._build_and_warm(row, context, variant, model, tokenizer, image_processor, load_s)
            row["status"] = "cold start only"
        except Exception as exc:
            row["status"] = _error(exc)
        self._record(row)

    def _build_and_warm(self, row, context, variant, model, tokenizer, image_processor, load_s):
        """Build the variant's embedder and warm it up; records build, warm-up and cold-start seconds in `row`."""
        from pipelines.embedder import Embedder

        began = time.perf_counter()
        embedder = Embedder(
            model, tokenizer, image_processor=image_processor, config=self._config(context["model"], variant)
        )
        row["build_s"] = time.perf_counter() - began
        row["warm_up_s"] = embedder.warm_up(image_side=context.get("image_side"))
        row["cold_start_s"] = load_s + row["build_s"] + row["warm_up_s"]
        return embedder

    def _config(self, shape: str, variant: str):
        from pipelines.config import EmbedderConfig

        options = {k: v for k, v in VARIANTS[variant].items() if k != "fp8_fuse"}  # a bench-only key
        return EmbedderConfig(model=shape, max_batch_tokens=self.settings.max_batch_tokens, **options)

    # -- measuring -------------------------------------------------------------------------------------

    def _timed(self, fn):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        result = fn()
        _sync(self.device)
        seconds = time.perf_counter() - began
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return seconds, result, peak

    def _timed_passes(self, row, fn):
        """`passes` timed runs of `fn`: the median's seconds (each pass's in `row["pass_s"]`), the last
        vectors, the highest peak. Per pass also what a first pass may pay for (`row["pass_costs"]`): graphs
        compiled, new device memory segments (cudaMalloc), new pinned host allocations."""
        runs, costs = [], []
        for _ in range(max(1, self.settings.passes)):
            before = _pass_counters(self.device)
            runs.append(self._timed(fn))
            after = _pass_counters(self.device)
            costs.append({key: after[key] - before[key] for key in after if key in before})
        row["pass_s"] = [seconds for seconds, _, _ in runs]
        row["pass_costs"] = costs
        peaks = [peak for _, _, peak in runs if peak is not None]
        return float(np.median(row["pass_s"])), runs[-1][1], max(peaks) if peaks else None

    def _figures(self, row, seconds, peak, vectors, reference) -> dict[str, Any]:
        row = dict(row, seconds=seconds, status="ok")
        row["items_per_s"] = row["items"] / seconds
        row["tokens_per_s"] = row["tokens"] / seconds
        row["mfu"] = row["useful_tflop"] * 1e12 / seconds / self.ceiling["flops_per_s"]
        row["peak_gib"] = peak / 2**30 if peak is not None else None
        if not np.isfinite(vectors).all():
            row["status"] = "error: non-finite vectors"
        if reference is not None:
            cosines = np.sum(vectors.astype(np.float64) * reference, axis=1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
            )
            row["cosine_min"] = float(cosines.min())
            row["cosine_mean"] = float(cosines.mean())
        if VARIANTS.get(row["recipe"], {}).get("quantization") == "fp8":
            bf16 = [
                r["items_per_s"]
                for r in self.rows
                if (r.get("model"), r.get("workload")) == (row["model"], row["workload"])
                and r.get("items_per_s")
                and r.get("recipe") in VARIANTS
                and VARIANTS[r["recipe"]].get("quantization") != "fp8"
            ]
            if bf16:
                row["ratio_to_best_unquantized"] = row["items_per_s"] / max(bf16)
        base = self._row(row["model"], row["workload"], "baseline")
        if base is not None and base.get("items_per_s"):
            row["ratio"] = row["items_per_s"] / base["items_per_s"]
            if peak is not None and base.get("peak_gib") is not None:
                row["peak_over_baseline"] = row["peak_gib"] > base["peak_gib"]
        return row

    def _row(self, model, workload, recipe):
        for row in self.rows:
            if (row.get("model"), row.get("workload"), row.get("recipe")) == (model, workload, recipe):
                return row
        return None

    def _record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        log(format_row(row))
        self._write()

    def _write(self) -> None:
        path = self.settings.json_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "env": self.env,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.settings).items()},
            "variants": self.variants,
            "elapsed_s": time.perf_counter() - self.started,
            "rows": self.rows,
        }
        path.write_text(json.dumps(document, indent=1, default=str))

    def _out_of_time(self, what: str) -> bool:
        deadline = self.settings.deadline_s
        if deadline is None or time.perf_counter() - self.started < deadline:
            return False
        log(f"skipped (past the {deadline:.0f} s deadline): {what}")
        return True


# -- cold start: a new process to its first vector ----------------------------------------------------------


def cold_starts(shape: str, variant: str, device, settings: Settings) -> list[dict[str, Any]]:
    """What a new backfill actor or Serve replica pays before its first vector, measured as one: a fresh
    process (`--first-vector`) that imports, builds the model, builds and warms up the embedder and embeds one
    text. Twice, with one compiler cache directory (TORCHINDUCTOR_CACHE_DIR): empty, then as the first run left
    it, which is what a cache on the cluster's shared storage gives a new node. Seconds from the process's start
    (as the parent sees it) to the first vector, and the child's own breakdown."""
    import os
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache:
        for label in ("no cache", "cache"):
            row = {"recipe": f"{variant} (start, {label})", "status": "cold start only"}
            environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            command = [sys.executable, "-m", "benchmarks.bench", "--first-vector", "--shape", shape]
            command += ["--variant", variant, "--device", str(device), "--dtype", settings.dtype]
            command += ["--max-batch-tokens", str(settings.max_batch_tokens)]
            began = time.perf_counter()
            done = subprocess.run(command, env=environ_with_path(environment), capture_output=True, text=True)
            row["cold_start_s"] = time.perf_counter() - began
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                row["status"] = f"error: exit {done.returncode}: {done.stderr.strip()[-300:]}"
            else:
                row.update(json.loads(lines[-1]))
            rows.append(row)
    return rows


def environ_with_path(environment: dict[str, str]) -> dict[str, str]:
    """`environment` with this checkout first on PYTHONPATH, so the child imports the same code."""
    import os

    root = str(Path(__file__).resolve().parents[1])
    path = environment.get("PYTHONPATH", "")
    return dict(environment, PYTHONPATH=os.pathsep.join(p for p in (root, path) if p))


def first_vector(shape: str, variant: str, device: str, dtype: str, max_batch_tokens: int) -> dict[str, Any]:
    """In a fresh process: the seconds of each part of a start, up to one text's vector (`--first-vector`)."""
    began = time.perf_counter()
    import torch

    from pipelines.config import EmbedderConfig
    from pipelines.embedder import Embedder

    figures: dict[str, Any] = {"imports_s": time.perf_counter() - began}
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    torch_dtype = getattr(
        torch, dtype if dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    )
    mark = time.perf_counter()
    model, tokenizer, image_processor = load_models(shape, device, torch_dtype)
    _sync(device)
    figures["load_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    config = EmbedderConfig(model=shape, max_batch_tokens=max_batch_tokens, **VARIANTS[variant])
    embedder = Embedder(model, tokenizer, image_processor=image_processor, config=config)
    figures["build_s"] = time.perf_counter() - mark
    figures["warm_up_s"] = embedder.warm_up()
    mark = time.perf_counter()
    vector = embedder.embed_batch(["the first request of a new replica"])
    figures["first_vector_s"] = time.perf_counter() - mark
    figures["to_first_vector_s"] = time.perf_counter() - began
    figures["graphs_compiled"] = _compiled_graphs()
    figures["dimension"] = int(vector.shape[1])
    return figures


# -- models ------------------------------------------------------------------------------------------------


def load_models(shape: str, device, dtype):
    """(generation model, tokenizer, image processor): the tiny checkpoint, or random weights at a real shape
    built directly on the device."""
    if shape == "tiny":
        from transformers import Qwen3VLForConditionalGeneration

        from pipelines.loading import load_processor_parts, resolve_model_source

        source = resolve_model_source("tiny")
        model = Qwen3VLForConditionalGeneration.from_pretrained(source, dtype=dtype).to(device).eval()
        tokenizer, image_processor = load_processor_parts(source)
        return model, tokenizer, image_processor
    from pipelines.model_shapes import random_model, shape_processor_parts

    tokenizer, image_processor = shape_processor_parts()
    model = random_model(shape, tokenizer, device=str(device), dtype=dtype, generation=True)
    return model, tokenizer, image_processor


def _convert_for(model, variant: str, saved):
    """Each FP8 variant converts the unquantized layers its own way: put back the ones `saved` holds (saved
    here the first time), convert as `variant` says. Returns what was saved."""
    from pipelines.fp8 import convert_to_fp8, decoder_linears, restore_linears
    from pipelines.loading import base_model_of

    language_model = base_model_of(model).language_model
    saved = decoder_linears(language_model) if saved is None else saved
    restore_linears(language_model, saved)
    spec = VARIANTS[variant]
    convert_to_fp8(language_model, keep=spec.get("fp8_keep", ()), fuse=spec.get("fp8_fuse", True))
    return saved


def _pad_token_id(tokenizer, config) -> int:
    for candidate in (tokenizer.pad_token_id, config.text_config.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _workload_flops(costs, items) -> float:
    from benchmarks.flops import workload_flops

    return workload_flops(costs, items)


def _backend(embedder) -> str:
    engine = embedder.engine
    if engine.layout == "padded":
        return embedder.model.config._attn_implementation
    graphs = "+graphs" if getattr(engine, "step_graphs", None) is not None else ""
    return f"{engine.backend}{'+compile' if engine.compile else ''}{graphs} ({embedder.config.engine})"


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def _pass_counters(device) -> dict[str, int]:
    """Counters whose growth over a pass says what it paid for once: compiled graphs, and on a GPU new
    device segments (the caching allocator growing) and new pinned host blocks (pinning is slow, once)."""
    import torch

    counters = {"graphs": _compiled_graphs()}
    if device.type == "cuda":
        counters["device_segments"] = int(torch.cuda.memory_stats(device).get("segment.all.allocated", 0))
        try:
            host = torch.cuda.host_memory_stats()
            counters["host_allocs"] = int(host.get("num_host_alloc", host.get("allocations.allocated", 0)))
        except Exception:  # an older torch: no host allocator statistics
            pass
    return counters


def _graph_report(row, embedder) -> None:
    """The CUDA graphs' figures (buckets, memory, capture seconds, replays) when the engine has graphs."""
    graphs = getattr(embedder.engine, "step_graphs", None)
    if graphs is None:
        return
    report = graphs.report
    row.update(
        graph_buckets=len(report.buckets),
        graph_dropped=len(report.dropped),
        graph_gib=report.memory_bytes / 2**30,
        graph_capture_s=report.seconds,
        graph_replays=report.replays,
        graph_unbucketed=report.unbucketed,
    )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _environment(device, dtype, ceiling) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "ceiling_tflops": ceiling["flops_per_s"] / 1e12,
        "ceiling": ceiling,
    }


def _error(exc: BaseException) -> str:
    traceback.print_exception(exc, file=sys.stderr)
    return f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the table ---------------------------------------------------------------------------------------------

COLUMNS = (
    ("model", "{}", 5),
    ("workload", "{}", 8),
    ("recipe", "{}", 22),
    ("items_per_s", "{:,.1f}", 9),
    ("tokens_per_s", "{:,.0f}", 10),
    ("mfu", "{:.1%}", 6),
    ("peak_gib", "{:.1f}", 6),
    ("ratio", "{:.2f}x", 6),
    ("cosine_min", "{:.4f}", 7),
    ("cold_start_s", "{:.1f}", 7),
    ("pass_s", "{}", 17),
    ("backend", "{}", 13),
)
HEADERS = (
    "model",
    "workload",
    "recipe",
    "items/s",
    "tokens/s",
    "MFU",
    "GiB",
    "x base",
    "cos min",
    "cold s",
    "passes s",
)


def format_row(row: dict[str, Any]) -> str:
    cells = []
    for key, fmt, width in COLUMNS:
        value = row.get(key)
        if key == "pass_s" and value is not None:  # every timed pass, in order: a slow first one shows
            value = "/".join(f"{seconds:.3g}" for seconds in value)
        cells.append(("-" if value is None else fmt.format(value)).rjust(width) if key != "recipe" else "")
        if key == "recipe":
            cells[-1] = str(value or "-").ljust(width)
    status = row.get("status", "ok")
    extra = ""
    if row.get("graph_buckets") is not None:
        extra += (
            f"  [graphs: {row['graph_buckets']} buckets, {row['graph_gib']:.2f} GiB, captured in "
            f"{row['graph_capture_s']:.1f} s, {row['graph_replays']} replays, {row['graph_unbucketed']} steps "
            "outside the buckets]"
        )
    costs = row.get("pass_costs") or []
    if any(any(c.values()) for c in costs):  # what a pass paid for once (compiles, allocator growth, pinning)
        extra += (
            "  [per pass: "
            + "; ".join(",".join(f"{k}+{v}" for k, v in c.items() if v) or "-" for c in costs)
            + "]"
        )
    if row.get("to_first_vector_s") is not None:
        extra += (
            f"  [child: imports {row['imports_s']:.1f} s, load {row['load_s']:.1f}, build {row['build_s']:.1f}, "
            f"warm-up {row['warm_up_s']:.1f}, first vector {row['first_vector_s']:.2f}]"
        )
    return " ".join(cells) + extra + ("" if status == "ok" else f"  [{status}]")


def format_table(rows: list[dict[str, Any]], env: dict[str, Any] | None = None) -> str:
    widths = [width for _, _, width in COLUMNS]
    header = " ".join(
        (h.ljust(w) if h == "recipe" else h.rjust(w))
        for h, w in zip((*HEADERS, "backend"), widths, strict=True)
    )
    lines = []
    if env:
        lines.append(
            f"{env['device_name']} | {env['dtype']} | torch {env['torch']} | transformers "
            f"{env['transformers']} | matmul ceiling {env['ceiling_tflops']:.3g} TFLOP/s"
        )
    lines += [header, *(format_row(row) for row in rows)]
    for (model, workload), target in TARGETS.items():
        ours = [
            r
            for r in rows
            if (r.get("model"), r.get("workload")) == (model, workload)
            and r.get("recipe") != "baseline"
            and r.get("items_per_s")
        ]
        if ours:
            best = max(ours, key=lambda r: r["items_per_s"])
            verdict = "meets" if best["items_per_s"] >= target else "misses"
            lines.append(
                f"target {model} {workload}: >= {target} items/s, >= {TARGET_MFU[(model, workload)]:.0%} MFU: "
                f"best {best['recipe']} {best['items_per_s']:,.1f} items/s, {best['mfu']:.1%} MFU ({verdict})"
            )
    for row in rows:
        if row.get("ratio_to_best_unquantized") is not None:
            lines.append(
                f"fp8 {row['model']} {row['workload']} {row['recipe']}: "
                f"{row['ratio_to_best_unquantized']:.2f}x our best bf16 (target >= 1.5x), "
                f"cosine to the baseline >= {row.get('cosine_min', float('nan')):.4f} (target >= 0.99)"
            )
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0] + " See benchmarks/NOTES.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", dest="shapes", action="append", choices=SHAPES, help="model shape (repeat)")
    p.add_argument("--workload", dest="workloads", action="append", choices=WORKLOADS, help="(repeat)")
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        choices=sorted(VARIANTS),
        help="our embedder's variants to measure (repeat; default: padded, packed, and packed+compile on a GPU)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--text-items", type=int, help="items in the text set (default: 2048; tiny: 256)")
    p.add_argument("--image-items", type=int, help="items in the image set (default: 256; tiny: 16)")
    p.add_argument("--image-side", type=int, help="image side in pixels (default: 448; tiny: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="our token budget per step")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the baseline recipe")
    p.add_argument(
        "--no-cached-compile",
        dest="cached_compile",
        action="store_false",
        help="skip the second, cache-warm compile (the cold start of a new replica with a shared cache)",
    )
    p.add_argument(
        "--passes",
        type=int,
        default=1,
        help="timed passes of each of our variants, reported as the median (the baseline runs once: its passes "
        "are long); short workloads (256 images in under a second) want 3 or more",
    )
    p.add_argument("--small-items", type=int, help="items in the text1/text8 sets (default: 256; tiny: 32)")
    p.add_argument(
        "--cold-start",
        action="append",
        choices=sorted(VARIANTS),
        metavar="VARIANT",
        help="for this variant (repeat; after its first workload): a new process's start to its first vector, "
        "with an empty compiler cache and then with the cache it left (a new actor's or replica's cold start)",
    )
    p.add_argument("--first-vector", action="store_true", help=argparse.SUPPRESS)  # the --cold-start child
    p.add_argument("--deadline-s", type=float, help="skip what is left after this many seconds")
    p.add_argument("--json", dest="json_path", type=Path, help="write the rows here (after every row)")
    p.add_argument("--show", type=Path, metavar="JSON", help="only print the table of an earlier run's JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.show is not None:
        document = json.loads(args.show.read_text())
        print(format_table(document["rows"], document.get("env")))
        return 0
    del args.show
    if args.first_vector:
        shape, variant = (args.shapes or ["tiny"])[0], (args.variants or ["packed"])[0]
        print(json.dumps(first_vector(shape, variant, args.device, args.dtype, args.max_batch_tokens)))
        return 0
    del args.first_vector
    settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    bench = Bench(settings)
    rows = bench.run()
    print(format_table(rows, bench.env))
    failed = [row for row in rows if str(row.get("status", "ok")).startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
