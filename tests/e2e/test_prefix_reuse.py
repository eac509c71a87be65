"""KV reuse through the API: a request that shares a long prefix with an earlier one reports those
prompt tokens as cached and generates exactly what it generates with nothing cached; after
`strata serve` restarts on the same cache directory, the prefix still comes from the store (SSD
tier, write-behind) instead of being recomputed."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI

from tests.e2e.conftest import run_reference, start_server
from tests.e2e.test_disaggregated import BLOCK_SIZE, make_text

PREFIX = make_text(4242, 520)  # well over 3 engine blocks with the tiny tokenizer
FIRST = PREFIX + " first question about the river"
SECOND = PREFIX + " second question about the tower"
MAX_TOKENS = 12
EXTRA = {"ignore_eos": True, "return_token_ids": True}


def _complete(base_url: str, model: str, prompt: str) -> tuple[list[int], int, int]:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    resp = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA
    )
    assert resp.usage is not None and resp.usage.prompt_tokens_details is not None
    cached = resp.usage.prompt_tokens_details.cached_tokens or 0
    token_ids = list(getattr(resp.choices[0], "token_ids", None) or [])
    return token_ids, cached, resp.usage.prompt_tokens


def test_shared_prefix_is_reused_and_survives_a_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reference = run_reference(
        tiny_model_dir,
        [{"kind": "completion", "prompt": SECOND, "max_tokens": MAX_TOKENS, "ignore_eos": True}],
    )[0]["token_ids"]
    ssd_dir = tmp_path / "ssd"

    server = start_server(tiny_model_dir, ssd_dir=ssd_dir)
    try:
        _, cached_first, num_prompt = _complete(server.base_url, server.model, FIRST)
        assert cached_first == 0
        tokens, cached, _ = _complete(server.base_url, server.model, SECOND)
    finally:
        assert server.stop() == 0
    assert num_prompt >= 4 * BLOCK_SIZE
    assert cached >= 3 * BLOCK_SIZE
    assert tokens == reference

    # A new `strata serve` on the same cache directory: empty engines, the store reopens its SSD.
    server = start_server(tiny_model_dir, ssd_dir=ssd_dir)
    try:
        tokens, cached, _ = _complete(server.base_url, server.model, SECOND)
    finally:
        assert server.stop() == 0
    assert cached >= 3 * BLOCK_SIZE
    assert tokens == reference
