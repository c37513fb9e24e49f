"""POST /v1/chat/completions over real HTTP: answers from the served table, streamed through the official
OpenAI client, by the replica that embeds (the tiny model's answers are random words: structure, not wording)."""

from __future__ import annotations

import json

import httpx
import pytest

from pipelines.config import AnswerConfig, EmbedderConfig
from tests.pipelines.answer_tables import PASSAGES, write_table
from tests.serve.conftest import API_KEY, app_config, b64_image, with_api_key

ANSWER = AnswerConfig(top_k=2, max_new_tokens=16, max_new_tokens_limit=64, temperature=0)
QUESTION = PASSAGES["t-circle"]  # a row's own text: that row is retrieved first


@pytest.fixture(scope="module")
def chat_table(embedder, tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("chat-db") / "lancedb")
    write_table(uri, embedder, PASSAGES)
    return uri


@pytest.fixture(scope="module")
def chat_app(serve_http, tiny_model_dir, chat_table):
    config = app_config(tiny_model_dir, chat_table).model_copy(update={"answer": ANSWER})
    with serve_http.deployed("chat", config, "/chat", **with_api_key()) as url:
        yield url


@pytest.fixture(scope="module")
def openai_client(chat_app):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{chat_app}/v1", api_key=API_KEY, timeout=60, max_retries=0)


def post(url: str, body, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60, **kwargs)


def ask(**extra):
    return {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0, **extra}


def test_tokens_stream_through_the_openai_client_and_match_the_whole_answer(openai_client, tiny_model_dir):
    stream = openai_client.chat.completions.create(
        model=str(tiny_model_dir),
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # more than one piece came: it streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    sources = chunks[0].model_extra["sources"]
    assert [s["id"] for s in sources][0] == "t-circle" and len(sources) == ANSWER.top_k
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert (
        0 < usage.completion_tokens <= 16
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )

    whole = openai_client.chat.completions.create(
        model=str(tiny_model_dir),
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
    )
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == "".join(pieces)
    assert whole.usage.model_dump() == usage.model_dump()
    assert [s["id"] for s in whole.model_extra["sources"]] == [s["id"] for s in sources]


def test_the_served_prompt_is_the_python_apis_prompt_over_the_same_sources(chat_app, tiny_model_dir):
    from pipelines.answer import context_messages
    from pipelines.generation import PromptBuilder
    from pipelines.loading import load_processor_parts

    body = post(chat_app, ask()).json()
    tokenizer, image_processor = load_processor_parts(str(tiny_model_dir))
    builder = PromptBuilder(tokenizer, image_processor, EmbedderConfig(model=str(tiny_model_dir)))
    messages, _ = context_messages(QUESTION, body["sources"], ANSWER)
    expected = builder.build(messages)
    assert body["usage"]["prompt_tokens"] == expected.num_tokens
    alone = builder.build(
        [{"role": "system", "content": ANSWER.system_prompt}, {"role": "user", "content": QUESTION}]
    )
    assert body["usage"]["prompt_tokens"] > alone.num_tokens  # the retrieved rows went in
    for source in body["sources"]:
        assert source["text"] in expected.text


def test_the_stream_is_server_sent_events_ending_in_done(chat_app):
    with httpx.stream(
        "POST",
        f"{chat_app}/v1/chat/completions",
        json=ask(stream=True),
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_an_image_in_the_question_is_answered_with_it(chat_app):
    question = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64_image(3)}"}},
    ]
    response = post(chat_app, {"messages": [{"role": "user", "content": question}], "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0


def embedded_items(url: str) -> int:
    """Items the (one) model replica has embedded so far, from /healthz."""
    return httpx.get(f"{url}/healthz", timeout=30).json()["batched_items"]


def test_retrieval_takes_the_search_modes_of_retrieve_context(chat_app, chat_table, embedder):
    from pipelines.search import retrieve_context

    # the table is written as a backfill writes it, with its full-text index on text
    question = "a round shape with no corners"
    body = {**ask(), "messages": [{"role": "user", "content": question}]}
    for mode in ("text", "hybrid", "vector"):
        before = embedded_items(chat_app)
        response = post(chat_app, {**body, "retrieval": {"mode": mode, "top_k": 3}})
        assert response.status_code == 200, response.text
        sources = response.json()["sources"]
        expected = retrieve_context(question, top_k=3, mode=mode, table=chat_table, embedder=embedder)
        assert [s["id"] for s in sources] == [r["id"] for r in expected], mode
        if mode == "text":  # the one row with these words (the tiny model's vectors are random)
            assert [s["id"] for s in sources] == ["t-circle"]
        assert embedded_items(chat_app) - before == (0 if mode == "text" else 1), mode  # text embeds nothing

    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64_image(3)}"}}
    with_image = [{"role": "user", "content": [{"type": "text", "text": question}, image]}]
    response = post(chat_app, {"messages": with_image, "retrieval": {"mode": "text"}})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "retrieval.mode"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"messages": []}, 422, "messages"),
        ({"max_tokens": 4}, 422, "messages"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 422, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, 422, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages[0].role"),
        (ask(max_tokens=65), 422, "max_tokens"),
        (ask(max_tokens=0), 422, "max_tokens"),
        (ask(n=2), 422, "n"),
        (ask(temperature=5), 422, "temperature"),
        (ask(logit_bias={"1": 2}), 422, "logit_bias"),
        (ask(model="gpt-4o"), 404, "model"),
        (ask(retrieval={"top_k": 1000}), 422, "retrieval.top_k"),
        (ask(retrieval={"mode": "semantic"}), 422, "retrieval.mode"),
        (ask(retrieval={"filter": "modality = 'text'; DROP TABLE vectors"}), 422, "filter"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
                    }
                ]
            },
            422,
            "messages[0].content[0].image_url.url",
        ),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(chat_app, body, status, param):
    response = post(chat_app, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_not_json_and_no_key_are_refused_like_every_route(chat_app):
    response = httpx.post(
        f"{chat_app}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = post(chat_app, ask(), key=None)
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"


def test_a_server_without_an_answer_section_says_how_to_turn_it_on(client):
    response = client.post("/v1/chat/completions", json=ask())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "chat_not_enabled" and "answer:" in error["message"]


def test_the_readme_openai_example_streams_an_answer(chat_app, tiny_model_dir, capsys):
    """The README's Answers section's client example, pointed at this server (URL, key, model name)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Answers (RAG)", 1)[1].split("\n## ", 1)[0]
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "OpenAI(" in b]
    for written, here in [
        ("http://127.0.0.1:8000", chat_app),
        ('api_key="none"', f'api_key="{API_KEY}"'),
        ('model="tiny"', f'model="{tiny_model_dir}"'),
    ]:
        assert written in code
        code = code.replace(written, here)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # the streamed answer was printed
