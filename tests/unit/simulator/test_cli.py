"""``strata simulate`` end to end on a small config: results.json's shape, the plots, the
summary, and clear errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from strata.cli import main

PROFILE = (
    "name: small\nmodel: m\nhardware: h\nsource: a test\nkv_bytes_per_token: 1000\n"
    "hbm_kv_tokens: 200000\nmax_num_seqs: 16\nmax_num_batched_tokens: 2048\nmax_model_len: 8192\n"
    "step: {fixed_s: 0.005, per_prefill_token_s: 0.0001, per_cached_token_s: 0, "
    "per_attention_pair_s: 0, per_decode_sequence_s: 0.0005, per_context_token_s: 0}\n"
)
CONFIG = """\
name: small
profile: p.yaml
trace: t.jsonl
gpus: 4
gpus_per_host: 2
store: {dram: 1GiB}
slo: {ttft: 2s, tpot: 50ms}
rates: [1, 4]
strata_setup: strata
setups:
  - {name: colocated-rr, shape: colocated, policy: round_robin, pool: false}
  - {name: strata, shape: disaggregated, prefill_gpus: 2, policy: slo_aware}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = random.Random(7)
    lines = []
    for i in range(60):
        shared = rng.randrange(3)
        ids = [shared, 100 + i * 4, 101 + i * 4]
        lines.append(
            {"timestamp": i * 250, "input_length": 1200, "output_length": 20, "hash_ids": ids}
        )
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "p.yaml").write_text(PROFILE)
    (tmp_path / "c.yaml").write_text(CONFIG)
    return tmp_path


def test_simulate_writes_results_and_plots(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = folder / "out"
    code = main(["simulate", "--config", str(folder / "c.yaml"), "--out", str(out), "--jobs", "1"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["strata_policy"] == "strata"
    assert data["num_requests"] == 60
    assert set(data["policies"]) == {"colocated-rr", "strata"}
    for entry in data["policies"].values():
        assert [p["rate"] for p in entry["points"]] == [1.0, 4.0]
        assert entry["rate_at_90"] >= 0.0
        assert all(0.0 <= p["attainment"] <= 1.0 for p in entry["points"])
    assert (out / "goodput.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "cdf.png").read_bytes()[:4] == b"\x89PNG"
    assert "rate at 90 % SLO attainment" in capsys.readouterr().out


def test_simulate_with_a_planner_reports_pools_and_gpu_seconds(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planned = CONFIG.replace("rates: [1, 4]", "rates: [2, 6]\n" + (
        "rate_profile: [[0, 0.2], [8s, 1.0], [15s, 0.2]]\n"
        "planner: {interval: 2s, engine_start: 1s, scale_down_after: 2}"
    )) + (
        "  - {name: planned, shape: disaggregated, prefill_gpus: 1, decode_gpus: 1, "
        "policy: slo_aware, planner: strata}\n"
    )  # fmt: skip
    (folder / "c.yaml").write_text(planned)
    out = folder / "out"
    code = main(["simulate", "--config", str(folder / "c.yaml"), "--out", str(out), "--jobs", "1"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["rate_profile"] == [[0.0, 0.2], [8.0, 1.0], [15.0, 0.2]]
    entry = data["policies"]["planned"]
    assert entry["planner"] == "strata"
    for rate in ("2.0", "6.0"):
        timeline = entry["pools"][rate]
        assert timeline[0] == [0.0, 1, 1]
        assert all(p >= 1 and d >= 1 and p + d <= 4 for _, p, d in timeline)
    fixed = data["policies"]["strata"]["points"]
    for point, fixed_point in zip(entry["points"], fixed, strict=True):
        # Fixed pools hold all 4 GPUs all along; the planner's are never larger.
        assert point["gpu_seconds"] <= fixed_point["gpu_seconds"] + 1e-6
        assert fixed_point["gpu_seconds"] == pytest.approx(4 * fixed_point["makespan_s"], rel=0.01)
    assert (out / "pools.png").read_bytes()[:4] == b"\x89PNG"
    assert "GPU-s per 1k met" in capsys.readouterr().out


def test_simulate_names_what_is_wrong(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "c.yaml").write_text(CONFIG.replace("gpus: 4", "gpus: four"))
    assert main(["simulate", "--config", str(folder / "c.yaml"), "--out", str(folder)]) == 1
    assert "c.yaml" in capsys.readouterr().err
    missing = folder / "nothing.yaml"
    assert main(["simulate", "--config", str(missing), "--out", str(folder)]) == 1
    assert "cannot read the config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--config", str(folder / "c.yaml"), "--jobs", "-1"])
    assert exc.value.code == 2


def test_a_replay_simulation_scales_the_trace_and_keeps_every_request(folder: Path) -> None:
    """``replay:`` shrinks the requests as loadtests/replay_trace.py sends them (1,200 trace
    tokens = 38 tokens at 16 per 512-token block, outputs capped); ``--per-request true`` keeps
    each request's TTFT and TPOT by its trace index."""
    replay = "replay: {block_tokens: 16, max_output_tokens: 8}\ncache_block_tokens: 16\n"
    (folder / "c.yaml").write_text(CONFIG + replay)
    out = folder / "out"
    argv = ["simulate", "--config", str(folder / "c.yaml"), "--out", str(out), "--jobs", "1"]
    assert main([*argv, "--per-request", "true"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["replay"] == {"block_tokens": 16, "max_output_tokens": 8}
    strata = data["policies"]["strata"]
    assert set(strata["requests"]) == {"1.0", "4.0"}
    rows = strata["requests"]["1.0"]
    assert [index for index, _, _ in rows] == list(range(60))
    assert all(ttft > 0 and tpot > 0 for _, ttft, tpot in rows)
    # A 38-token prompt: a few milliseconds of prefill, not the 1,200 tokens' 120 ms.
    assert strata["points"][0]["ttft_p50_s"] < 0.05
    (folder / "c.yaml").write_text(CONFIG + replay.replace("cache_block_tokens: 16\n", ""))
    assert main(argv) == 1  # cache blocks of 512 tokens while a trace block is 16


def test_without_per_request_the_results_keep_no_request_list(folder: Path) -> None:
    out = folder / "out"
    argv = ["simulate", "--config", str(folder / "c.yaml"), "--out", str(out), "--jobs", "1"]
    assert main(argv) == 0
    assert "requests" not in json.loads((out / "results.json").read_text())["policies"]["strata"]
