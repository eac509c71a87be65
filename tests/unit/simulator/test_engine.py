"""The engine model reproduces hand-computed timelines exactly (issue 13, acceptance 6).

Profile of the cases: a step costs 10 ms, plus 1 ms per prompt token computed and 1 ms per
decoding sequence (every other coefficient 0), so each step's length is read off its batch;
a budget of 8 tokens a step, 2 sequences at most, KV blocks of 4 tokens, cache blocks of 4."""

from __future__ import annotations

import pytest

from simulator.engine import SimEngine, SimSequence, StepReport
from simulator.profile import EngineProfile, StepModel, attention_pairs

MS = 1e-3
KEYS = tuple(bytes([i]) * 16 for i in range(1, 9))


def profile(hbm_kv_tokens: int = 32, **step: float) -> EngineProfile:
    coefficients = {
        "fixed_s": 10 * MS,
        "per_prefill_token_s": 1 * MS,
        "per_cached_token_s": 0.0,
        "per_attention_pair_s": 0.0,
        "per_decode_sequence_s": 1 * MS,
        "per_context_token_s": 0.0,
    } | step
    return EngineProfile(
        name="hand",
        model="hand",
        hardware="none",
        source="test",
        step=StepModel(**coefficients),
        kv_bytes_per_token=1,
        hbm_kv_tokens=hbm_kv_tokens,
        max_num_seqs=2,
        max_num_batched_tokens=8,
        max_model_len=64,
    )


def engine(hbm_kv_tokens: int = 32, **kw: object) -> tuple[SimEngine, list[tuple[str, int]]]:
    events: list[tuple[str, int]] = []

    def publish(stored: tuple[bytes, ...], removed: tuple[bytes, ...]) -> None:
        events.extend(("stored", KEYS.index(k)) for k in stored)
        events.extend(("removed", KEYS.index(k)) for k in removed)

    e = SimEngine(
        "e0",
        profile(hbm_kv_tokens),
        kv_block_tokens=4,
        cache_block_tokens=4,
        publish=publish,
        **kw,  # type: ignore[arg-type]
    )
    return e, events


def run(e: SimEngine) -> list[tuple[float, float, list[tuple[int, int, bool]]]]:
    """Step until idle: (start, end, [(request, new tokens, finished)]) per step."""
    now, steps = 0.0, []
    while e.has_work:
        duration = e.start_step(now)
        assert duration is not None
        report: StepReport = e.finish_step()
        end = now + duration
        outs = [(o.sequence.request_id, o.new_tokens, o.finished) for o in report.outputs]
        steps.append((round(now, 6), round(end, 6), outs))
        now = end
    return steps


def test_chunked_prefill_then_decode_timeline() -> None:
    e, events = engine()
    e.add(SimSequence(0, 10, 3, KEYS[:2]), 0.0)  # A: 10 prompt tokens, 3 to generate
    e.add(SimSequence(1, 5, 2, KEYS[4:5]), 0.0)  # B: 5 prompt tokens, 2 to generate
    assert run(e) == [
        (0.0, 0.018, [(0, 0, False)]),  # A's first 8 tokens: 10 + 8 ms; B waits (no budget)
        (0.018, 0.035, [(0, 1, False), (1, 1, False)]),  # A's last 2 + B's 5: 10 + 7
        (0.035, 0.047, [(0, 1, False), (1, 1, True)]),  # two decodes: 10 + 2
        (0.047, 0.058, [(0, 1, True)]),  # A alone: 10 + 1
    ]
    # Whole blocks of computed prompts are cached and published once (A: 2, B: 1).
    assert events == [("stored", 0), ("stored", 1), ("stored", 4)]
    assert e.used_tokens == 12  # the three cached blocks; nothing else held
    assert e.num_steps == 4 and e.busy_s == pytest.approx(0.058)


def test_prefix_hits_skip_compute_but_never_the_last_token() -> None:
    e, _ = engine()
    e.add(SimSequence(0, 9, 1, KEYS[:2]), 0.0)
    run(e)  # caches blocks 0 and 1
    e.add(SimSequence(1, 9, 1, KEYS[:2]), 1.0)  # the same 9-token prompt: 8 tokens hit
    e.add(SimSequence(2, 8, 1, KEYS[:2]), 1.0)  # 8 tokens: only (8-1)//4 = 1 block may hit
    duration = e.start_step(1.0)
    report = e.finish_step()
    assert [(o.sequence.hit_tokens, o.sequence.computed) for o in report.outputs] == [
        (8, 9),
        (4, 8),
    ]
    assert duration == pytest.approx((10 + 1 + 4) * MS)  # 1 + 4 tokens computed


def test_recompute_preemption_when_a_decode_finds_no_room() -> None:
    # 12 tokens of KV: A (4-token prompt) and B (4) fit; their growth does not.
    e, events = engine(hbm_kv_tokens=12)
    e.add(SimSequence(0, 4, 6, ()), 0.0)
    e.add(SimSequence(1, 4, 6, ()), 0.0)
    steps = run(e)
    assert steps[0] == (0.0, 0.018, [(0, 1, False), (1, 1, False)])  # both prompts: 10 + 8
    # Step 2: A needs a block for its 5th token (8 tokens held of 12): room. B's 5th too: none
    # left, so B (the last admitted) is preempted, back to the queue with 5 tokens to recompute.
    assert steps[1] == (0.018, 0.029, [(0, 1, False)])
    assert e.num_preemptions >= 1
    total = {rid: 0 for rid in (0, 1)}
    for _, _, outs in steps:
        for rid, new, _ in outs:
            total[rid] += new
    assert total == {0: 6, 1: 6}  # every token generated once, preemption or not
    assert e.used_tokens == 0 and not events  # no whole cache block (no keys)


def test_synchronous_and_asynchronous_loads() -> None:
    def load(seq: SimSequence, start: int, limit: int) -> tuple[int, float]:
        if seq.request_id:
            return 0, 0.0  # the pool has nothing of the others
        return min(limit, 8 - start), 0.5  # it has A's first 8 tokens: 0.5 s to load

    sync, _ = engine(load=load)
    sync.add(SimSequence(0, 10, 1, ()), 0.0)
    assert sync.start_step(0.0) == pytest.approx(0.5 + (10 + 2) * MS)  # the step waits

    async_, _ = engine(load=load, async_load=True)
    async_.add(SimSequence(0, 10, 1, ()), 0.0)
    async_.add(SimSequence(1, 3, 1, ()), 0.0)
    assert async_.start_step(0.0) == pytest.approx((10 + 3) * MS)  # only B steps
    async_.finish_step()
    assert async_.start_step(0.013) is None  # A still loading, nothing else to do
    assert async_.next_ready_at() == pytest.approx(0.5)
    assert async_.start_step(0.5) == pytest.approx((10 + 2) * MS)  # A's last 2 tokens


def test_step_model_terms() -> None:
    model = StepModel(0.01, 1e-3, 1e-4, 1e-6, 2e-3, 1e-5)
    # 8 new tokens after 4 earlier ones: 8*4 + 8*9/2 = 68 pairs; 2 decodes of 100 tokens.
    assert attention_pairs(8, 4) == 68
    assert model.step_s(8, 4, 68, 2, 200) == pytest.approx(0.01 + 8e-3 + 4e-4 + 68e-6 + 4e-3 + 2e-3)
    assert model.prefill_s(8, 4) == pytest.approx(0.01 + 8e-3 + 4e-4 + 68e-6)
    assert model.decode_step_s(2, 200) == pytest.approx(0.01 + 4e-3 + 2e-3)


def test_a_prompt_that_cannot_fit_evicts_nothing() -> None:
    # 16 tokens of HBM: blocks K1 and K2 cached (8 tokens, evictable), one 4-token sequence
    # running (4 tokens). A 13-token prompt needs 16: even evicting both blocks leaves 12 —
    # it waits, and the cache stays (vLLM counts free + evictable blocks before evicting).
    e, events = engine(hbm_kv_tokens=16)
    e.add(SimSequence(0, 8, 1, KEYS[:2]), 0.0)
    run(e)
    assert events == [("stored", 0), ("stored", 1)]
    e.add(SimSequence(1, 3, 4, ()), 0.0)
    assert e.start_step(0.0) is not None
    e.finish_step()  # the 3-token sequence holds 4 tokens and decodes
    e.add(SimSequence(2, 13, 1, ()), 0.0)
    assert e.start_step(0.0) is not None
    report = e.finish_step()
    assert [o.sequence.request_id for o in report.outputs] == [1]  # only the running one
    assert events == [("stored", 0), ("stored", 1)]  # nothing evicted, nothing published
    assert e.cached_blocks(KEYS[:2]) == 2


def test_abort_frees_a_sequence_waiting_running_or_in_the_step() -> None:
    e, _ = engine()
    a, b, c = SimSequence(0, 4, 5, ()), SimSequence(1, 4, 5, ()), SimSequence(2, 4, 5, ())
    for seq in (a, b, c):
        e.add(seq, 0.0)
    e.start_step(0.0)  # A and B (2 sequences at most) compute their prompts; C waits
    e.finish_step()
    assert e.used_tokens == 8 and len(e.running) == 2 and list(e.waiting) == [c]
    e.abort(c)  # waiting: gone, it held nothing
    e.abort(b)  # running, between steps: its KV back now
    assert list(e.waiting) == [] and e.running == [a] and e.used_tokens == 4
    e.start_step(0.1)
    e.abort(a)  # in the running step: it finishes the step, then leaves, its KV freed
    assert e.running == [a]
    report = e.finish_step()
    assert report.outputs == () and e.running == [] and e.used_tokens == 0
    assert not e.has_work


def test_held_tokens_leave_out_cache_blocks_no_sequence_uses() -> None:
    e, _ = engine()
    e.add(SimSequence(0, 9, 2, KEYS[:2]), 0.0)
    e.start_step(0.0)
    e.finish_step()  # prompt computed: 2 whole blocks cached (pinned by it), 1 token private
    assert (e.used_tokens, e.held_tokens) == (12, 12)
    run(e)
    assert (e.used_tokens, e.held_tokens) == (8, 0)  # the two cache blocks stay, unheld
