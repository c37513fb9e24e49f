"""The tiny checkpoint: real classes, the same files on every run, loadable like a hub checkpoint."""

import hashlib
import json

import numpy as np
import pytest

from pipelines.prepare import mrope_position_ids
from tests.conftest import make_image


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_building_twice_gives_byte_identical_files(tiny_model_dir, tmp_path):
    from pipelines.tiny_model import make_tiny_model

    again = make_tiny_model(tmp_path / "again")
    assert _digest(again) == _digest(tiny_model_dir)
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    } <= set(_digest(again))


def test_a_different_seed_gives_different_weights(tiny_model_dir, tmp_path):
    from pipelines.tiny_model import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(tiny_model_dir)["model.safetensors"]
    assert _digest(other)["tokenizer.json"] == _digest(tiny_model_dir)["tokenizer.json"]


def test_building_into_a_non_empty_directory_needs_overwrite(tmp_path):
    from pipelines.tiny_model import make_tiny_model

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_tiny_model(tmp_path / "full")


def test_the_checkpoint_loads_through_the_auto_classes(tiny_model_dir):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen3_vl"
    assert type(AutoModel.from_pretrained(tiny_model_dir)).__name__ == "Qwen3VLModel"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    image_processor = AutoImageProcessor.from_pretrained(tiny_model_dir, backend="pil")
    assert image_processor.patch_size == config.vision_config.patch_size
    assert image_processor.merge_size == config.vision_config.spatial_merge_size
    vision = config.vision_config
    assert vision.deepstack_visual_indexes and max(vision.deepstack_visual_indexes) < vision.depth
    assert vision.out_hidden_size == config.text_config.hidden_size
    rope = config.text_config.rope_parameters
    assert sum(rope["mrope_section"]) == config.text_config.head_dim // 2
    video = json.loads((tiny_model_dir / "video_preprocessor_config.json").read_text())
    assert video["patch_size"] == vision.patch_size and video["merge_size"] == vision.spatial_merge_size


def test_the_tokenizer_round_trips_text_and_keeps_special_tokens_whole(embedder):
    tokenizer = embedder.tokenizer
    text = "Über 42 cats — naïve café! <|im_start|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_position_ids_match_the_model_rope_index(embedder):
    import torch

    for item in [
        "plain text only",
        {"image": make_image(0, (160, 96))},
        {"text": "after", "image": make_image(1)},
    ]:
        prepared = embedder.prepare(item)
        ids = torch.from_numpy(prepared.input_ids)[None]
        grid = (
            torch.from_numpy(prepared.image_grid_thw)[None] if prepared.image_grid_thw is not None else None
        )
        expected, _ = embedder.model.get_rope_index(
            ids, mm_token_type_ids=(ids == embedder.model.config.image_token_id).int(), image_grid_thw=grid
        )
        np.testing.assert_array_equal(prepared.position_ids, expected[:, 0].numpy())


def test_mrope_positions_resume_after_the_image():
    ids = np.array([5, 7, 9, 9, 9, 9, 9, 9, 8, 5])  # 6 image tokens: a 2x3 merged grid
    positions = mrope_position_ids(ids, 9, np.array([1, 4, 6]), merge=2)
    assert positions[:, :2].tolist() == [[0, 1]] * 3
    assert positions[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3] and positions[2, 2:8].tolist() == [
        2,
        3,
        4,
        2,
        3,
        4,
    ]
    assert positions[:, 8].tolist() == [5, 5, 5]  # 2 + max(2, 3)


def test_positions_of_two_images_match_the_model_rope_index(embedder):
    """Two images in one sequence (a reranker pair of an image query and an image document)."""
    import torch

    first, second = (
        embedder.prepare({"image": make_image(0, (160, 96))}),
        embedder.prepare({"image": make_image(1)}),
    )
    image_id = embedder.model.config.image_token_id
    ids = np.concatenate([[5, 6], first.input_ids, [7], second.input_ids, [8, 9]])
    grids = np.stack([first.image_grid_thw, second.image_grid_thw])
    positions = mrope_position_ids(ids, image_id, grids, merge=2)
    expected, _ = embedder.model.get_rope_index(
        torch.from_numpy(ids)[None],
        mm_token_type_ids=torch.from_numpy(ids == image_id).int()[None],
        image_grid_thw=torch.from_numpy(grids),
    )
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    with pytest.raises(ValueError, match="contiguous blocks"):
        mrope_position_ids(ids, image_id, grids[:1], merge=2)
