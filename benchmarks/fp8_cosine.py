"""How far each FP8 variant moves the vectors: cosine to the unquantized model, per variant, on any device.

    python -m benchmarks.fp8_cosine                              # the tiny checkpoint (seconds)
    python -m benchmarks.fp8_cosine --shape 2b --layers 28 --items 12 --json out.json   # random 2B weights

It builds one model (the tiny checkpoint, or random weights at a real shape, as the benchmark does), embeds the
benchmark's synthetic texts (`pipelines.synthetic`, log-normal lengths) in bf16 and in float32, then converts
the decoder layers to FP8 one variant at a time (`VARIANTS`: what `fp8_keep` leaves in bf16, fused or not),
putting the original layers back between variants, and prints each variant's cosine (min, mean) to both
references (`--device cuda`: the same on a GPU, where the 28 layers of 2B take seconds). Speed is not measured here: on a CPU `torch._scaled_mm` is a reference kernel (benchmarks/bench.py
times the variants on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# name: (fp8_keep, fused)
VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "all, unfused": ((), False),
    "all": ((), True),
    "keep first+last": (("first", "last"), True),
    "keep down_proj": (("down_proj",), True),
    "keep first+last+down_proj": (("first", "last", "down_proj"), True),
}


def build(shape: str, layers: int | None, dtype, device: str = "cpu"):
    """(model, tokenizer, image processor): the tiny checkpoint, or random weights at `shape` with `layers`
    decoder layers (the vision tower cut to 3 blocks: the texts measured here never reach it)."""
    import torch

    from benchmarks.bench import load_models

    if shape == "tiny":
        return load_models("tiny", torch.device(device), dtype)
    from transformers import Qwen3VLForConditionalGeneration

    from pipelines.model_shapes import model_from_config, shape_config, shape_processor_parts

    tokenizer, image_processor = shape_processor_parts()
    config = shape_config(shape, tokenizer)
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    config.vision_config.depth = 3
    config.vision_config.deepstack_visual_indexes = [0, 1, 2]
    config._attn_implementation = "sdpa"
    model = model_from_config(Qwen3VLForConditionalGeneration, config, device=device, dtype=dtype)
    return model, tokenizer, image_processor


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def measure(
    shape: str = "tiny",
    layers: int | None = None,
    items: int = 12,
    seed: int = 0,
    variants=None,
    device: str = "cpu",
    log=print,
) -> dict:
    """Every variant's cosines to the bf16 and the float32 vectors of the same model and texts."""
    import torch

    from pipelines import synthetic
    from pipelines.embedder import Embedder
    from pipelines.fp8 import convert_to_fp8, decoder_linears, restore_linears

    began = time.perf_counter()
    model, tokenizer, image_processor = build(shape, layers, torch.bfloat16, device)
    rng = np.random.default_rng(seed)
    prepared = [
        synthetic.text_item(rng, int(n), model.config) for n in synthetic.lognormal_lengths(rng, items)
    ]
    result = {
        "shape": shape,
        "decoder_layers": model.config.text_config.num_hidden_layers,
        "items": items,
        "tokens": int(sum(p.num_tokens for p in prepared)),
        "device": device,
        "variants": {},
    }
    log(f"{shape}: {result['decoder_layers']} decoder layers, {items} texts, {result['tokens']} tokens")

    def embed(**options) -> np.ndarray:
        embedder = Embedder(
            model, tokenizer, image_processor=image_processor, attention_layout="padded", **options
        )
        return embedder.embed_prepared(prepared)

    bf16 = embed()
    model.float()  # the same weights (bf16 values), float32 arithmetic
    full = embed()
    model.bfloat16()
    reference = cosines(bf16, full)
    result["bf16_vs_float32"] = {"min": float(reference.min()), "mean": float(reference.mean())}
    log(f"bf16 vs float32: min {reference.min():.5f} mean {reference.mean():.5f}")
    language_model = model.model.language_model
    saved = decoder_linears(language_model)
    for name in variants or VARIANTS:
        keep, fuse = VARIANTS[name]
        restore_linears(language_model, saved)
        convert_to_fp8(language_model, keep=keep, fuse=fuse)
        t = time.perf_counter()
        got = embed(quantization="fp8", fp8_keep=keep)
        to_bf16, to_full = cosines(got, bf16), cosines(got, full)
        result["variants"][name] = {
            "fp8_keep": list(keep),
            "fused": fuse,
            "cosine_to_bf16": {"min": float(to_bf16.min()), "mean": float(to_bf16.mean())},
            "cosine_to_float32": {"min": float(to_full.min()), "mean": float(to_full.mean())},
            "seconds": time.perf_counter() - t,
        }
        log(
            f"{name:28s} to bf16: min {to_bf16.min():.5f} mean {to_bf16.mean():.5f} | "
            f"to float32: min {to_full.min():.5f} mean {to_full.mean():.5f}"
        )
    restore_linears(language_model, saved)
    result["seconds"] = time.perf_counter() - began
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=("tiny", "2b", "8b"))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = measure(args.shape, args.layers, args.items, args.seed, args.variant, args.device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
