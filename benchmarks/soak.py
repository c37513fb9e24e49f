"""Soak test of the Serve endpoint: mixed good and bad traffic for a given time, with the memory (RSS) and open
file descriptors of the Serve processes sampled as it runs, and every answer counted by status.

    # start Ray Serve here with the tiny model (and a small table for /search), then 10 minutes of traffic
    python -m benchmarks.soak --serve tiny --duration 600 --json soak.json
    # against an endpoint that is already running on this machine (its processes are sampled if local)
    python -m benchmarks.soak --url http://127.0.0.1:8000 --duration 600

Not a unit test. Each of `--concurrency` workers keeps one request in flight, drawing from a fixed, seeded mix:
good requests (texts, an image, a text+image pair, /search with and without a filter) and, `--bad-fraction` of
the time, requests the server must refuse with a 4xx (malformed or deeply nested JSON, a wrong content type, too
many items, a text too long, an oversized, truncated or non-image image, a URL, a bad filter, an unknown field,
a body over the size limit). Every `--sample-every` seconds it prints one line: requests by status class in
that interval, latency, and per process kind (Serve's proxy, the controller, the ingress and the model
replicas) the RSS and open file descriptors. At the end it compares the first sample after `--warmup` with the
last one and exits 1 if any answer was a 5xx or a connection error, if a good request was not answered 2xx or
a bad one 4xx, or if RSS grew by more than `--max-rss-growth-mib` (when given).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

# -- the traffic -----------------------------------------------------------------------------------------


def _png(side: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bomb_png(side: int) -> bytes:
    """A PNG header declaring `side` x `side` pixels (and one row of data): refused from its header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" + b"\x80" * side))
        + chunk(b"IEND", b"")
    )


JSON = "application/json"


def traffic(max_items: int, max_text_chars: int, max_body_bytes: int) -> tuple[list, list]:
    """(good, bad) requests as (name, path, body bytes, content type)."""
    image = _b64(_png(48, 1))

    def body(value: Any) -> bytes:
        return json.dumps(value).encode()

    good = [
        ("one text", "/v1/embeddings", body({"input": "a red circle on a white background"}), JSON),
        ("texts", "/v1/embeddings", body({"input": ["a blue square", "two green stars", "stripes"]}), JSON),
        ("image", "/v1/embeddings", body({"input": [{"image": image}]}), JSON),
        ("pair", "/v1/embeddings", body({"input": [{"text": "a caption", "image": image}]}), JSON),
        ("base64 vectors", "/v1/embeddings", body({"input": "x", "encoding_format": "base64"}), JSON),
        ("search", "/search", body({"text": "a red circle", "top_k": 3}), JSON),
        (
            "search+filter",
            "/search",
            body({"text": "shapes", "top_k": 3, "filter": "modality = 'text'"}),
            JSON,
        ),
    ]
    truncated = _png(48, 2)
    bad = [
        ("malformed json", "/v1/embeddings", b'{"input": ["a", }', JSON),
        ("deep json", "/v1/embeddings", b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON),
        ("text/plain", "/v1/embeddings", body({"input": "a"}), "text/plain"),
        ("form", "/search", body({"text": "a"}), "application/x-www-form-urlencoded"),
        ("too many items", "/v1/embeddings", body({"input": ["a"] * (max_items + 1)}), JSON),
        ("text too long", "/v1/embeddings", body({"input": "w" * (max_text_chars + 1)}), JSON),
        ("image too large", "/v1/embeddings", body({"input": [{"image": _b64(_bomb_png(20_000))}]}), JSON),
        ("truncated image", "/v1/embeddings", body({"input": [{"image": _b64(truncated[:300])}]}), JSON),
        ("not an image", "/v1/embeddings", body({"input": [{"image": _b64(b"hello")}]}), JSON),
        ("image url", "/v1/embeddings", body({"input": [{"image": "https://example.com/a.png"}]}), JSON),
        ("unknown field", "/v1/embeddings", body({"input": "a", "temperature": 1}), JSON),
        ("bad filter", "/search", body({"text": "a", "filter": "modality = 'x'; DROP TABLE vectors"}), JSON),
        ("body too large", "/v1/embeddings", b'{"input": "' + b"a" * (max_body_bytes + 1) + b'"}', JSON),
    ]
    return good, bad


# -- the Serve processes ---------------------------------------------------------------------------------


def serve_processes(ours_only: bool = False) -> dict[str, list]:
    """This machine's Serve processes by kind (psutil processes): proxy, controller, ingress and model replicas.
    `ours_only`: only this process's descendants (the Ray instance `--serve` started), not another Serve app's
    processes on a shared machine, which carry the same titles."""
    import psutil

    from serve.app import APP_NAME, INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT

    titles = {
        "proxy": "ray::ProxyActor",
        "controller": "ray::ServeController",
        "ingress": f"ray::ServeReplica:{APP_NAME}:{INGRESS_DEPLOYMENT}",
        "model": f"ray::ServeReplica:{APP_NAME}:{MODEL_DEPLOYMENT}",
    }
    found: dict[str, list] = {kind: [] for kind in titles}
    candidates = psutil.Process().children(recursive=True) if ours_only else psutil.process_iter()
    for process in candidates:
        try:
            command = " ".join(process.cmdline() or [])
        except psutil.Error:
            continue
        for kind, title in titles.items():
            if command.startswith(title):
                found[kind].append(process)
    return found


def sample_processes(ours_only: bool = False) -> dict[str, dict[str, float]]:
    """RSS (MiB) and open file descriptors, summed over the processes of each kind."""
    import psutil

    out = {}
    for kind, processes in serve_processes(ours_only).items():
        rss = fds = 0.0
        for process in processes:
            try:
                rss += process.memory_info().rss / 2**20
                fds += process.num_fds()
            except psutil.Error:
                continue
        out[kind] = {"processes": len(processes), "rss_mib": round(rss, 1), "fds": int(fds)}
    return out


# -- the driver ------------------------------------------------------------------------------------------


KINDS = ("2xx", "4xx", "5xx", "errors", "unexpected")


class Interval:
    """What happened since the last sample."""

    def __init__(self):
        self.statuses: Counter = Counter()
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def add(self, name: str, good: bool, status: int | str, latency_s: float, message: str | None) -> None:
        kind = f"{status // 100}xx" if isinstance(status, int) else "errors"
        self.statuses[kind] += 1
        self.latencies.append(latency_s)
        # a good request must get a 2xx, a bad one a 4xx
        unexpected = kind != ("2xx" if good else "4xx")
        self.statuses["unexpected"] += unexpected
        if unexpected and len(self.failures) < 5:
            self.failures.append(f"{name}: {status} {(message or '')[:200]}")


async def soak(
    url: str,
    good: list,
    bad: list,
    *,
    duration_s: float,
    concurrency: int,
    bad_fraction: float,
    sample_every_s: float,
    headers: dict[str, str],
    timeout_s: float = 60,
    seed: int = 0,
    ours_only: bool = False,
) -> list[dict[str, Any]]:
    import aiohttp

    rng = np.random.default_rng(seed)
    interval = Interval()
    samples: list[dict[str, Any]] = []
    began = time.monotonic()
    deadline = began + duration_s

    def record_sample() -> None:
        nonlocal interval
        done, interval = interval, Interval()
        latencies = np.asarray(done.latencies) * 1000 if done.latencies else np.zeros(1)
        sample = {
            "t_s": round(time.monotonic() - began, 1),
            **{kind: done.statuses.get(kind, 0) for kind in KINDS},
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "processes": sample_processes(ours_only),
            "failures": done.failures,
        }
        samples.append(sample)
        print(format_sample(sample), flush=True)
        for failure in done.failures:
            print(f"  unexpected: {failure}", flush=True)

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                is_good = rng.random() >= bad_fraction
                pool = good if is_good else bad
                name, path, body, content_type = pool[int(rng.integers(len(pool)))]
                start = time.monotonic()
                message = None
                try:
                    async with session.post(
                        url + path, data=body, headers={**headers, "Content-Type": content_type}
                    ) as response:
                        payload = await response.read()
                        status: int | str = response.status
                        if (status >= 300) if is_good else not (400 <= status < 500):
                            message = payload.decode(errors="replace")
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status, message = type(exc).__name__, str(exc)
                interval.add(name, is_good, status, time.monotonic() - start, message)

        async def sampler() -> None:
            record_sample()  # the baseline, before any traffic
            while time.monotonic() < deadline:
                await asyncio.sleep(min(sample_every_s, max(0.0, deadline - time.monotonic())))
                record_sample()

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    record_sample()  # the requests that finished after the last tick
    return samples


def format_sample(sample: dict[str, Any]) -> str:
    kinds = ", ".join(
        f"{kind} {v['rss_mib']:.0f} MiB/{v['fds']} fds"
        for kind, v in sample["processes"].items()
        if v["processes"]
    )
    return (
        f"t={sample['t_s']:>7.1f}s  2xx {sample['2xx']:>5}  4xx {sample['4xx']:>5}  5xx {sample['5xx']:>3}  "
        f"errors {sample['errors']:>3}  unexpected {sample['unexpected']:>3}  p50 {sample['p50_ms']:>7.1f} ms  p99 {sample['p99_ms']:>7.1f} ms  | {kinds}"
    )


def summarize(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Totals, and per process kind the RSS and descriptors of the first sample after the warm-up and the last,
    and their peaks after the warm-up (Serve may briefly run two processes of a kind while starting)."""
    totals = {kind: sum(s[kind] for s in samples) for kind in KINDS}
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]
    first, last = after[0], samples[-1]
    drift = {}
    for kind, end in last["processes"].items():
        start = first["processes"].get(kind, {"rss_mib": 0.0, "fds": 0})
        if end["processes"]:
            drift[kind] = {
                "rss_mib": [start["rss_mib"], end["rss_mib"]],
                "rss_growth_mib": round(end["rss_mib"] - start["rss_mib"], 1),
                "fds": [start["fds"], end["fds"]],
                "peak_rss_mib": max(s["processes"][kind]["rss_mib"] for s in after),
                "peak_fds": max(s["processes"][kind]["fds"] for s in after),
            }
    return {"totals": totals, "from_t_s": first["t_s"], "to_t_s": last["t_s"], "processes": drift}


# -- a local endpoint ------------------------------------------------------------------------------------


def start_local_endpoint(model: str, workdir: Path, serve_options: dict[str, Any]) -> tuple[str, Any]:
    """Ray and Serve on 127.0.0.1 with `model` and a small vectors table (the sample texts, embedded by the
    same model) for /search; returns the URL once /healthz answers 200, and the serve config."""
    import pyarrow as pa
    import ray
    from ray import serve

    from benchmarks.load_test import _free_port, _wait_healthy
    from pipelines.config import Config, EmbedderConfig, ServeConfig, TableConfig
    from pipelines.embedder import Embedder
    from pipelines.sample import sample_texts
    from pipelines.table import connect, vectors_schema
    from serve.app import APP_NAME, app_for

    embedder_config = EmbedderConfig(model=model, device="cpu")
    table = TableConfig(uri=str(workdir / "lancedb"))
    embedder = Embedder.from_config(embedder_config)
    rows = sample_texts()
    vectors = embedder.embed_batch([row["text"] for row in rows])
    schema = vectors_schema(embedder.config, vectors.shape[1])
    created = connect(table).create_table(table.name, schema=schema, mode="overwrite")
    created.add(
        pa.table(
            {
                "id": [row["id"] for row in rows],
                "modality": ["text"] * len(rows),
                "text": [row["text"] for row in rows],
                "image_uri": [None] * len(rows),
                "vector": pa.array(list(vectors), type=pa.list_(pa.float32(), vectors.shape[1])),
            },
            schema=schema,
        )
    )
    del embedder
    port = serve_options.pop("port", None) or _free_port()
    config = Config(embedder=embedder_config, table=table, serve=ServeConfig(**serve_options))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_for(config), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, timeout_s=600)
    return url, config.serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running endpoint, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--serve", metavar="MODEL", help="start Ray Serve here with MODEL (tiny, or a checkpoint)"
    )
    p.add_argument("--duration", type=float, default=600, help="seconds of traffic (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    p.add_argument(
        "--bad-fraction", type=float, default=0.5, help="share of bad requests (default: %(default)s)"
    )
    p.add_argument(
        "--sample-every", type=float, default=30, help="seconds between samples (default: %(default)s)"
    )
    p.add_argument("--warmup", type=float, default=60, help="compare from the first sample after this (s)")
    p.add_argument("--max-rss-growth-mib", type=float, help="exit 1 if any process kind's RSS grew more")
    p.add_argument("--api-key-env", default="VLM_EMBED_API_KEY", help="environment variable with the API key")
    p.add_argument("--json", type=Path, help="also write every sample and the summary here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = os.environ.get(args.api_key_env)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with tempfile.TemporaryDirectory(prefix="vlm-embed-soak-") as workdir:
        if args.serve:
            url, limits = start_local_endpoint(args.serve, Path(workdir), {})
        else:
            from pipelines.config import ServeConfig

            url, limits = args.url.rstrip("/"), ServeConfig()  # the default limits: set yours if they differ
        good, bad = traffic(limits.max_items_per_request, limits.max_text_chars, limits.max_body_bytes)
        print(
            f"soak {url}: {args.duration:g} s, concurrency {args.concurrency}, {args.bad_fraction:.0%} bad "
            f"({len(good)} good and {len(bad)} bad kinds of request)",
            flush=True,
        )
        samples = asyncio.run(
            soak(
                url,
                good,
                bad,
                duration_s=args.duration,
                concurrency=args.concurrency,
                bad_fraction=args.bad_fraction,
                sample_every_s=args.sample_every,
                headers=headers,
                ours_only=bool(args.serve),
            )
        )
        summary = summarize(samples, args.warmup)
        print(f"totals: {summary['totals']}", flush=True)
        for kind, v in summary["processes"].items():
            print(
                f"{kind}: RSS {v['rss_mib'][0]:.0f} -> {v['rss_mib'][1]:.0f} MiB ({v['rss_growth_mib']:+.1f}, "
                f"peak {v['peak_rss_mib']:.0f}), fds {v['fds'][0]} -> {v['fds'][1]} (peak {v['peak_fds']}), "
                f"from t={summary['from_t_s']:g} s to t={summary['to_t_s']:g} s",
                flush=True,
            )
        if args.json:
            args.json.write_text(json.dumps({"url": url, "samples": samples, "summary": summary}, indent=2))
        if args.serve:
            import ray

            ray.shutdown()
    failed = []
    totals = summary["totals"]
    if totals["5xx"] or totals["errors"] or totals["unexpected"]:
        failed.append(
            f"{totals['5xx']} 5xx, {totals['errors']} connection errors, {totals['unexpected']} answers of the "
            "wrong kind (a good request not 2xx, a bad one not 4xx)"
        )
    if args.max_rss_growth_mib is not None:
        grown = {k: v["rss_growth_mib"] for k, v in summary["processes"].items()}
        failed += [f"{k} RSS grew {g:+.1f} MiB" for k, g in grown.items() if g > args.max_rss_growth_mib]
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
