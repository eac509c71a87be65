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
