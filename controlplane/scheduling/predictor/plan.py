"""The start-up profile's plan: which prefill and decode points a worker is timed at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


# -- profile plan ------------------------------------------------------------------------------

HANDOFF_DECODE_TOKENS: Final = 4
"""Tokens a profiled hand-off generates: its first chunk, then three steps to time."""


@dataclass(frozen=True, slots=True)
class ProfilePlan:
    """The points to time when a worker becomes ready (the registry runs them, then calls
    :meth:`LatencyPredictor.calibrate`).

    ``prefill_points``: ``(new_tokens, cached_tokens)``; run a prompt of ``cached + new`` tokens
    whose first ``cached`` tokens a previous request has just computed (so they are cached), and
    time the prefill (the worker's ``engine_time_s``). ``decode_points``: ``(batch_size,
    context_tokens)``; run ``batch_size`` sequences of ``context_tokens / batch_size`` tokens each
    and time the mean step. ``repeats``: how many times to time each point. ``handoff_points``:
    ``(new_tokens, cached_tokens)`` of a decode instance taking over a prefilled request: the
    pool holds whole blocks only, so it computes the last partial block plus the first token
    (``block_size/2 + 1`` tokens on average) after ``cached`` tokens (see
    :attr:`LatencyPredictor.handoff_s`).
    """

    prefill_points: tuple[tuple[int, int], ...]
    decode_points: tuple[tuple[int, int], ...]
    repeats: int = 2
    handoff_points: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_engine(cls, max_model_len: int, block_size: int, max_num_seqs: int) -> ProfilePlan:
        """A small grid spanning the engine's limits.

        Prefill: new tokens doubling from one block to half the context, plus one prompt filling
        the whole context; each with nothing cached, a quarter and half of the context cached,
        and as much as fits. The cached levels separate ``a2`` and the ``n·c`` part of ``a3``
        from the per-new-token terms; the long points give the ``n²`` curvature. Decode: batch
        sizes doubling from 1 to ``max_num_seqs``, each with one block, half the context and the
        whole context per sequence. Cached sizes are whole blocks (only those can hit).
        """
        if max_model_len < 4 or block_size < 1 or max_num_seqs < 1:
            raise ValueError("need max_model_len >= 4, block_size >= 1, max_num_seqs >= 1")
        limit = max_model_len - 1  # prompt tokens; at least one token is left to generate
        half = max_model_len // 2
        news: list[int] = []
        new = min(block_size, half)
        while new <= half:
            news.append(new)
            new *= 2
        news.append(max(limit - block_size, half))
        if len(news) < 3:  # blocks as large as the context: still three sizes for the curve
            news = [max(1, limit // 4), max(1, limit // 2), limit]

        def whole_blocks(tokens: int) -> int:
            return (tokens // block_size) * block_size

        prefill: set[tuple[int, int]] = set()
        for n in news:
            for c in (0, whole_blocks(max_model_len // 4), whole_blocks(half), limit - n):
                c = whole_blocks(c)
                if c >= 0 and n + c <= limit:
                    prefill.add((n, c))
        batches: list[int] = []
        batch = 1
        while batch < max_num_seqs:
            batches.append(batch)
            batch *= 2
        batches.append(max_num_seqs)
        per_sequence = (min(block_size, half), half, limit)
        decode = dict.fromkeys((b, b * s) for b in batches for s in per_sequence)
        tail = block_size // 2 + 1
        handoff = dict.fromkeys(
            (tail, c)
            for c in (block_size, whole_blocks(half))
            if c >= block_size and c + tail + HANDOFF_DECODE_TOKENS <= limit
        )
        return cls(tuple(sorted(prefill)), tuple(decode), handoff_points=tuple(handoff))
