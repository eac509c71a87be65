"""Strata on hosts that are really apart, on this machine: `make multihost-demo`.

Creates network-namespace hosts on a bridge (tests/netns.py; needs root and iproute2) and starts
the multi-host layout there, each process with the command line an operator would use, TLS
certificates of its own and the cluster key (tests/e2e/multihost_cluster.py): Valkey on
``redis``, the gateway on ``gw``, a store node and a prefill worker on ``a``, a store node and a
decode worker on ``b``, and a ``client`` host. Sends one completion from the client host, shows
how its KV crossed from A to B, prints the command lines that were used and how to send your
own requests, then keeps the hosts up until Ctrl-C (or exits at once with ``--once``).
Everything it created is removed on exit, also on failure.

    .venv/bin/python scripts/multihost_demo.py [--model DIR] [--mbit 1000] [--once]
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.multihost_cluster import API_KEY, deploy
from tests.netns import unavailable

PROMPT = "Explain in one sentence why a KV cache pool spread over many hosts helps serving."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory")
    parser.add_argument("--mbit", type=float, default=None, help="limit A's and B's links (tbf)")
    parser.add_argument("--once", action="store_true", help="exit after the first completion")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        print(f"multihost-demo: {reason}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="strata-demo-") as work:
        print("starting: Valkey, 2 store nodes, a prefill and a decode worker, a gateway ...")
        with deploy(args.model, Path(work)) as d:
            if args.mbit is not None:
                d.net.shape("a", mbit=args.mbit)
                d.net.shape("b", mbit=args.mbit)
            print("\nhosts (network namespaces on one bridge):")
            for name, host in d.net.hosts.items():
                print(f"  {name:7} {host.address:15} ip netns exec {host.netns} ...")
            print("\nprocesses, as started (inside their hosts):")
            for name, process in d.processes.items():
                # args[4:]: the command after "ip netns exec NS"
                command = shlex.join(str(a) for a in process.proc.args[4:])
                print(f"  {name}: {command}")
            answer = d.complete(PROMPT, 32)
            b = d.store_stats("b")
            print(f"\ncompletion from the client host: {answer['text']!r}")
            print(
                f"B's store node read {b['transfers']['read_through_blocks']} blocks through "
                f"from A's; B's view of the cluster: {b['cluster']}"
            )
            client = d.net["client"].netns
            print(
                "\nyour own request (another terminal):\n"
                f"  ip netns exec {client} curl -s {d.url()}/v1/completions "
                f"-H 'Authorization: Bearer {API_KEY}' -H 'Content-Type: application/json' "
                """-d '{"model": "tiny", "prompt": "Hello", "max_tokens": 16}'"""
            )
            if not args.once:
                print("\nup until Ctrl-C")
                with contextlib.suppress(KeyboardInterrupt):
                    stop.wait()
        print("removed every host and process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
