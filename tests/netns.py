"""Hosts that are really apart, on one machine: network namespaces joined by a bridge.

``with Network(["redis", "gw", "a", "b"]) as net:`` creates one network namespace per host, each
with its own loopback and one interface ``eth0`` holding its address (10.R.S.N/24, R.S random
per network, N = 1 + the host's index), joined by a bridge in the root namespace that has no
address: traffic goes only between the namespaces this network created, never to the machine's
own interfaces or beyond. ``net["a"].popen([...])`` runs a process inside host ``a``
(``ip netns exec``); ``net.shape("a", mbit=1000)`` limits host a's link both ways with ``tbf``
(``netem`` is not in this kernel: no delay or loss); ``net.cut("a")`` takes its link down (host
loss as its peers see it), ``net.partition("gw", "b")`` drops only the traffic between two hosts
(blackhole routes on both sides), and ``net.heal(...)`` undoes either.

Leaving the ``with`` block (also on an exception) kills every process still running in the
network's namespaces and deletes the namespaces, the veth pairs and the bridge; names carry a
random per-network tag (``stN<tag>``), so concurrent networks never touch each other's, and
:func:`remove_stale` deletes what a killed run left behind (namespaces whose tag has no live
owner process).

Needs root and the ``ip`` and ``tc`` commands (iproute2); :func:`unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Host", "Network", "remove_stale", "unavailable"]

PREFIX = "stn"
"""Every namespace, veth and bridge name starts with this."""
_OWNER_DIR = Path("/run/strata-netns")
"""One file per live network, named by its tag, holding its owner's pid (for remove_stale)."""


def unavailable() -> str | None:
    """Why networks cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command (iproute2) is not installed"
    probe = f"{PREFIX}probe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def _tc(*args: str, netns: str | None = None) -> None:
    argv = ["tc", *args] if netns is None else ["ip", "netns", "exec", netns, "tc", *args]
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Host:
    """One host: its namespace, its address and the root-side end of its link."""

    name: str
    netns: str
    address: str
    link: str
    """The veth end in the root namespace (on the bridge)."""

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host (keyword arguments as for :class:`subprocess.Popen`)."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside this host to its end (``check=True`` unless given)."""
        kwargs.setdefault("check", True)
        return subprocess.run(self.argv(argv), **kwargs)

    def pids(self) -> list[int]:
        """The processes running in this host's namespace."""
        out = _ip("netns", "pids", self.netns)
        return [int(p) for p in out.split()]


@dataclass
class Network:
    """Hosts named ``names`` on one bridge (see the module docstring)."""

    names: Sequence[str]
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    hosts: dict[str, Host] = field(init=False, default_factory=dict)
    subnet: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if not 1 <= len(self.names) <= 200 or len(set(self.names)) != len(self.names):
            raise ValueError("need 1 to 200 distinct host names")
        self.subnet = f"10.{random.randrange(64, 250)}.{random.randrange(1, 255)}"
        self.bridge = f"{PREFIX}{self.tag}br"
        """The bridge in the root namespace (no address)."""

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # -- life --------------------------------------------------------------------------------

    def __enter__(self) -> Network:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        _OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (_OWNER_DIR / self.tag).write_text(str(os.getpid()))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "addrgenmode", "none")  # no IPv6 link-local either
        _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self.names):
            netns = f"{PREFIX}{self.tag}h{index}"
            link = f"{PREFIX}{self.tag}v{index}"
            host = Host(name, netns, f"{self.subnet}.{index + 1}", link)
            _ip("netns", "add", netns)
            self.hosts[name] = host
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", link, "addrgenmode", "none")
            _ip("link", "set", link, "master", self.bridge)
            _ip("link", "set", link, "up")
            _ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=netns)
            _ip("link", "set", "eth0", "up", netns=netns)
            _ip("link", "set", "lo", "up", netns=netns)

    def close(self) -> None:
        """Kill what runs in the hosts, delete them, their links and the bridge."""
        for host in self.hosts.values():
            with contextlib.suppress(subprocess.CalledProcessError):
                _kill_all(host)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.netns)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", host.link)  # gone with the namespace, usually
        self.hosts.clear()
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.bridge)
        with contextlib.suppress(FileNotFoundError):
            (_OWNER_DIR / self.tag).unlink()

    # -- faults and shaping ------------------------------------------------------------------

    def shape(self, name: str, *, mbit: float, burst_kib: int = 256) -> None:
        """Limit host ``name``'s link to ``mbit`` Mbit/s each way (``tbf`` on both veth ends)."""
        host = self.hosts[name]
        spec = [
            "root", "tbf", "rate", f"{mbit}mbit", "burst", f"{burst_kib}kb", "latency", "50ms",
        ]  # fmt: skip
        _tc("qdisc", "replace", "dev", host.link, *spec)
        _tc("qdisc", "replace", "dev", "eth0", *spec, netns=host.netns)

    def unshape(self, name: str) -> None:
        host = self.hosts[name]
        with contextlib.suppress(subprocess.CalledProcessError):
            _tc("qdisc", "del", "dev", host.link, "root")
        with contextlib.suppress(subprocess.CalledProcessError):
            _tc("qdisc", "del", "dev", "eth0", "root", netns=host.netns)

    def cut(self, name: str) -> None:
        """Host ``name``'s link goes down: every peer loses it at once (its processes live on)."""
        _ip("link", "set", self.hosts[name].link, "down")

    def partition(self, first: str, second: str) -> None:
        """Drop the traffic between two hosts only (each routes the other into a blackhole)."""
        a, b = self.hosts[first], self.hosts[second]
        _ip("route", "add", "blackhole", f"{b.address}/32", netns=a.netns)
        _ip("route", "add", "blackhole", f"{a.address}/32", netns=b.netns)

    def heal(self, first: str, second: str | None = None) -> None:
        """Undo :meth:`cut` of ``first`` (one name) or :meth:`partition` of the pair."""
        if second is None:
            _ip("link", "set", self.hosts[first].link, "up")
            return
        a, b = self.hosts[first], self.hosts[second]
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("route", "del", "blackhole", f"{b.address}/32", netns=a.netns)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("route", "del", "blackhole", f"{a.address}/32", netns=b.netns)


def _kill_all(host: Host, timeout_s: float = 10.0) -> None:
    """SIGTERM every process in the host, SIGKILL what is left after ``timeout_s``."""
    pids = host.pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = host.pids()
        if not pids:
            return


def remove_stale() -> list[str]:
    """Delete the namespaces, links and bridges of networks whose owner process is gone (a run
    killed before its cleanup); the names removed."""
    removed: list[str] = []
    if not _OWNER_DIR.is_dir():
        live: set[str] = set()
    else:
        live = {f.name for f in _OWNER_DIR.iterdir() if _alive(f)}
    for netns in _ip("netns", "list").split("\n"):
        name = netns.split(" ")[0]
        if name.startswith(PREFIX) and name[len(PREFIX) : len(PREFIX) + 4] not in live:
            host = Host(name, name, "", "")
            with contextlib.suppress(subprocess.CalledProcessError):
                _kill_all(host)
                _ip("netns", "del", name)
                removed.append(name)
    for line in _ip("-o", "link", "show").split("\n"):
        parts = line.split(": ")
        if len(parts) < 2:
            continue
        link = parts[1].split("@")[0]
        if link.startswith(PREFIX) and link[len(PREFIX) : len(PREFIX) + 4] not in live:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", link)
                removed.append(link)
    return removed


def _alive(owner: Path) -> bool:
    try:
        os.kill(int(owner.read_text()), 0)
    except (ValueError, ProcessLookupError, OSError):
        with contextlib.suppress(FileNotFoundError):
            owner.unlink()
        return False
    return True
