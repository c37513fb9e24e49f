"""Compiled graphs shared through the cluster's storage, so a new GPU node does not compile them again.

torch.compile keeps what it compiles in per-machine caches (Inductor's `TORCHINDUCTOR_CACHE_DIR` and
AOTAutograd's, on local disk). `torch.compiler.save_cache_artifacts()` serialises the entries this process
compiled, or read from those caches, into one blob; `load_cache_artifacts(blob)` writes them into this
machine's caches, so compiling the same graphs afterwards hits them: Dynamo still traces, Inductor's lowering
and code generation are skipped and, on CUDA, the Triton kernels' builds (they are bundled in the FX graph
cache entries). A CPU graph's C++ kernels are not bundled: a new CPU machine builds them again, so on a CPU the
store saves nothing measurable (the tests use it there only to check that it loads and hits).

`shared_compile_cache(config, engine)` wraps a warm-up that compiles (`compile: true`, or `auto` on CUDA):
before it, the blob stored at `compile_cache` for this key is loaded; after it, when the store had none (or
one torch cannot read) or the warm-up compiled graphs it lacks (a Serve replica warming up images after a
backfill saved texts only), this process's blob is written there: every artifact this process compiled or read
from its caches, so a superset of what it loaded. It goes to a temporary name, then is renamed: two nodes
racing never leave a half file; the last rename wins with a whole one, and a graph it lacks is added by the
next node that compiles it. The key (`cache_key`) names what the compiled code depends on: torch,
transformers and Python versions, the device (CUDA capability), the checkpoint's shapes and the options that
change the compiled graphs. Loading or saving never fails a start: a missing, corrupt or unreachable store is a
warning and the model compiles as it would without one. What happened is logged (hit/miss, bytes, seconds)
and kept on the engine as `compile_cache_report`.

Object stores go through pyarrow.fs (`s3://bucket/prefix`, `gs://...`): credentials and region come from the
environment, as the cluster's table credentials do, or from the URI's query (`?region=...&endpoint_override=
host:port&scheme=http`). The embedder config holds no storage options: it is recorded in every table's
metadata, and secrets must not be.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass

from pipelines.readers import filesystem_and_path

log = logging.getLogger(__name__)

SUFFIX = ".torch-cache"
# transformers' own bookkeeping in a checkpoint's config: nothing a compiled graph depends on
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "architectures", "_commit_hash")


@dataclass
class CacheReport:
    """What the shared compile cache did at one warm-up (also logged)."""

    location: str
    key: str
    state: str = "miss"  # hit: artifacts loaded and used; miss: none stored; error: unreadable (a warning)
    loaded_bytes: int = 0
    load_s: float = 0.0
    artifacts: int = 0  # entries written into the local caches
    cache_hits: int = 0  # Inductor and AOTAutograd cache hits during the warm-up
    cache_misses: int = 0
    compiled: int = 0  # graphs Inductor compiled from scratch during the warm-up (FX graph cache misses)
    saved_bytes: int = 0  # 0: nothing saved (the store had a blob, or saving failed)
    save_s: float = 0.0
    error: str | None = None

    def line(self) -> str:
        return "compile cache " + " ".join(f"{k}={v}" for k, v in asdict(self).items() if v not in (None, ""))


def key_parts(config, engine) -> dict:
    """What the compiled code depends on: versions, device, model shapes, the options that change graphs."""
    import torch
    import transformers

    device = engine.device
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        device_name = f"cuda-sm{major}{minor}-cu{torch.version.cuda}"
    else:
        device_name = f"{device.type}-{platform.machine()}"
    model_config = engine.model.config.to_dict()
    for name in _CONFIG_NOISE:
        model_config.pop(name, None)
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "device": device_name,
        "model": config.model,
        "model_config": model_config,
        "dtype": str(engine.dtype),
        "quantization": config.quantization,
        "fp8_keep": list(getattr(config, "fp8_keep", ())),
        "attn_implementation": config.attn_implementation,
        "engine": config.engine,
        "varlen_backend": getattr(engine, "backend", None),
        "cuda_graphs": bool(getattr(engine, "cuda_graphs", False)),
    }


def cache_key(config, engine) -> str:
    """A file name: readable torch version and device, then a hash of every part."""
    parts = key_parts(config, engine)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    readable = f"torch{parts['torch']}-{parts['device']}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in readable) + f"-{digest}{SUFFIX}"


def _cache_counters() -> tuple[int, int, int]:
    """(hits, misses) of Inductor's FX graph cache and AOTAutograd's cache, and the FX graph misses alone."""
    from torch._dynamo.utils import counters

    inductor, autograd = counters["inductor"], counters["aot_autograd"]
    hits = inductor["fxgraph_cache_hit"] + autograd["autograd_cache_hit"]
    misses = inductor["fxgraph_cache_miss"] + autograd["autograd_cache_miss"]
    return hits, misses, inductor["fxgraph_cache_miss"]


def load(report: CacheReport, filesystem, path: str) -> None:
    """Load the stored blob into this machine's compiler caches; `report.state` says what happened."""
    import torch
    from pyarrow import fs

    start = time.perf_counter()
    if filesystem.get_file_info(path).type != fs.FileType.File:
        report.state = "miss"
        return
    with filesystem.open_input_stream(path) as stream:
        blob = stream.read()
    info = torch.compiler.load_cache_artifacts(blob)  # None (and torch logs why) when it cannot be read
    report.load_s = round(time.perf_counter() - start, 3)
    report.loaded_bytes = len(blob)
    if info is None:
        raise ValueError(f"{len(blob)} bytes that torch cannot load as cache artifacts")
    report.artifacts = sum(len(keys) for keys in info.artifacts.values())
    report.state = "hit"


def save(report: CacheReport, filesystem, directory: str, path: str) -> None:
    """Write this process's compiled artifacts to the store under a temporary name, then rename it."""
    import torch

    start = time.perf_counter()
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log.warning("compile cache: torch recorded no artifacts to save at %s", report.location)
        return
    blob = saved[0]
    filesystem.create_dir(directory, recursive=True)
    partial = f"{path}.partial-{uuid.uuid4().hex}"
    try:
        with filesystem.open_output_stream(partial) as stream:
            stream.write(blob)
        filesystem.move(partial, path)
    except BaseException:
        with suppress(Exception):
            filesystem.delete_file(partial)
        raise
    report.saved_bytes = len(blob)
    report.save_s = round(time.perf_counter() - start, 3)


def _warn(report: CacheReport, what: str, error: Exception) -> None:
    report.error = f"{what}: {type(error).__name__}: {error}"
    log.warning(
        "compile cache at %s could not be %s (%s: %s); compiling without it",
        report.location,
        what,
        type(error).__name__,
        error,
    )


def compiles_at_warm_up(engine) -> bool:
    return bool(getattr(engine, "compile", False) or getattr(engine, "compile_at_warm_up", False))


@contextmanager
def shared_compile_cache(config, engine) -> Iterator[CacheReport | None]:
    """Around a warm-up: load the stored artifacts before it compiles; save this process's after when none were
    stored (or none readable) or the warm-up compiled graphs they lack. Yields the report (None when there is no `compile_cache` or the engine does not compile)."""
    location = getattr(config, "compile_cache", None)
    if not location or not compiles_at_warm_up(engine):
        yield None
        return
    report = CacheReport(location=location, key="")
    filesystem = directory = path = None
    try:
        report.key = cache_key(config, engine)
        filesystem, directory = filesystem_and_path(location)
        path = f"{directory}/{report.key}"
        load(report, filesystem, path)
    except Exception as error:
        report.state = "error"
        _warn(report, "read", error)
    before = _cache_counters()
    yield report
    report.cache_hits, report.cache_misses, report.compiled = (
        now - then for now, then in zip(_cache_counters(), before, strict=True)
    )
    # none stored, a corrupt one, or one without the graphs compiled here: replace it with this process's
    if (report.state != "hit" or report.compiled) and filesystem is not None:
        try:
            save(report, filesystem, directory, path)
        except Exception as error:
            _warn(report, "written", error)
    engine.compile_cache_report = report
    log.info(report.line())
