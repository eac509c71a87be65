"""Stop strings over the whole generated text, with hold-back of possible stop-string starts."""

from __future__ import annotations

import random

import pytest

from controlplane.text.stop import StopMatch, StopStringMatcher


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool, str]:
    """Feed pieces until a stop; return what was released per piece, stopped, and the flush."""
    matcher = StopStringMatcher(stops)
    released: list[str] = []
    for piece in pieces:
        match = matcher.feed(piece)
        released.append(match.text)
        if match.stopped:
            return released, True, ""
    return released, False, matcher.flush()


# (id, stops, pieces, released per piece, stopped, flushed at the end)
CASES = [
    ("no-stops-pass-through", (), ["Hel", "lo"], ["Hel", "lo"], False, ""),
    ("match-inside-one-piece", ("lo w",), ["Hello world"], ["Hel"], True, ""),
    ("match-at-start", ("He",), ["Hello"], [""], True, ""),
    ("straddles-the-boundary", ("llo",), ["Hel", "lo", " x"], ["He", ""], True, ""),
    ("held-back-then-released", ("lox",), ["Hel", "lo", " world"], ["He", "l", "lo world"], False,
     ""),
    ("held-back-until-the-end", ("!?",), ["Hi", "!"], ["Hi", ""], False, "!"),
    ("spans-three-pieces", ("abcd",), ["xa", "b", "c", "dy"], ["x", "", "", ""], True, ""),
    ("earliest-of-several", ("world", "lo"), ["Hello world"], ["Hel"], True, ""),
    ("longer-stop-earlier", ("o w", "wor"), ["Hello world"], ["Hell"], True, ""),
    ("repeated-prefix", ("aab",), ["aa", "a", "b"], ["", "a", ""], True, ""),
    ("partial-then-mismatch", ("abc",), ["ab", "x", "abc"], ["", "abx", ""], True, ""),
    ("empty-pieces", ("xy",), ["", "a", "", "x", "y"], ["", "a", "", "", ""], True, ""),
    ("unicode", ("été",), ["un é", "té chaud"], ["un ", ""], True, ""),
    ("whole-stop-in-later-piece", ("END",), ["abc", "defEND"], ["abc", "def"], True, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stops", "pieces", "released", "stopped", "flushed"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_stop_matcher(
    stops: tuple[str, ...], pieces: list[str], released: list[str], stopped: bool, flushed: str
) -> None:
    assert run(stops, pieces) == (released, stopped, flushed)


def reference(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    """What an engine checking after every piece produces: the text up to the first piece that
    completes a stop string, cut where the one that completes earliest starts (ties: the first
    in the list), as vLLM's engine does."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [(i + len(s), n, i) for n, s in enumerate(stops) if (i := text.find(s)) != -1]
        if hits:
            return text[: min(hits)[2]], True
    return text, False


def test_output_equals_the_reference_for_any_split() -> None:
    """However the text is split into pieces, hold-back never changes the result: the released
    text equals the reference's, and nothing past a match is ever released."""
    rng = random.Random(0)
    alphabet = "ab c"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        )
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        released, stopped, flushed = run(stops, pieces)
        assert ("".join(released) + flushed, stopped) == reference(stops, pieces), (stops, pieces)


def test_held_back_property_and_feed_after_stop() -> None:
    matcher = StopStringMatcher(("abc",))
    assert matcher.feed("xab") == StopMatch("x", False)
    assert matcher.held_back == "ab"
    assert matcher.feed("c") == StopMatch("", True)
    with pytest.raises(RuntimeError):
        matcher.feed("more")


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(("",))


def _brute_partial_suffix(stops: tuple[str, ...], text: str) -> int:
    return max(
        (n for s in stops for n in range(1, len(s)) if n <= len(text) and text.endswith(s[:n])),
        default=0,
    )


def test_hold_back_is_the_longest_partial_match() -> None:
    """The hold-back (one find per first character) equals the brute-force definition: the
    longest suffix of the text that is a proper prefix of some stop string."""
    rng = random.Random(7)
    for _ in range(3000):
        stops = tuple(
            "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 4))
        )
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        matcher = StopStringMatcher(stops)
        assert matcher._longest_partial_suffix(text) == _brute_partial_suffix(stops, text), (
            stops,
            text,
        )


def test_bounded_stop_strings_at_their_limit() -> None:
    """Four stop strings of 256 characters against adversarial output (every character a
    possible start): matched and held back exactly as the definition says."""
    stops = tuple("a" * 255 + tail for tail in "bcde")
    matcher = StopStringMatcher(stops)
    released = "".join(matcher.feed("a" * 7).text for _ in range(100))
    assert released == "a" * (700 - 255)  # the last 255 characters may start a stop string
    assert matcher.held_back == "a" * 255
    match = matcher.feed("d")
    assert match == StopMatch("", True)


def _vllm_stop(stops: tuple[str, ...], tokens: list[str], min_tokens: int) -> tuple[str, bool]:
    """vLLM's engine, token by token: once the output is past ``min_tokens`` tokens, a stop
    string counts if it ends in the text of a token past them; the text is cut at its start."""
    text = ""
    offsets = []
    for n, token in enumerate(tokens, start=1):
        offsets.append(len(text))
        text += token
        if n <= min_tokens:
            continue
        window_start = offsets[min_tokens]
        best = None
        for stop in stops:
            at = text.find(stop, max(0, window_start - len(stop) + 1))
            while at != -1 and at + len(stop) <= window_start:
                at = text.find(stop, at + 1)
            if at != -1 and (best is None or at + len(stop) < best[1]):
                best = (at, at + len(stop))
        if best is not None:
            return text[: best[0]], True
    return text, False


def test_min_tokens_stop_strings_match_vllm() -> None:
    """Tokens within min_tokens are fed with can_stop=False: the result is vLLM's for any
    tokens, stops and min_tokens."""
    rng = random.Random(1)
    alphabet = "ab c"
    for _ in range(2000):
        tokens = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3)))
            for _ in range(rng.randint(1, 12))
        ]
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        )
        min_tokens = rng.randint(0, 8)
        matcher = StopStringMatcher(stops)
        out, stopped = "", False
        for i, token in enumerate(tokens):
            match = matcher.feed(token, can_stop=i >= min_tokens)
            out += match.text
            if match.stopped:
                stopped = True
                break
        if not stopped:
            out += matcher.flush()
        assert (out, stopped) == _vllm_stop(stops, tokens, min_tokens), (stops, tokens, min_tokens)
