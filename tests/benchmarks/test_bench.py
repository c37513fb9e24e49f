"""The benchmark runs end to end on the tiny model on the CPU, and its FLOP and MFU accounting is right."""

import json

import numpy as np
import pytest

from benchmarks.bench import format_table, main
from benchmarks.flops import Costs, item_flops, matmul_ceiling, workload_flops

# The tiny checkpoint (pipelines/tiny_model.py), counted by hand:
# a decoder layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12288, q/k norms 16 + 16, MLP 3 x 64x128 = 24576,
# two RMSNorms 64 + 64  ->  37024; four layers -> 148096.
TINY_LAYER_PARAMS = 37_024
# a vision block: 2 LayerNorms 2x(32+32), qkv 32x96+96, proj 32x32+32, fc1 32x64+64, fc2 64x32+32 -> 8544;
# three blocks 25632 + the patch embedding (3x2x16x16 -> 32, + bias) 49184 -> 74816
TINY_VISION_PARAMS = 3 * 8544 + 49_184
# merger: LayerNorm(32) 64, fc1 128x128+128, fc2 128x64+64 -> 24832; two deepstack mergers (LayerNorm(128)) 25024
TINY_MERGER_PARAMS = 24_832 + 2 * 25_024


@pytest.fixture(scope="module")
def tiny_generation_model(tiny_model_dir):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_costs_count_the_tiny_models_parameters_as_counted_by_hand(tiny_generation_model):
    costs = Costs.of(tiny_generation_model)
    assert (costs.layer_params, costs.layers, costs.heads, costs.head_dim) == (
        4 * TINY_LAYER_PARAMS,
        4,
        4,
        16,
    )
    assert (costs.vision_params, costs.vision_blocks, costs.vision_heads, costs.vision_head_dim) == (
        TINY_VISION_PARAMS,
        3,
        2,
        16,
    )
    assert (costs.merger_params, costs.merge_unit) == (TINY_MERGER_PARAMS, 4)
    assert Costs.of(tiny_generation_model, layer=2).layer_params == 2 * TINY_LAYER_PARAMS


def test_useful_flops_of_two_texts_and_an_image_as_computed_by_hand(tiny_generation_model):
    costs = Costs.of(tiny_generation_model)
    # texts of 3 and 5 tokens: 2 x params x 8 tokens + causal attention 4 layers x 4 x 4 heads x 16 x (6 + 15)
    assert item_flops(costs, 3) + item_flops(costs, 5) == 2 * 148_096 * 8 + 4 * 4 * 4 * 16 * 21 == 2_391_040
    # only the layers that run count
    half = Costs.of(tiny_generation_model, layer=2)
    assert item_flops(half, 3) + item_flops(half, 5) == 2 * 74_048 * 8 + 2 * 4 * 4 * 16 * 21
    # a 4x4-patch image adds: 2 x 74816 x 16 patches + 3 blocks x 4 x 2 heads x 16 x 16^2 + 2 x 74880 x 4 merged
    image = item_flops(costs, 10, (1, 4, 4)) - item_flops(costs, 10)
    assert image == 2 * 74_816 * 16 + 3 * 4 * 2 * 16 * 256 + 2 * 74_880 * 4 == 3_091_456


def test_the_matmul_ceiling_is_two_n_cubed_over_the_median_time():
    import torch

    ceiling = matmul_ceiling("cpu", torch.float32, size=128, repeats=3)
    assert ceiling["size"] == 128
    assert ceiling["flops_per_s"] == pytest.approx(2 * 128**3 / ceiling["seconds"])
    assert ceiling["flops_per_s"] > 0


def test_the_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "bench.json"
    code = main(["--text-items", "12", "--image-items", "3", "--passes", "3", "--json", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    rows = {(row["workload"], row["recipe"]): row for row in document["rows"]}
    assert set(rows) == {(w, r) for w in ("text", "image") for r in ("baseline", "padded", "packed")}
    ceiling = document["env"]["ceiling"]["flops_per_s"]
    for (workload, recipe), row in rows.items():
        assert row["status"] == "ok", (workload, recipe, row["status"])
        assert row["items"] == (12 if workload == "text" else 3)
        assert row["items_per_s"] == pytest.approx(row["items"] / row["seconds"])
        assert row["mfu"] == pytest.approx(row["useful_tflop"] * 1e12 / row["seconds"] / ceiling)
        assert row["cold_start_s"] >= row["warm_up_s"] > 0
        if recipe != "baseline":  # three timed passes, the median reported
            assert (
                len(row["pass_s"]) == 3 and row["seconds"] == sorted(row["pass_s"])[1]
            )  # float32 on the CPU: our vectors are the baseline's
            assert row["cosine_min"] > 0.99999
            assert row["ratio"] == pytest.approx(
                row["items_per_s"] / rows[workload, "baseline"]["items_per_s"]
            )
    # the useful FLOPs are the workload's, the same for every recipe, and add up item by item
    assert rows["text", "baseline"]["useful_tflop"] == rows["text", "packed"]["useful_tflop"]
    assert rows["image", "padded"]["useful_tflop"] > 0
    table = capsys.readouterr().out
    assert "items/s" in table and "MFU" in table and table.count("tiny") >= 6


def test_the_useful_flops_in_the_table_are_the_workloads(tiny_generation_model):
    from benchmarks.bench import Bench, Settings

    bench = Bench.__new__(Bench)  # only the workload builder, no ceiling measurement
    bench.settings = Settings(text_items=5, image_items=2)
    items = bench.build_workload("tiny", "text", tiny_generation_model.config)
    lengths = [item.num_tokens for item in items]
    assert len(items) == 5 and all(8 <= n <= 512 for n in lengths)
    costs = Costs.of(tiny_generation_model)
    by_hand = sum(2 * 148_096 * n + 4 * 4 * 4 * 16 * n * (n + 1) / 2 for n in lengths)
    assert workload_flops(costs, items) == pytest.approx(by_hand)
    images = bench.build_workload("tiny", "image", tiny_generation_model.config)
    # a 64x64 image: 4x4 patches of 16 pixels, 4 merged tokens, between vision start/end, then 20 text tokens
    assert [item.num_tokens for item in images] == [1 + 4 + 1 + 20] * 2
    assert all(np.array_equal(item.image_grid_thw, [1, 4, 4]) for item in images)


def test_the_text_workload_is_log_normal_around_110_tokens():
    from pipelines.synthetic import lognormal_lengths

    lengths = lognormal_lengths(np.random.default_rng(0), 2048)
    assert lengths.min() >= 8 and lengths.max() <= 512
    assert 100 <= np.median(lengths) <= 120
    assert 135 <= lengths.mean() <= 160  # BENCHMARK.md: "mean about 148"


def test_the_table_says_whether_the_best_recipe_meets_the_target():
    rows = [
        {"model": "2b", "workload": "text", "recipe": "baseline", "items_per_s": 147.0, "mfu": 0.079},
        {"model": "2b", "workload": "text", "recipe": "packed", "items_per_s": 900.0, "mfu": 0.5},
        {"model": "2b", "workload": "text", "recipe": "packed+compile", "items_per_s": 1200.0, "mfu": 0.62},
        {"model": "8b", "workload": "text", "recipe": "packed", "items_per_s": 200.0, "mfu": 0.5},
        {"model": "8b", "workload": "image", "recipe": "packed", "status": "error: OutOfMemoryError"},
    ]
    table = format_table(rows)
    assert "target 2b text: >= 1100 items/s" in table and "best packed+compile 1,200.0 items/s" in table
    assert "(meets)" in table and "target 8b text" in table and "(misses)" in table
    assert "[error: OutOfMemoryError]" in table


def test_small_step_workloads_run_one_and_eight_items_a_step_and_a_new_process_is_timed_to_its_first_vector(
    tmp_path, capsys, tiny_model_dir
):
    out = tmp_path / "small.json"
    argv = ["--workload", "text1", "--workload", "text8", "--small-items", "9", "--variant", "packed"]
    code = main([*argv, "--passes", "2", "--cold-start", "packed", "--json", str(out)])
    assert code == 0
    rows = {(row["workload"], row["recipe"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        ("text1", "baseline"),
        ("text1", "packed"),
        ("text8", "baseline"),
        ("text8", "packed"),
        ("text1", "packed (start, no cache)"),
        ("text1", "packed (start, cache)"),
    }
    for workload in ("text1", "text8"):
        row = rows[workload, "packed"]
        assert row["status"] == "ok" and row["items"] == 9 and row["cosine_min"] > 0.99999
        assert 20 <= row["tokens"] / 9 <= 60  # short texts, Serve-sized
        assert len(row["pass_s"]) == 2 and len(row["pass_costs"]) == 2  # every pass, with what it paid for
    for label in ("no cache", "cache"):
        row = rows["text1", f"packed (start, {label})"]
        assert row["status"] == "cold start only", row["status"]
        # the parent's clock (process start included) covers the child's own, which adds up its parts
        assert row["cold_start_s"] >= row["to_first_vector_s"] > 0
        parts = row["imports_s"] + row["load_s"] + row["build_s"] + row["warm_up_s"] + row["first_vector_s"]
        assert row["to_first_vector_s"] == pytest.approx(parts, abs=0.05)
        assert row["dimension"] == 64  # the tiny model's hidden size: a real vector came back
    table = capsys.readouterr().out
    assert "packed (start, no cache)" in table and "first vector" in table
    passes = "/".join(f"{s:.3g}" for s in rows["text8", "packed"]["pass_s"])
    assert passes in table  # every timed pass is printed, not only the median


def test_the_table_shows_the_graphs_and_what_each_pass_paid_for():
    row = {
        "model": "2b",
        "workload": "text1",
        "recipe": "packed+compile+graphs",
        "items_per_s": 300.0,
        "pass_s": [1.21, 0.7, 0.7],
        "pass_costs": [{"graphs": 0, "device_segments": 3, "host_allocs": 2}, {"graphs": 0}, {"graphs": 0}],
        "graph_buckets": 36,
        "graph_gib": 0.25,
        "graph_capture_s": 2.5,
        "graph_replays": 256,
        "graph_unbucketed": 0,
    }
    line = format_table([row])
    assert "1.21/0.7/0.7" in line
    assert "36 buckets, 0.25 GiB" in line and "256 replays" in line
    assert "per pass: device_segments+3,host_allocs+2; -; -" in line
