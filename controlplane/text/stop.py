"""Stop strings applied by the gateway over the whole generated text.

Why the gateway checks at all, when both workers are given the stop strings: each worker only sees
its own output. The prefill worker produces the first token and the decode worker the rest, so a
stop string that begins in the first token and ends in the decode output ("Hel" | "lo" with stop
"ello") is invisible to both. The gateway sees the concatenation.

Hold-back: text is released only when no stop string can still begin inside it. After each piece,
the longest suffix of the unreleased text that is a proper prefix of some stop string is kept back;
everything before it is released. A match must therefore start inside the unreleased text (a match
starting earlier would have had its beginning held back), so searching only that text is complete,
and released text never needs to be taken back. At the end of a generation that did not stop on a
string (EOS, length), `flush()` releases what was held back.

Cost per piece: one `find` per stop string over the unreleased text and, for the hold-back, one
comparison per occurrence of the stop string's first character in its last len(stop) - 1
characters; both in C (no per-character Python loop).

A stop is detected as soon as a piece completes one, like the engine's own per-step check; the
text is cut where the stop string that completes earliest starts (ties: the first in the
request's list, as vLLM's engine chooses), and the stop string is not part of the output
(OpenAI's and vLLM's default). A piece fed with ``can_stop=False`` (the tokens
within ``min_tokens``) cannot complete one: its complete matches are released as text, and only
the hold-back carries over, so a stop string that begins there and ends in a later piece still
matches — vLLM's window over the text of the tokens past ``min_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StopMatch", "StopStringMatcher"]


@dataclass(frozen=True, slots=True)
class StopMatch:
    """Result of feeding a piece of text: what may be sent now, and whether a stop string hit."""

    text: str
    stopped: bool


class StopStringMatcher:
    """Incremental stop-string detection with hold-back; one instance per generated sequence."""

    __slots__ = ("_pending", "_quiet", "_stopped", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = stops
        self._pending = ""
        self._quiet = 0
        """How much of the held-back text came with ``can_stop=False``: no match ends in it."""
        self._stopped = False

    @property
    def held_back(self) -> str:
        """Text received but not yet released (it might be the start of a stop string)."""
        return self._pending

    def feed(self, text: str, *, can_stop: bool = True) -> StopMatch:
        """Add newly generated text; return what can be released and whether generation stops.
        ``can_stop`` False: no stop string may end in this text (vLLM's ``min_tokens``: stop
        strings count once they end in the text of a token past it); one that begins in it and
        ends in text fed later still does, as held-back text."""
        if self._stopped:
            raise RuntimeError("feed() after a stop string matched")
        if not self._stops:
            return StopMatch(text, False)
        pending = self._pending + text
        cut = self._earliest_match(pending, self._quiet) if can_stop else None
        if cut is not None:
            self._pending = ""
            self._stopped = True
            return StopMatch(pending[:cut], True)
        hold = self._longest_partial_suffix(pending)
        release_end = len(pending) - hold
        self._pending = pending[release_end:]
        quiet = len(pending) if not can_stop else self._quiet
        self._quiet = max(0, quiet - release_end)
        return StopMatch(pending[:release_end], False)

    def flush(self) -> str:
        """Release the held-back text (the generation ended without a stop string)."""
        text, self._pending, self._quiet = self._pending, "", 0
        return text

    def _earliest_match(self, text: str, min_end: int) -> int | None:
        """Where the stop string that completes earliest, after ``min_end``, starts (ties: the
        first in the request's list), as vLLM's engine chooses."""
        best: int | None = None
        best_end = 0
        for stop in self._stops:
            index = text.find(stop, max(0, min_end - len(stop) + 1))
            if index != -1 and (best is None or index + len(stop) < best_end):
                best, best_end = index, index + len(stop)
        return best

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string.

        Only a position where the stop string's first character occurs can start one, and the
        first such position (within the last len(stop) - 1 characters) that does is the longest:
        one `find` and, per candidate, one comparison, all in C. The gateway bounds the strings
        (4 of at most 256 characters, api/openai_protocol.py), so a piece costs a few
        microseconds even for adversarial stop strings and output."""
        longest = 0
        end = len(text)
        for stop in self._stops:
            first = stop[0]
            at = text.find(first, max(0, end - len(stop) + 1), end)
            while at != -1 and end - at > longest:
                if stop.startswith(text[at:]):
                    longest = end - at
                    break
                at = text.find(first, at + 1, end)
        return longest
