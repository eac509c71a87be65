"""The default model, SmolLM2-135M-Instruct, served disaggregated, gives sensible answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.conftest import model_cache_dir
from tests.e2e.conftest import StrataServer, start_server


@pytest.fixture(scope="module")
def smol_server() -> Iterator[StrataServer]:
    from strata.models import prepare_default_model

    model_dir = prepare_default_model(model_cache_dir().parent)
    server = start_server(model_dir, ["--max-model-len", "2048"])
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_capital_of_france_is_paris(smol_server: StrataServer, stream: bool) -> None:
    client = OpenAI(base_url=smol_server.base_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    if stream:
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model=smol_server.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=32,
                temperature=0,
                stream=True,
            )
            if chunk.choices
        )
    else:
        resp = client.chat.completions.create(
            model=smol_server.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=32,
            temperature=0,
        )
        text = resp.choices[0].message.content or ""
    assert "Paris" in text, text
