"""What the gateway tells the planner about each request, summed per interval."""

from __future__ import annotations

from controlplane.planning.types import LoadSample

__all__ = ["LoadMeter"]


class LoadMeter:
    """Sums of one planning interval; :meth:`take` returns them as a :class:`LoadSample` and
    starts the next interval. One owner (the gateway's scheduling state); not thread-safe."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._requests = self._prompt = self._computed = 0
        self._finished = self._output = 0
        self._ttft_s = 0.0
        self._ttfts = 0
        self._itl_s = 0.0
        self._itls = 0

    def arrived(self, prompt_tokens: int, computed_tokens: int) -> None:
        """A request was decided (admitted or refused): its prompt and the part of it that was
        not cached."""
        self._requests += 1
        self._prompt += max(0, prompt_tokens)
        self._computed += min(max(0, prompt_tokens), max(0, computed_tokens))

    def first_token(self, ttft_s: float) -> None:
        self._ttft_s += ttft_s
        self._ttfts += 1

    def finished(self, output_tokens: int, itl_s: float | None, *, request: bool = True) -> None:
        """A request ended with ``output_tokens``; ``itl_s``: its mean time between tokens
        (None with fewer than two). ``request`` False: another of a request's ``n`` samples
        ended (its tokens count, the request was counted by its first sample)."""
        self._finished += int(request)
        self._output += max(0, output_tokens)
        if itl_s is not None:
            self._itl_s += itl_s
            self._itls += 1

    def take(self, duration_s: float, decode_batch: float | None = None) -> LoadSample:
        sample = LoadSample(
            duration_s=duration_s,
            requests=self._requests,
            prompt_tokens=self._prompt,
            computed_tokens=self._computed,
            output_tokens=self._output,
            finished=self._finished,
            ttft_s=self._ttft_s / self._ttfts if self._ttfts else None,
            itl_s=self._itl_s / self._itls if self._itls else None,
            decode_batch=decode_batch,
        )
        self._reset()
        return sample
