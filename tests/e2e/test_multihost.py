"""Strata on hosts that are really apart (the multi-host issue's acceptance 1; its layout and the
KV path: docs/design/multihost.md).

Five network-namespace hosts (tests/netns.py): Valkey on ``redis``; the gateway on ``gw``; a store
node and a prefill worker on ``a``; a store node and a decode worker on ``b``; the client on
``client``. Each process is started with the command line an operator would use, on its host's
address, in TLS mode with a certificate of its own (`strata certs`), and the cluster key file for
the derived keys; API keys on the gateway's HTTP port. The KV of a prefill on host A reaches the
decode on host B through B's own node, which reads it from A's (counted in B's STATS
``transfers.read_through_blocks``). Greedy output is token-identical to one plain engine, and a
second request sharing the prompt's prefix hits the blocks stored on the first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import run_reference
from tests.e2e.multihost_cluster import Deployment, deploy
from tests.netns import unavailable

REASON = unavailable()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.slow,
    pytest.mark.timeout(1500),
]
PROMPT = "The cluster on many hosts " + " ".join(f"block{i} of the prompt" for i in range(60))
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def deployment(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with deploy(tiny_model_dir, tmp_path_factory.mktemp("multihost")) as d:
        yield d


def test_kv_crosses_hosts_and_output_is_token_identical(
    deployment: Deployment, tiny_model_dir: Path
) -> None:
    first = deployment.complete(PROMPT, MAX_TOKENS)
    (reference,) = run_reference(
        tiny_model_dir,
        [{"kind": "completion", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}],
    )
    assert first["token_ids"] == reference["token_ids"], (first, reference)
    # The decode on B loaded the prompt's blocks from A's node, through its own.
    b = deployment.store_stats("b")["transfers"]
    assert b["read_through_blocks"] > 0, b
    # A second request sharing the prompt's prefix hits the blocks stored by the first.
    second = deployment.complete(PROMPT + " and one more sentence", MAX_TOKENS)
    assert second["cached_tokens"] > 0, second
    print(
        f"blocks read through into B: {b['read_through_blocks']}; "
        f"second request cached tokens: {second['cached_tokens']}"
    )


def test_cross_host_kv_bandwidth_beside_the_raw_link(deployment: Deployment) -> None:
    """Blocks read through B's node from A's, unshaped and with both links held to 1 Gbit/s by
    tbf, each beside a raw TCP socket from A to B over the same link in the same run."""
    d, count, size = deployment, 64, 1 << 20
    try:
        for seed, mbit in ((1, None), (2, 1000)):
            if mbit is not None:
                d.net.shape("a", mbit=mbit)
                d.net.shape("b", mbit=mbit)
            raw_bytes, raw_s = d.raw_bandwidth("a", "b", count * size)
            kv_bytes, kv_s = d.kv_bandwidth(seed=seed, count=count, size=size)
            raw, kv = raw_bytes * 8 / raw_s / 1e6, kv_bytes * 8 / kv_s / 1e6
            link = "unshaped" if mbit is None else f"tbf {mbit} Mbit/s"
            print(
                f"{link}: KV read-through {kv:.0f} Mbit/s, raw socket {raw:.0f} Mbit/s "
                f"({kv / raw:.0%}); {count} blocks of {size >> 10} KiB"
            )
            assert kv_bytes == raw_bytes == count * size
            if mbit is not None:  # an upper bound only: tbf holds both to the rate (+ burst)
                assert kv <= mbit * 1.1 and raw <= mbit * 1.1, (kv, raw)
    finally:
        d.net.unshape("a")
        d.net.unshape("b")
