"""Load test of the Serve endpoint: requests/s, items/s and latency percentiles at given concurrencies.

    # against an endpoint that is already running (vlm-embed serve ...)
    python -m benchmarks.load_test --url http://127.0.0.1:8000 --concurrency 1 8 64
    # start Ray Serve here first, with the tiny model, a checkpoint, or a random-weight real shape (2b, 8b)
    python -m benchmarks.load_test --serve tiny --concurrency 1 8 64 --requests 300
    python -m benchmarks.load_test --serve 2b --concurrency 1 8 64 --duration 20 --min-speedup 5 --json serve-2b.json

Not a unit test: it prints one row per concurrency (and writes JSON with --json). Each worker keeps one request
in flight; bodies are OpenAI-style (`{"input": [...]}`) with random words from a fixed seed, optionally with an
inline image per item. `--min-speedup X` exits 1 unless requests/s at the highest concurrency is at least X times
that at the lowest (dynamic batching is what makes that possible). With `--serve 2b|8b` a random-weight model at
the real shape (`pipelines.model_shapes`) is saved as a checkpoint in a temporary folder, so replicas load it the
way they load any checkpoint; speed does not depend on weight values.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WORDS = [
    "image",
    "text",
    "vector",
    "model",
    "search",
    "query",
    "photo",
    "caption",
    "document",
    "table",
    "embed",
    "batch",
    "token",
    "layer",
    "pooling",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "star",
    "ring",
    "stripe",
    "cluster",
    "replica",
    "request",
    "latency",
    "answer",
    "server",
    "client",
]


@dataclass
class LoadResult:
    """What one run at one concurrency saw: statuses, latencies of successful requests, items embedded."""

    concurrency: int
    statuses: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    items: int = 0
    wall_s: float = 0.0
    retry_after: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)

    def add(self, status: int | str, latency_s: float, items: int, retry_after=None, message=None) -> None:
        self.statuses[status] += 1
        if status == 200:
            self.latencies_s.append(latency_s)
            self.items += items
        if retry_after is not None:
            self.retry_after[retry_after] += 1
        if message:
            self.messages[message[:120]] += 1

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses[200]

    def count(self, kind: str) -> int:
        """`4xx`, `5xx`, or `errors` (no HTTP answer: connection failures, client timeouts)."""
        if kind == "errors":
            return sum(n for s, n in self.statuses.items() if not isinstance(s, int))
        low = int(kind[0]) * 100
        return sum(n for s, n in self.statuses.items() if isinstance(s, int) and low <= s < low + 100)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s) * 1000
        pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
        wall = max(self.wall_s, 1e-9)
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": self.ok,
            "4xx": self.count("4xx"),
            "5xx": self.count("5xx"),
            "errors": self.count("errors"),
            "requests_per_s": self.ok / wall,
            "items_per_s": self.items / wall,
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "wall_s": self.wall_s,
            "statuses": {str(k): v for k, v in self.statuses.items()},
        }


HEADER = (
    f"{'conc':>5} {'requests':>8} {'ok':>7} {'4xx':>5} {'5xx':>5} {'errors':>6} "
    f"{'req/s':>9} {'items/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
)


def format_row(s: dict[str, Any]) -> str:
    return (
        f"{s['concurrency']:>5} {s['requests']:>8} {s['ok']:>7} {s['4xx']:>5} {s['5xx']:>5} {s['errors']:>6} "
        f"{s['requests_per_s']:>9.1f} {s['items_per_s']:>9.1f} {s['p50_ms']:>8.1f} {s['p95_ms']:>8.1f} "
        f"{s['p99_ms']:>8.1f}"
    )


# -- request bodies ----------------------------------------------------------------------------------------


def make_bodies(
    count: int = 256, items_per_request: int = 1, words: int = 24, image_side: int = 0, seed: int = 0
) -> list[tuple[bytes, int]]:
    """`count` distinct JSON bodies (bytes, items): random word texts, lengths log-normal around `words`."""
    rng = np.random.default_rng(seed)
    image = _b64_png(image_side, seed) if image_side else None
    bodies = []
    for _ in range(count):
        inputs: list[Any] = []
        for _ in range(items_per_request):
            n = int(np.clip(rng.lognormal(np.log(words), 0.5), 1, 20 * words))
            text = " ".join(rng.choice(WORDS, n))
            inputs.append({"text": text, "image": image} if image else text)
        bodies.append((json.dumps({"input": inputs}).encode(), items_per_request))
    return bodies


def _b64_png(side: int, seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# -- the driver --------------------------------------------------------------------------------------------


async def drive(
    url: str,
    bodies: list[tuple[bytes, int]],
    *,
    concurrency: int,
    requests: int | None = None,
    duration_s: float | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    stop: threading.Event | None = None,
    on_result: Callable[[int | str], None] | None = None,
) -> LoadResult:
    """Keep `concurrency` requests in flight until `requests` were sent, `duration_s` passed or `stop` is set."""
    import aiohttp

    if requests is None and duration_s is None and stop is None:
        raise ValueError("give requests, duration_s or stop")
    result = LoadResult(concurrency)
    numbers = itertools.count()
    deadline = None if duration_s is None else time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency)
    session_headers = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession(
        connector=connector, headers=session_headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as session:

        async def worker() -> None:
            while True:
                number = next(numbers)
                if requests is not None and number >= requests:
                    return
                if (deadline is not None and time.perf_counter() >= deadline) or (
                    stop is not None and stop.is_set()
                ):
                    return
                body, items = bodies[number % len(bodies)]
                start = time.perf_counter()
                retry_after = message = None
                try:
                    async with session.post(url, data=body) as response:
                        payload = await response.read()
                        status: int | str = response.status
                        retry_after = response.headers.get("Retry-After")
                        if status != 200:
                            message = payload.decode(errors="replace")
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                result.add(status, time.perf_counter() - start, items, retry_after, message)
                if on_result is not None:
                    on_result(status)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - began
    return result


def run_levels(
    url: str,
    bodies,
    concurrencies: list[int],
    *,
    requests: int | None,
    duration_s: float | None,
    warmup: int | None,
    headers: dict[str, str],
    cpu: ServeCpu | None = None,
) -> list[dict[str, Any]]:
    """One run per concurrency, each after `warmup` requests (default: 2 x concurrency); prints rows as it goes.
    With `cpu` (a local endpoint), also the CPU time each kind of Serve process spent per request."""
    print(HEADER, flush=True)
    rows = []
    for concurrency in concurrencies:
        count = 2 * concurrency if warmup is None else warmup
        if count:
            asyncio.run(drive(url, bodies, concurrency=concurrency, requests=count, headers=headers))
        before = replica_stats(url, headers)
        cpu_before = cpu.sample() if cpu else None
        result = asyncio.run(
            drive(
                url,
                bodies,
                concurrency=concurrency,
                requests=requests,
                duration_s=duration_s,
                headers=headers,
            )
        )
        summary = result.summary()
        if cpu and result.requests:
            summary["cpu_ms_per_request"] = cpu.per_request(cpu_before, cpu.sample(), result.requests)
        after = replica_stats(url, headers)
        if before and after and after.get("batches", 0) > before.get("batches", 0):
            batches = after["batches"] - before["batches"]
            summary["server_batches"] = batches
            summary["server_mean_batch"] = (after["batched_items"] - before["batched_items"]) / batches
            summary["server_batches_per_s"] = batches / summary["wall_s"]  # the model replicas' step rate
            if "model_calls" in after:  # calls from the ingress replicas: each carries one or more requests
                summary["server_calls"] = after["model_calls"] - before.get("model_calls", 0)
            if "forward_s" in after:  # the forward passes of the replica that answered /healthz
                forward = after["forward_s"] - before.get("forward_s", 0.0)
                summary["forward_busy"] = forward / summary["wall_s"]
                summary["forward_cpu_ms_per_item"] = (
                    1000
                    * (after["forward_cpu_s"] - before.get("forward_cpu_s", 0.0))
                    / max(after["batched_items"] - before["batched_items"], 1)
                )
            summary["device"] = after.get("device")
        rows.append(summary)
        print(format_row(summary), flush=True)
        if "server_batches" in summary:
            print(
                f"      server: {summary['server_batches']} batches ({summary['server_batches_per_s']:.1f}/s), "
                f"{summary['server_mean_batch']:.1f} items each on average, on {summary['device']}"
                + (f"; {summary['server_calls']} calls from the ingress" if "server_calls" in summary else "")
                + (
                    f"; forward passes {100 * summary['forward_busy']:.0f}% of the time, their thread "
                    f"{summary['forward_cpu_ms_per_item']:.2f} CPU ms per item"
                    if "forward_busy" in summary
                    else ""
                ),
                flush=True,
            )
        if "cpu_ms_per_request" in summary:
            print(f"      cpu ms/request: {ServeCpu.describe(summary['cpu_ms_per_request'])}", flush=True)
        for message, count in result.messages.most_common(3):
            print(f"      {count} x {message}", flush=True)
    return rows


class ServeCpu:
    """CPU time (user + system) of this machine's processes by role: Serve's HTTP proxy (or HAProxy, in
    high-throughput mode), the ingress replicas, the model replicas, and this load test's client. Per request,
    it shows which single process a request rate would saturate first (the proxy and each replica are one
    process each)."""

    def __init__(self, app: str = "vlm-embed"):
        from serve.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT

        self.titles = {  # how each role's processes' command lines begin
            "proxy": "ray::ProxyActor",
            "ingress": f"ray::ServeReplica:{app}:{INGRESS_DEPLOYMENT}",
            "model": f"ray::ServeReplica:{app}:{MODEL_DEPLOYMENT}",
        }
        self.roles = ["proxy", "haproxy", "ingress", "model", "client"]

    def role_of(self, pid: int, cmdline: list[str]) -> str | None:
        if pid == os.getpid():
            return "client"
        if cmdline and os.path.basename(cmdline[0]) == "haproxy":
            return "haproxy"
        command = " ".join(cmdline)
        return next((role for role, title in self.titles.items() if command.startswith(title)), None)

    @classmethod
    def local(cls) -> ServeCpu | None:
        try:
            import psutil  # noqa: F401 (comes with Ray)
        except ImportError:
            return None
        return cls()

    def sample(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far of every process of each role, by pid (processes come and go with replicas).
        Only this process and its descendants count (the local Ray instance it started): another Serve app on a
        shared machine, whose processes carry the same titles, is not ours."""
        import psutil

        seen: dict[str, dict[int, float]] = {role: {} for role in self.roles}
        me = psutil.Process()
        try:
            ours = [me, *me.children(recursive=True)]
        except psutil.Error:
            ours = [me]
        for process in ours:
            try:
                cmdline = process.cmdline()
            except psutil.Error:
                continue
            role = self.role_of(process.pid, cmdline or [])
            if role is None:
                continue
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            seen[role][process.pid] = times.user + times.system
        return seen

    @staticmethod
    def per_request(before, after, requests: int) -> dict[str, dict[str, float]]:
        """Milliseconds of CPU per request for each role between two samples, and how many processes."""
        out = {}
        for role, processes in after.items():
            spent = sum(seconds - before.get(role, {}).get(pid, 0.0) for pid, seconds in processes.items())
            out[role] = {"ms": 1000 * spent / requests, "processes": len(processes)}
        return out

    @staticmethod
    def describe(per_role: dict[str, dict[str, float]]) -> str:
        return ", ".join(
            f"{role} {v['ms']:.1f} ({v['processes']} process{'es' if v['processes'] != 1 else ''})"
            for role, v in per_role.items()
            if v["processes"]
        )


def replica_stats(url: str, headers: dict[str, str]) -> dict[str, Any] | None:
    """`/healthz` of the replica that answers (batches so far, device); None if it does not answer."""
    import urllib.error
    import urllib.request

    base = url.rsplit("/v1/", 1)[0]
    try:
        request = urllib.request.Request(f"{base}/healthz", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


# -- a local endpoint --------------------------------------------------------------------------------------


def random_checkpoint(shape: str, directory: Path, device: str) -> Path:
    """Save a random-weight model at a real shape, with its tokenizer and image processor, as a checkpoint."""
    import torch

    from pipelines.model_shapes import random_model, shape_processor_parts

    tokenizer, image_processor = shape_processor_parts()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = random_model(shape, tokenizer, device=device, dtype=dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return directory


# `--serve 2b|8b` on a GPU: the fast path, and ingress replicas enough to keep one model replica's batches full
GPU_EMBEDDER_DEFAULTS = {"attention_layout": "packed", "compile": True}
GPU_SERVE_DEFAULTS = {"ingress_replicas": 4, "ingress_num_cpus": 1}


def start_local_endpoint(model: str, embedder_options: dict, serve_options: dict, workdir: Path) -> str:
    """Start local Ray and Serve on 127.0.0.1 with the app for `model`; returns the URL once /healthz is 200."""
    import ray
    from ray import serve

    from pipelines.config import Config, EmbedderConfig, ServeConfig
    from serve.app import APP_NAME, app_for

    if model in ("2b", "8b"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if (
            device == "cuda"
        ):  # what a GPU deployment should run (README, Serving), unless the options say else
            embedder_options = {**GPU_EMBEDDER_DEFAULTS, **embedder_options}
            serve_options = {**GPU_SERVE_DEFAULTS, **serve_options}
        print(f"embedder options {embedder_options}, serve options {serve_options}", flush=True)
        began = time.perf_counter()
        model = str(random_checkpoint(model, workdir / f"random-{model}", device))
        print(
            f"saved a random-weight {Path(model).name} checkpoint in {time.perf_counter() - began:.1f} s",
            flush=True,
        )
    port = serve_options.pop("port", None) or _free_port()
    config = Config(
        embedder=EmbedderConfig(model=model, **embedder_options), serve=ServeConfig(**serve_options)
    )
    if config.serve.high_throughput:  # HAProxy in front of the ingress replicas (serve.high_throughput)
        from serve.high_throughput import enable_for_local_ray

        for line in enable_for_local_ray():
            print(line, flush=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    began = time.perf_counter()
    serve.run(app_for(config), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, timeout_s=900)
    print(f"serving {model} at {url} (ready in {time.perf_counter() - began:.1f} s)", flush=True)
    return url


def _wait_healthy(url: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s} s")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _options(pairs: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs, values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{flag} takes KEY=VALUE, got {pair!r}")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return options


# -- command line ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load_test",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running endpoint, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--serve", metavar="MODEL", help="start Serve here first: tiny, 2b, 8b or a checkpoint"
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64], help="levels (default: 1 8 64)")
    p.add_argument("--requests", type=int, default=500, help="requests per level (default: 500)")
    p.add_argument("--duration", type=float, help="seconds per level instead of a request count")
    p.add_argument(
        "--warmup", type=int, default=None, help="requests before each level (default: 2 x concurrency)"
    )
    p.add_argument("--items-per-request", type=int, default=1, help="inputs per request (default: 1)")
    p.add_argument("--words", type=int, default=24, help="median words per text (default: 24)")
    p.add_argument(
        "--image-side", type=int, default=0, help="add a SIDE x SIDE image to every item (default: none)"
    )
    p.add_argument("--api-key-env", default="VLM_EMBED_API_KEY", help="environment variable with the API key")
    p.add_argument("--embedder-option", action="append", default=[], metavar="KEY=VALUE", help="with --serve")
    p.add_argument("--serve-option", action="append", default=[], metavar="KEY=VALUE", help="with --serve")
    p.add_argument("--min-speedup", type=float, help="exit 1 unless req/s(max conc) >= X * req/s(min conc)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = os.environ.get(args.api_key_env)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with tempfile.TemporaryDirectory(prefix="vlm-embed-load-") as workdir:
        url = args.url
        if args.serve:
            url = start_local_endpoint(
                args.serve,
                _options(args.embedder_option, "--embedder-option"),
                _options(args.serve_option, "--serve-option"),
                Path(workdir),
            )
        bodies = make_bodies(
            items_per_request=args.items_per_request, words=args.words, image_side=args.image_side
        )
        levels = sorted(set(args.concurrency))
        print(
            f"POST {url}/v1/embeddings: {args.items_per_request} item(s) per request, ~{args.words} words"
            + (f", {args.image_side}x{args.image_side} images" if args.image_side else ""),
            flush=True,
        )
        rows = run_levels(
            url.rstrip("/") + "/v1/embeddings",
            bodies,
            levels,
            requests=None if args.duration else args.requests,
            duration_s=args.duration,
            warmup=args.warmup,
            headers=headers,
            cpu=ServeCpu.local() if args.serve else None,
        )
        speedup = rows[-1]["requests_per_s"] / max(rows[0]["requests_per_s"], 1e-9) if len(rows) > 1 else None
        if speedup is not None:
            print(f"speedup at concurrency {levels[-1]} over {levels[0]}: {speedup:.2f}x", flush=True)
        if args.json:
            args.json.write_text(
                json.dumps({"url": url, "model": args.serve, "rows": rows, "speedup": speedup}, indent=2)
            )
        if args.serve:
            import ray

            # the local instance goes with everything in it; Serve's own shutdown would wait for a graceful
            # drain (in high-throughput mode ~30 s for the ingress replicas)
            ray.shutdown()
        if args.min_speedup is not None and (speedup is None or speedup < args.min_speedup):
            print(f"FAILED: speedup {speedup} is below --min-speedup {args.min_speedup}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
