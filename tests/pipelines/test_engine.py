"""The forward engines: which one a config gets on which device, and that the packed one leaves the model alone."""

from pathlib import Path

import pytest
import torch
import yaml

from pipelines.config import Config, EmbedderConfig
from pipelines.embedder import Embedder
from pipelines.engine import PaddedForward
from pipelines.packed import PackedForward
from pipelines.packed_legacy import LegacyPackedForward
from tests.cluster.cluster_files import manifest

ROOT = Path(__file__).resolve().parents[2]


def _embedder(embedder, **options):
    return Embedder(embedder.model, embedder.tokenizer, image_processor=embedder.image_processor, **options)


def test_auto_layout_is_packed_on_cuda_and_padded_elsewhere():
    config = EmbedderConfig()
    assert config.attention_layout == "auto"
    assert config.resolved_attention_layout("cuda") == "packed"
    assert config.resolved_attention_layout("cpu") == "padded"
    assert config.resolved_attention_layout("mps") == "padded"
    assert EmbedderConfig(attention_layout="padded").resolved_attention_layout("cuda") == "padded"
    assert EmbedderConfig(attention_layout="packed").resolved_attention_layout("cpu") == "packed"


def test_auto_compile_is_on_once_warmed_up_in_the_packed_layout_on_cuda_only():
    config = EmbedderConfig()
    assert config.compile == "auto"
    assert config.resolved_compile("cuda", warmed_up=True) is True  # a backfill actor, a Serve replica
    assert config.resolved_compile("cuda", warmed_up=False) is False  # one-shot use: search, demo
    assert config.resolved_compile("cpu", warmed_up=True) is False
    padded = EmbedderConfig(attention_layout="padded")
    assert padded.resolved_compile("cuda", warmed_up=True) is False
    packed_on_cpu = EmbedderConfig(attention_layout="packed")
    assert packed_on_cpu.resolved_compile("cpu", warmed_up=True) is False
    assert EmbedderConfig(attention_layout="packed", compile=True).resolved_compile("cpu", False) is True
    assert EmbedderConfig(compile=False).resolved_compile("cuda", warmed_up=True) is False


def _shipped_embedder_configs() -> dict[str, EmbedderConfig]:
    serve_file = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    service = yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])
    configs = {
        "serve/config.yaml": serve_file["applications"][0]["args"]["config"],
        "cluster/kuberay/rayservice.yaml": service["applications"][0]["args"]["config"],
    }
    found = {name: Config.model_validate(config).embedder for name, config in configs.items()}
    for path in sorted((ROOT / "cluster" / "jobs").glob("*.yaml")):
        found[str(path.relative_to(ROOT))] = Config.from_yaml(path).embedder
    return found


def test_the_shipped_job_and_serve_configs_validate_and_get_the_fast_path_on_gpus_without_extra_keys():
    configs = _shipped_embedder_configs()
    assert {"serve/config.yaml", "cluster/kuberay/rayservice.yaml", "cluster/jobs/backfill-s3.yaml"} <= set(
        configs
    )
    for name, config in configs.items():
        assert config.resolved_attention_layout("cuda") == "packed", name
        assert config.resolved_compile("cuda", warmed_up=True), name  # actors and replicas warm up first
        assert config.resolved_attention_layout("cpu") == "padded", name
        assert not config.resolved_compile("cpu", warmed_up=True), name


def test_the_config_picks_the_engine(embedder):
    assert isinstance(embedder.engine, PaddedForward) and embedder.engine.layout == "padded"  # auto on a CPU
    packed = _embedder(embedder, attention_layout="packed")
    assert isinstance(packed.engine, PackedForward) and packed.engine.layout == "packed"
    legacy = _embedder(embedder, attention_layout="packed", engine="legacy")
    assert isinstance(legacy.engine, LegacyPackedForward)
    assert not packed.engine.compile and not packed.engine.compile_at_warm_up  # auto, on a CPU: eager


def test_auto_compile_on_a_cpu_stays_eager_through_warm_up(embedder):
    packed = _embedder(embedder, attention_layout="packed")
    assert packed.warm_up() > 0
    assert packed.engine.compile is False


def test_the_packed_engine_runs_the_models_own_layers_and_leaves_the_model_as_it_was(embedder):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pipelines.varlen import ATTENTION_NAME, attention_forward

    model = embedder.model
    before = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    packed = _embedder(embedder, attention_layout="packed")
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] is attention_forward
    after = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    assert after == before
    layer, own = packed.engine._layers[0], model.language_model.layers[0]
    assert type(layer) is type(own) and layer is not own
    assert layer.self_attn.config._attn_implementation == ATTENTION_NAME
    assert layer.self_attn.q_proj is own.self_attn.q_proj and layer.mlp is own.mlp  # shared, not copied
    block = packed.engine.vision.blocks[0]
    assert block.attn.config._attn_implementation == ATTENTION_NAME
    assert block.attn.qkv is model.visual.blocks[0].attn.qkv


def test_the_packed_engine_fails_loudly_without_its_segments():
    from pipelines.varlen import attention_forward

    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        attention_forward(None, q, q, q, None, scaling=0.5)
    with pytest.raises(ValueError, match="one packed row and no mask"):
        attention_forward(None, q, q, q, torch.zeros(1, 1, 5, 5), scaling=0.5)
