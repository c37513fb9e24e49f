"""Answers retrieve with the generator's own embedder and put the retrieved rows into the prompt the model sees."""

from __future__ import annotations

import json

import pytest

from pipelines.answer import answer, context_messages, prepare_answer, stream_answer
from pipelines.cli import main
from pipelines.config import AnswerConfig
from pipelines.generation import Generator
from tests.conftest import make_image
from tests.pipelines.answer_tables import PASSAGES, write_table

CONFIG = AnswerConfig(top_k=2, max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.load(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def table(tmp_path_factory, generator):
    folder = tmp_path_factory.mktemp("answer")
    picture = folder / "stripes.png"
    make_image(21, (64, 64)).save(picture)
    items = {**PASSAGES, "i-stripes": {"image": str(picture)}}
    config = write_table(str(folder / "db"), generator.embedder, items)
    return config, picture


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_the_prompt_the_model_saw_holds_the_retrieved_passages(table, generator):
    config, _ = table
    question = PASSAGES["t-circle"]
    result = answer(config, question, CONFIG, generator=generator)
    assert [row["id"] for row in result.sources][0] == "t-circle"  # the question is that row's own text
    assert len(result.sources) == CONFIG.top_k and "vector" not in result.sources[0]
    seen = result.completion.prompt_token_ids  # read off the tensor handed to generate
    for row in result.sources:
        passage = generator.tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        assert _contains(seen, passage), row["id"]
    assert "[1] (id t-circle)\n" + PASSAGES["t-circle"] in result.prompt.text
    assert result.prompt.text.rstrip().endswith("<|im_start|>assistant")
    assert 0 < result.completion.completion_tokens <= CONFIG.max_new_tokens
    assert result.text == result.completion.text


def test_a_retrieved_image_goes_into_the_prompt_as_an_image(table, generator):
    config, picture = table
    everything = CONFIG.model_copy(update={"top_k": 10})
    prompt, sources = prepare_answer(config, generator, "stripes", everything, image=str(picture))
    assert len(sources) == len(PASSAGES) + 1
    (row,) = [row for row in sources if row["id"] == "i-stripes"]
    assert row["image_uri"] == str(picture) and "image_error" not in row
    image_token = generator.prompts.image_token_id
    # the retrieved image and the question's own image
    assert prompt.image_grid_thw.shape[0] == 2
    assert prompt.text.count("<|image_pad|>") == 2
    assert int((prompt.input_ids == image_token).sum()) == int(prompt.image_grid_thw.prod(axis=1).sum()) // 4


def test_a_row_whose_image_is_gone_keeps_its_text_and_says_why():
    rows = [{"id": "p-gone", "score": 0.5, "text": "a lost photo", "image_uri": "/nonexistent/gone.png"}]
    messages, used = context_messages("where is it?", rows, CONFIG)
    assert "gone.png" in used[0]["image_error"]
    user = messages[-1]["content"]
    assert [part["type"] for part in user] == ["text"]
    assert "[1] (id p-gone)\na lost photo" in user[0]["text"]


def test_a_streamed_answer_is_the_same_answer(table, generator):
    config, _ = table
    sources, stream = stream_answer(config, "a blue square", CONFIG, generator=generator)
    pieces = list(stream)
    whole = answer(config, "a blue square", CONFIG, generator=generator)
    assert "".join(pieces) == whole.text and [r["id"] for r in sources] == [r["id"] for r in whole.sources]


def test_the_command_prints_the_answer_and_its_sources(table, capsys):
    config, _ = table
    args = ["answer", PASSAGES["t-star"], "--table", config.uri, "--top-k", "3", "--max-new-tokens", "8"]
    assert main([*args, "--temperature", "0", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sources"][0]["id"] == "t-star" and len(printed["sources"]) == 3
    assert 0 < printed["usage"]["completion_tokens"] <= 8
    assert main([*args, "--temperature", "0", "--stream"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(printed["answer"] + "\n")
    assert "sources (3):" in out and f"[1]\t1.0000\tt-star\t{PASSAGES['t-star']}" in out


def test_the_command_refuses_a_table_of_an_embedding_only_checkpoint(tmp_path, tiny_embedding_dir, capsys):
    from pipelines.embedder import Embedder

    embedder = Embedder.load(str(tiny_embedding_dir), device="cpu", dtype="float32")
    config = write_table(str(tmp_path / "db"), embedder, PASSAGES)
    assert main(["answer", "what is round?", "--table", config.uri]) == 2
    err = capsys.readouterr().err
    assert "cannot answer" in err and "embedding-only" in err


def test_the_command_reports_a_missing_table_and_an_empty_question(tmp_path, table, capsys):
    assert main(["answer", "anything", "--table", str(tmp_path / "none")]) == 2
    assert "answer: error:" in capsys.readouterr().err
    assert main(["answer", "   ", "--table", table[0].uri]) == 2
    assert "question is empty" in capsys.readouterr().err


def test_the_readme_answer_examples_run_as_written(tmp_path):
    """The README's Answers section: its commands (after the backfill, whose table is written here the way
    the backfill writes it, with the `tiny` model) and its Python example, in a fresh directory."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from pipelines.embedder import Embedder

    root = Path(__file__).resolve().parents[2]
    section = (root / "README.md").read_text().split("## Answers (RAG)", 1)[1].split("\n## ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    commands = [line.split("  #")[0].strip() for line in bash.splitlines() if line.strip()]
    assert commands[0] == "vlm-embed backfill"
    write_table(str(tmp_path / "data" / "lancedb"), Embedder.load("tiny", device="cpu"), PASSAGES)
    bin_dir = Path(sys.executable).parent
    for command in commands[1:]:
        result = subprocess.run(
            f"{bin_dir}/{command}", shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=300
        )
        assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
        assert sum(row_id in result.stdout for row_id in PASSAGES) >= 2, command  # its sources were printed
    result = subprocess.run(
        [sys.executable, "-c", python],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(f"'{row_id}'" in result.stdout for row_id in PASSAGES) == 3  # top_k=3 sources
