"""serve/config.yaml is a valid Ray Serve config file carrying the project's Config, which alone sets the
deployments' options, and flags override it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from pipelines.config import Config, ServeConfig
from serve.app import build_app, config_from_args, deployment_options, ingress_options
from serve.launch import BUILDER, LaunchError, apply_flags, load_target

SERVE_CONFIG = Path(__file__).parents[2] / "serve" / "config.yaml"


def flags(**given) -> argparse.Namespace:
    """What `vlm-embed serve`'s parser gives for these flags (every other flag None)."""
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["serve"])
    for name, value in given.items():
        assert hasattr(args, name), name
        setattr(args, name, value)
    return args


def test_the_shipped_file_is_a_valid_serve_config_for_our_app():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000
    (app,) = schema.applications
    assert app.import_path == BUILDER and app.route_prefix == "/"
    config = config_from_args(app.args)
    assert isinstance(config, Config) and config.serve.api_key_env == "VLM_EMBED_API_KEY"
    assert app.deployments == []  # every deployment option is in args.config.serve, their one place
    model, ingress = deployment_options(config.serve), ingress_options(config.serve)
    assert model["autoscaling_config"]["min_replicas"] < model["autoscaling_config"]["max_replicas"]
    assert model["autoscaling_config"]["upscale_delay_s"] == 10
    assert model["ray_actor_options"]["num_gpus"] == 0 and model["max_ongoing_requests"] >= 1
    # the ingress can hold what every model replica batches at once, and refuses past its queue with a 503
    assert ingress["max_ongoing_requests"] >= model["max_ongoing_requests"] * config.serve.max_replicas
    assert (
        ingress["ray_actor_options"]["num_gpus"] == 0 and ingress["backpressure_config"]["retry_after_s"] >= 1
    )


def test_serve_calls_the_app_builder_with_the_shipped_args_and_gets_an_application():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # what `serve run` does
    from ray.serve.deployment import Application

    args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, args), Application)


def test_the_app_args_are_one_config_inline_or_a_path(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("embedder:\n  model: tiny\n  pooling: max\n")
    assert config_from_args({"config_path": str(path)}).embedder.pooling == "max"
    assert config_from_args({"config": {"embedder": {"pooling": "cls"}}}).embedder.pooling == "cls"
    assert config_from_args(None) == Config()
    with pytest.raises(ValueError, match="unknown app args"):
        config_from_args({"model": "tiny"})
    with pytest.raises(ValueError, match="not both"):
        config_from_args({"config": {}, "config_path": str(path)})
    with pytest.raises(ValueError, match="Extra inputs"):
        config_from_args({"config": {"embedder": {"pooling": "mean", "typo": 1}}})


def test_the_image_size_bound_is_one_option_and_the_old_serve_one_is_refused_with_where_it_went():
    with pytest.raises(ValueError, match="embedder.max_image_pixels"):
        Config.model_validate({"serve": {"max_image_pixels": 1000}})
    assert "max_image_pixels" not in ServeConfig.model_fields


def test_deployment_options_follow_the_serve_section():
    serve_config = ServeConfig(
        min_replicas=2, max_replicas=2, num_gpus=1, retry_after_s=4, ingress_replicas=3
    )
    fixed = deployment_options(serve_config)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_gpus"] == 1
    ingress = ingress_options(serve_config)
    assert ingress["num_replicas"] == 3 and ingress["ray_actor_options"]["num_gpus"] == 0
    assert ingress["max_ongoing_requests"] == 2 * serve_config.max_ongoing_requests
    assert ingress["backpressure_config"] == {"status_code": 503, "retry_after_s": 4}
    scaled = deployment_options(ServeConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=8))
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
        "policy": {"policy_function": "serve.autoscaling:pending_items_policy"},
    }
    assert "num_replicas" not in scaled
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(min_replicas=3, max_replicas=1)


def test_a_job_config_and_the_serve_file_both_load_and_flags_win(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "embedder:\n  model: tiny\n  dimensions: 32\ntable:\n  uri: /data/db\nserve:\n  port: 9000\n"
    )
    target = load_target(job)
    assert target.config.embedder.dimensions == 32 and target.config.serve.port == 9000

    served = load_target(SERVE_CONFIG)
    assert deployment_options(served.config.serve)["ray_actor_options"]["num_gpus"] == 0
    overridden = apply_flags(served, flags(model="/models/x", num_gpus=1, port=8123, max_replicas=5))
    assert overridden.config.embedder.model == "/models/x" and overridden.config.serve.port == 8123
    model = deployment_options(overridden.config.serve)
    assert model["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert model["autoscaling_config"]["max_replicas"] == 5
    assert model["autoscaling_config"]["downscale_delay_s"] == 120  # the file's value where no flag is given
    ingress = ingress_options(served.config.serve)
    assert ingress["num_replicas"] == 1 and ingress["max_ongoing_requests"] == 128
    # five model replicas of 64 requests each: the ingress takes 320 at once
    assert ingress_options(overridden.config.serve) == {**ingress, "max_ongoing_requests": 5 * 64}
    more_ingress = ingress_options(
        apply_flags(served, flags(ingress_replicas=4, retry_after_s=7)).config.serve
    )
    assert more_ingress["num_replicas"] == 4
    assert more_ingress["backpressure_config"] == {"status_code": 503, "retry_after_s": 7}
    untouched = apply_flags(served, flags())
    assert untouched.config == served.config and untouched.config.serve.port == 8000


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("- a\n- b\n", "mapping"),
        ("applications:\n  - name: other\n    import_path: x:y\n", "serve.app:build_app"),
        (
            "applications:\n  - name: a\n    import_path: serve.app:build_app\n    deployments:\n"
            "      - name: EmbeddingModel\n        num_replicas: 2\n",
            "from args.config.serve",
        ),
        ("embedder: {model: [\n", "not valid YAML"),
    ],
)
def test_a_file_that_cannot_be_served_is_refused_with_a_message(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(LaunchError, match=words.replace(".", r"\.")):
        load_target(path)


def test_a_serve_file_may_hold_the_reranker_and_its_replicas(tmp_path):
    from serve.app import rerank_deployment_options
    from serve.launch import with_reranker

    path = tmp_path / "serve.yaml"
    path.write_text(
        "applications:\n  - name: a\n    import_path: serve.app:build_app\n"
        "    args: {config: {reranker: {model: tiny-reranker, max_length: 4096}, serve: {reranker_replicas: 3}}}\n"
    )
    target = load_target(path)
    assert target.config.reranker.model == "tiny-reranker"
    assert rerank_deployment_options(target.config.serve)["num_replicas"] == 3
    swapped = with_reranker(target, "Qwen/Qwen3-VL-Reranker-2B")
    assert swapped.config.reranker.model == "Qwen/Qwen3-VL-Reranker-2B"
    assert swapped.config.reranker.max_length == 4096  # the file's other reranker options stay
    assert with_reranker(load_target(None), None).config.reranker is None


def test_the_reranker_deployment_takes_its_replicas_and_gpus_from_the_serve_section():
    from serve.app import rerank_deployment_options

    options = rerank_deployment_options(ServeConfig(reranker_replicas=2, reranker_num_gpus=0.5))
    assert options["num_replicas"] == 2 and options["ray_actor_options"]["num_gpus"] == 0.5


def test_one_access_log_line_per_http_request():
    """The model deployments log no calls; the ingress logs requests only where no proxy of Serve's does."""
    from serve.app import rerank_deployment_options

    serve_config = ServeConfig()
    assert deployment_options(serve_config)["logging_config"] == {"enable_access_log": False}
    assert rerank_deployment_options(serve_config)["logging_config"] == {"enable_access_log": False}
    assert ingress_options(serve_config)["logging_config"] == {"enable_access_log": False}
    with_haproxy = ServeConfig(high_throughput=True)
    assert ingress_options(with_haproxy)["logging_config"] == {"enable_access_log": True}


def test_only_a_few_short_texts_are_prepared_on_the_event_loop():
    from serve.app import INLINE_PREPARE_CHARS, INLINE_PREPARE_ITEMS, prepares_inline

    assert prepares_inline(["a text", {"text": "another", "instruction": "Represent it."}])
    assert not prepares_inline(["t"] * (INLINE_PREPARE_ITEMS + 1))
    assert not prepares_inline(["x" * (INLINE_PREPARE_CHARS + 1)])
    assert not prepares_inline(["a text", {"text": "with an image", "image": b"\x89PNG"}])
