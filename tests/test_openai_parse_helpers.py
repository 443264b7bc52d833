"""The official client's structured-output helpers against a live server: `chat.completions.parse` /
`.stream` and `responses.parse` / `.stream` with a pydantic model as the format. They send the model's
strict JSON schema and parse the reply client-side, so the server's json_schema constraint and the
shapes of its replies (and stream events) must be what the client expects."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from helpers.live_server import live_openai


class Place(BaseModel):
    capital: bool
    size: Literal["small", "big"]


MESSAGES = [{"role": "user", "content": "Describe a city."}]


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    with live_openai("qwen2", max_model_len=512) as c:
        yield c


def test_chat_completions_parse_and_stream(client: openai.OpenAI) -> None:
    parsed = client.chat.completions.parse(model="m", messages=MESSAGES, response_format=Place, max_tokens=60)
    assert parsed.choices[0].finish_reason == "stop"
    assert isinstance(parsed.choices[0].message.parsed, Place)
    with client.chat.completions.stream(model="m", messages=MESSAGES, response_format=Place, max_tokens=60) as stream:
        for _ in stream:
            pass
        assert isinstance(stream.get_final_completion().choices[0].message.parsed, Place)


def test_responses_parse_and_stream(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model="m", input="Describe a city.", text_format=Place, max_output_tokens=60)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Place)
    with client.responses.stream(model="m", input="Describe a city.", text_format=Place,
                                 max_output_tokens=60) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and isinstance(final.output_parsed, Place)
