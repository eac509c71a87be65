"""OpenAI's ``logprobs`` objects, from the engines' per-token logprobs.

Two shapes (OpenAI's API reference; vLLM's server writes the same):
- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}]}``, one entry per generated token, ``top_logprobs`` the most likely first;
- completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, parallel lists;
  each ``top_logprobs`` entry maps token texts to logprobs, the sampled token's first, then the
  most likely (completions' ``logprobs: n`` asks for the sampled token and n more), and
  ``text_offset`` is where each token's text starts in the generated text, counted over the
  whole answer (across the chunks of a stream).

A token is named by its text alone (`ModelTokenizer.token_texts`, as vLLM names it); a logprob of
-inf is written as -9999.0, as vLLM and OpenAI do (JSON has no infinity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from controlplane.workers.client import TokenLogprob

TokenTexts = Callable[[Sequence[int]], list[str]]
"""Each token id's text alone (`ModelTokenizer.token_texts`)."""

MIN_LOGPROB: Final = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


class LogprobsWriter:
    """``choices[].logprobs`` of one answer, chunk by chunk (all its tokens at once, for a
    body); each endpoint's shape a subclass."""

    __slots__ = ("_token_texts",)

    def __init__(self, token_texts: TokenTexts) -> None:
        self._token_texts = token_texts

    def next(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The object for the answer's next ``token_ids``."""
        raise NotImplementedError

    def _names(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> dict[int, str]:
        """The text of every token the object names (sampled and top), decoded once each."""
        ids = list(dict.fromkeys([*token_ids, *(t for lp in logprobs for t, _ in lp.top)]))
        return dict(zip(ids, self._token_texts(ids), strict=True))


class ChatLogprobs(LogprobsWriter):
    __slots__ = ()

    def next(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        names = self._names(token_ids, logprobs)
        content = []
        for token_id, lp in zip(token_ids, logprobs, strict=True):
            token = names[token_id]
            content.append(
                {
                    "token": token,
                    "logprob": _finite(lp.logprob),
                    "bytes": _utf8(token),
                    "top_logprobs": [
                        {"token": names[t], "logprob": _finite(v), "bytes": _utf8(names[t])}
                        for t, v in lp.top
                    ],
                }
            )
        return {"content": content}


class CompletionLogprobs(LogprobsWriter):
    """Keeps the text offset of the answer's next token."""

    __slots__ = ("_offset",)

    def __init__(self, token_texts: TokenTexts) -> None:
        super().__init__(token_texts)
        self._offset = 0

    def next(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        names = self._names(token_ids, logprobs)
        tokens: list[str] = []
        offsets: list[int] = []
        top: list[dict[str, float]] = []
        for token_id, lp in zip(token_ids, logprobs, strict=True):
            token = names[token_id]
            tokens.append(token)
            offsets.append(self._offset)
            self._offset += len(token)
            step = {token: _finite(lp.logprob)}
            for t, v in lp.top:
                step.setdefault(names[t], _finite(v))
            top.append(step)
        return {
            "text_offset": offsets,
            "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
            "tokens": tokens,
            "top_logprobs": top,
        }
