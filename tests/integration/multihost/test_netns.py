"""The namespace hosts (tests/netns.py): reachable from each other and from nowhere else, cut,
partitioned and healed, shaped by tbf, and gone without a trace afterwards, also on failure."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.netns import PREFIX, Network, remove_stale, unavailable

REASON = unavailable()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.timeout(120),
]
PORT = 9000
TOOL = [sys.executable, "-m", "tests.integration.multihost.sockets_tool"]


def _send(net: Network, source: str, target: str, nbytes: int) -> tuple[int, float]:
    """Bytes the server on ``target`` received from ``source``, and the seconds it took."""
    done = net[source].run(
        [*TOOL, "send", net[target].address, str(PORT), str(nbytes)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    received, seconds = done.stdout.split()
    return int(received), float(seconds)


def _reaches(net: Network, source: str, target: str) -> bool:
    done = net[source].run(
        [*TOOL, "send", net[target].address, str(PORT), "1"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


@pytest.fixture
def net() -> Iterator[Network]:
    with Network(["a", "b", "c"]) as net:
        for name in ("a", "b"):
            server = net[name].popen(
                [*TOOL, "serve", net[name].address, str(PORT)], stdout=subprocess.PIPE, text=True
            )
            assert server.stdout is not None and server.stdout.readline() == "listening\n"
        yield net


def _our_names(net_tag: str) -> list[str]:
    listed = (
        subprocess.run(
            ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
        + subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    return [w for w in listed.replace(":", " ").split() if w.startswith(PREFIX + net_tag)]


def test_hosts_reach_each_other_and_nothing_else(net: Network) -> None:
    assert _send(net, "b", "a", 3 << 20)[0] == 3 << 20
    assert _send(net, "c", "b", 1000)[0] == 1000
    assert len({h.address for h in net.hosts.values()}) == 3
    # The bridge has no address: the machine's own namespace is not on the hosts' subnet.
    shown = subprocess.run(
        ["ip", "-o", "addr", "show", "dev", net.bridge], capture_output=True, text=True, check=True
    )
    assert " inet" not in shown.stdout


def test_cut_partition_and_heal(net: Network) -> None:
    net.partition("b", "a")
    assert not _reaches(net, "b", "a")
    assert not _reaches(net, "a", "b")  # both sides drop
    assert _reaches(net, "c", "a")
    net.heal("b", "a")
    assert _reaches(net, "b", "a") and _reaches(net, "a", "b")
    net.cut("a")
    assert not _reaches(net, "b", "a") and not _reaches(net, "c", "a")
    assert _reaches(net, "c", "b")
    net.heal("a")
    assert _reaches(net, "b", "a")


def test_a_shaped_link_carries_at_most_its_rate(net: Network) -> None:
    nbytes = 16 << 20
    _, unshaped_s = _send(net, "b", "a", nbytes)
    net.shape("a", mbit=200)
    received, shaped_s = _send(net, "b", "a", nbytes)
    rate_mbit = received * 8 / shaped_s / 1e6
    print(f"unshaped {nbytes * 8 / unshaped_s / 1e6:.0f} Mbit/s, shaped {rate_mbit:.0f} Mbit/s")
    # An upper bound only (a slow host sends slower, never faster): tbf holds it to 200 Mbit/s,
    # plus its burst (256 KiB) over the transfer.
    assert received == nbytes and rate_mbit <= 200 * 1.1
    net.unshape("a")
    assert _send(net, "b", "a", 1000)[0] == 1000


def test_everything_is_removed_after_the_block_also_on_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"), Network(["x", "y"]) as net:
        sleeper = net["x"].popen(["sleep", "600"])
        tag = net.tag
        assert len(_our_names(tag)) >= 5  # bridge, 2 links, 2 namespaces
        raise RuntimeError("boom")
    assert sleeper.wait(timeout=15) is not None  # killed with its host
    assert _our_names(tag) == []
    assert not [name for name in remove_stale() if tag in name]  # nothing left by this run
