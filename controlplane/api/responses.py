"""OpenAI response bodies and server-sent-event chunks, as plain dicts and bytes.

Shapes follow OpenAI's API reference (the official `openai` SDK parses them into its types):
- completions: object "text_completion" for the body and for every stream chunk;
- chat: "chat.completion" body, "chat.completion.chunk" chunks; the first chunk carries
  `delta.role = "assistant"` (with empty content), the last one the finish_reason;
- with `stream_options.include_usage`, every chunk has `"usage": null` and one extra chunk with
  `"choices": []` and the usage comes just before `data: [DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "SSE_DONE",
    "ChatFormatter",
    "Choice",
    "CompletionFormatter",
    "StreamFormatter",
    "Usage",
    "dumps",
    "sse_event",
]

SSE_DONE: Final = b"data: [DONE]\n\n"


def dumps(obj: object) -> str:
    """Compact JSON; non-ASCII text is sent as UTF-8, not as \\u escapes."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_event(obj: object) -> bytes:
    return b"data: " + dumps(obj).encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    store_tokens: int = 0
    """Of ``cached_tokens``: loaded from Strata's KV store (DRAM or SSD tier); the rest hit the
    engine's own prefix cache (HBM)."""

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's usage; ``prompt_tokens_details.strata_cached_tokens_by_tier`` is Strata's
        extension beside the standard ``cached_tokens`` (docs/openai-parity.md)."""
        by_tier = {"engine": self.cached_tokens - self.store_tokens, "kv_store": self.store_tokens}
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "strata_cached_tokens_by_tier": by_tier,
            },
        }


@dataclass(frozen=True, slots=True)
class Choice:
    """One finished answer of a body (``n`` > 1: one of several)."""

    text: str
    finish_reason: str
    token_ids: Sequence[int] = ()
    logprobs: dict[str, Any] | None = None
    """Its ``logprobs`` object (controlplane/api/logprobs.py), when asked for."""
    tool_calls: list[dict[str, Any]] | None = None
    """Chat: the calls it made (controlplane/api/tools.py), its text then being empty."""


class StreamFormatter:
    """Builds the bodies and chunks of one request; subclasses fix the endpoint's shapes.

    With `return_token_ids` (vLLM's extension) the generated token ids go into each choice
    (`token_ids`: all of them in a body, the new ones in a chunk) and the prompt's ids are sent
    once (`prompt_token_ids`: in the completions choice, at the top level for chat; in a stream,
    on the first chunk only), where vLLM puts them.
    """

    __slots__ = (
        "_prompt_ids_pending",
        "created",
        "include_usage",
        "model",
        "n",
        "prompt_token_ids",
        "request_id",
        "return_token_ids",
    )
    body_object: str = ""
    chunk_object: str = ""

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        *,
        include_usage: bool,
        return_token_ids: bool = False,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
        n: int = 1,
    ) -> None:
        """``prompt_token_ids``: the prompt's ids, or each prompt's of a batch; choice ``i``
        is prompt ``i // n``'s (``n`` samples per prompt)."""
        self.request_id = request_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids
        self.prompt_token_ids: list[list[int]] = []
        for item in prompt_token_ids:
            if isinstance(item, int):  # one prompt's ids
                self.prompt_token_ids = [[int(t) for t in prompt_token_ids]]  # type: ignore[arg-type]
                break
            self.prompt_token_ids.append(list(item))
        if not self.prompt_token_ids:
            self.prompt_token_ids = [[]]
        self.n = n
        self._prompt_ids_pending: set[int] = set()
        """Choices whose stream has not had its prompt's ids yet."""
        if return_token_ids:
            self._prompt_ids_pending = set(range(len(self.prompt_token_ids) * n))

    def body(self, choices: Sequence[Choice], usage: Usage) -> dict[str, Any]:
        """The answer's body: its choices, indexed in order."""
        out = []
        for index, c in enumerate(choices):
            choice = self._body_choice(c.text, c.finish_reason)
            choice["index"] = index
            choice["logprobs"] = c.logprobs
            if c.tool_calls is not None:
                choice["message"]["tool_calls"] = c.tool_calls
                choice["message"]["content"] = c.text or None
            if self.return_token_ids:
                choice["token_ids"] = list(c.token_ids)
            out.append(choice)
        body = {
            "id": self.request_id,
            "object": self.body_object,
            "created": self.created,
            "model": self.model,
            "choices": out,
            "usage": usage.to_dict(),
        }
        if self.return_token_ids:  # with each choice (completions) or once (chat)
            self._prompt_ids_pending = set(range(len(out)))
            for index, choice in enumerate(out):
                self._add_prompt_token_ids(body, choice, index)
        return body

    def opening_chunks(self, n: int = 1) -> list[dict[str, Any]]:
        """Chunks sent before the first text of each of ``n`` choices (chat: the assistant
        role)."""
        return []

    def text_chunk(
        self,
        text: str,
        finish_reason: str | None,
        token_ids: Sequence[int] = (),
        logprobs: dict[str, Any] | None = None,
        *,
        index: int = 0,
    ) -> dict[str, Any]:
        """The next piece of choice ``index``."""
        choice = self._chunk_choice(text, finish_reason)
        choice["index"] = index
        choice["logprobs"] = logprobs
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        chunk = self._chunk([choice])
        self._add_prompt_token_ids(chunk, choice, index)
        return chunk

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage.to_dict()
        return chunk

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _add_prompt_token_ids(
        self, top: dict[str, Any], choice: dict[str, Any], index: int
    ) -> None:
        if index in self._prompt_ids_pending:
            self._prompt_ids_pending.discard(index)
            prompt = self.prompt_token_ids[min(index // self.n, len(self.prompt_token_ids) - 1)]
            self._prompt_ids_holder(top, choice)["prompt_token_ids"] = list(prompt)

    def _prompt_ids_holder(self, top: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _body_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormatter(StreamFormatter):
    __slots__ = ()
    body_object = "text_completion"
    chunk_object = "text_completion"

    def _prompt_ids_holder(self, top: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
        return choice

    def _body_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


class ChatFormatter(StreamFormatter):
    __slots__ = ()
    body_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def opening_chunks(self, n: int = 1) -> list[dict[str, Any]]:
        chunks = []
        for index in range(n):
            choice = {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            chunk = self._chunk([choice])
            self._add_prompt_token_ids(chunk, choice, index)
            chunks.append(chunk)
        return chunks

    def _prompt_ids_holder(self, top: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
        return top

    def _body_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    def _chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text or finish_reason is None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def tool_calls_chunk(
        self,
        tool_calls: list[dict[str, Any]] | None,
        finish_reason: str | None,
        *,
        index: int = 0,
        token_ids: Sequence[int] = (),
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The next piece of a choice whose output is tool calls: their delta (OpenAI's
        ``delta.tool_calls``, each with its ``index``) instead of content."""
        chunk = self.text_chunk("", finish_reason, token_ids, logprobs, index=index)
        if tool_calls:
            chunk["choices"][0]["delta"] = {"tool_calls": tool_calls}
        return chunk
