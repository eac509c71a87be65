"""Run inside a namespace host by test_multihost.py (the test's own process has no route into
the hosts' subnet):

``complete URL API_KEY MAX_TOKENS`` reads a prompt on stdin, sends it as a greedy completion and
prints ``{"token_ids": [...], "text": ..., "cached_tokens": N}``;
``stats ENDPOINT CERT KEY CA`` prints a store node's STATS (as an ``admin/*`` certificate);
``load URL API_KEY SECONDS CONCURRENCY TIMEOUT`` sends distinct greedy completions,
``CONCURRENCY`` at a time, for ``SECONDS``, each with a client timeout of ``TIMEOUT``, and prints
one record per request: ``{"start", "end"}`` (wall clock, so the test can line them up with its
faults), ``"status"`` (the HTTP status; 0 when no HTTP answer came), ``"clean"`` (an answer with
an OpenAI error body, or a success) and ``"error"``;
``kvput ENDPOINT CERT KEY CA SEED COUNT SIZE`` stores ``COUNT`` blocks of ``SIZE`` bytes under
keys drawn from ``SEED`` in a store node (as a ``worker/*`` certificate) and prints their number;
``kvread ENDPOINT CERT KEY CA SEED COUNT SIZE`` waits until the node sees all of them in the
cluster (``MATCH_PREFIX`` counts peer-held blocks), then reads them through it in batches (over
shared memory: the node reads the ones it lacks from the peer holding them) and prints
``{"bytes", "seconds", "found"}``. CERT, KEY and CA are ``-`` for a node without TLS;
``stream URL API_KEY MAX_TOKENS`` reads a prompt on stdin, streams a greedy completion and
prints the seconds from sending to each token's chunk (``{"token_s": [...]}``);
``worker-stats ENDPOINT CERT KEY CA`` prints a worker's Stats (as a ``gateway/*`` certificate);
``ready-roles URL`` prints the roles of the workers a gateway's /metrics says are ready.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request

from kvstore.client.sync import KVStoreClient
from strata_common.credentials import ClusterCredentials
from strata_common.tls import TlsConfig

KV_BATCH = 32
"""Blocks per read: a node reads at most 32 missing blocks from its peers per batch."""


def completion_request(
    url: str, api_key: str, prompt: str, max_tokens: int, **fields: object
) -> urllib.request.Request:
    """A completion request: greedy (``temperature`` 0) unless ``fields`` says otherwise."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body | fields).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )


def complete(url: str, api_key: str, max_tokens: int, prompt: str) -> dict[str, object]:
    request = completion_request(
        url, api_key, prompt, max_tokens, ignore_eos=True, return_token_ids=True
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    choice = answer["choices"][0]
    details = answer["usage"].get("prompt_tokens_details") or {}
    return {
        "token_ids": choice.get("token_ids") or [],
        "text": choice["text"],
        "cached_tokens": details.get("cached_tokens") or 0,
    }


def one_request(url: str, api_key: str, prompt: str, timeout_s: float) -> dict[str, object]:
    request = completion_request(url, api_key, prompt, 8)
    record: dict[str, object] = {"start": time.time(), "status": 0, "clean": False, "error": ""}
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
            record |= {"status": response.status, "clean": bool(answer.get("choices"))}
    except urllib.error.HTTPError as exc:  # an HTTP answer: clean when it is an OpenAI error
        text = exc.read().decode(errors="replace")
        try:
            clean = "message" in json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            clean = False
        record |= {"status": exc.code, "clean": clean, "error": text[:300]}
    except Exception as exc:  # no HTTP answer: refused, reset, or timed out (hung)
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
    record["end"] = time.time()
    return record


def load(
    url: str, api_key: str, seconds: float, concurrency: int, timeout_s: float
) -> list[object]:
    records: list[object] = []
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))
    lock = threading.Lock()

    def client(index: int) -> None:
        while time.monotonic() < stop_at:
            with lock:
                n = next(counter)
            words = " ".join(f"w{(n * 7 + i) % 997}" for i in range(40))
            record = one_request(
                url, api_key, f"request {n} from client {index}: {words}", timeout_s
            )
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def _kv_client(argv: list[str], role: str, *, use_shm: bool) -> KVStoreClient:
    endpoint, cert, key, ca = argv[:4]
    credentials: ClusterCredentials | None = None
    if cert != "-":
        credentials = TlsConfig(cert, key, ca).credentials(role)
    return KVStoreClient(endpoint, use_shm=use_shm, credentials=credentials)


def _kv_keys(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(count)]


def kv_put(argv: list[str]) -> dict[str, object]:
    seed, count, size = int(argv[4]), int(argv[5]), int(argv[6])
    payload = bytes(random.Random(seed).randbytes(size))
    keys = _kv_keys(seed, count)
    with _kv_client(argv, "worker", use_shm=True) as client:
        for start in range(0, count, KV_BATCH):
            batch = [(k, payload) for k in keys[start : start + KV_BATCH]]
            client.put_many(batch)
    return {"stored": count}


def kv_read(argv: list[str]) -> dict[str, object]:
    seed, count, size = int(argv[4]), int(argv[5]), int(argv[6])
    keys = _kv_keys(seed, count)
    with _kv_client(argv, "worker", use_shm=True) as client:
        deadline = time.monotonic() + 60
        while client.match_prefix(keys) < count:  # the node's view lags the peer's publishing
            if time.monotonic() > deadline:
                raise SystemExit(f"the node sees {client.match_prefix(keys)} of {count} blocks")
            time.sleep(0.05)
        outs = [bytearray(size + 64) for _ in range(KV_BATCH)]
        found = 0
        start = time.monotonic()
        for first in range(0, count, KV_BATCH):
            batch = keys[first : first + KV_BATCH]
            sizes = client.get_many_into(batch, outs[: len(batch)])
            found += sum(n is not None for n in sizes)
        seconds = time.monotonic() - start
    return {"bytes": found * size, "seconds": seconds, "found": found}


def stream(url: str, api_key: str, max_tokens: int, prompt: str) -> dict[str, object]:
    request = completion_request(url, api_key, prompt, max_tokens, ignore_eos=True, stream=True)
    token_s: list[float] = []
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:  # one SSE line at a time, as it arrives
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk["choices"] and chunk["choices"][0].get("text"):
                token_s.append(time.monotonic() - start)
    return {"token_s": token_s}


def worker_stats(argv: list[str]) -> dict[str, object]:
    import grpc  # only this subcommand needs gRPC
    from google.protobuf.json_format import MessageToDict

    from strata_proto import worker_pb2, worker_pb2_grpc

    endpoint, cert, key, ca = argv[:4]
    channel = grpc.secure_channel(endpoint, TlsConfig(cert, key, ca).grpc_channel_credentials())
    with channel:
        reply = worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=30)
    return MessageToDict(reply, preserving_proto_field_name=True)


def ready_roles(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    roles = set()
    for line in text.splitlines():
        if line.startswith("strata_gateway_worker_ready{") and line.endswith(" 1.0"):
            labels = line[line.index("{") + 1 : line.index("}")]
            for label in labels.split(","):
                name, _, value = label.partition("=")
                if name == "role":
                    roles.add(value.strip('"'))
    return sorted(roles)


def main(argv: list[str]) -> int:
    if argv[0] == "complete":
        url, api_key, max_tokens = argv[1], argv[2], int(argv[3])
        print(json.dumps(complete(url, api_key, max_tokens, sys.stdin.read())))
        return 0
    if argv[0] == "load":
        url, api_key = argv[1], argv[2]
        seconds, concurrency, timeout_s = float(argv[3]), int(argv[4]), float(argv[5])
        print(json.dumps(load(url, api_key, seconds, concurrency, timeout_s)))
        return 0
    if argv[0] == "stream":
        url, api_key, max_tokens = argv[1], argv[2], int(argv[3])
        print(json.dumps(stream(url, api_key, max_tokens, sys.stdin.read())))
        return 0
    if argv[0] == "ready-roles":
        print(json.dumps(ready_roles(argv[1])))
        return 0
    if argv[0] == "worker-stats":
        print(json.dumps(worker_stats(argv[1:])))
        return 0
    if argv[0] in ("kvput", "kvread"):
        print(json.dumps((kv_put if argv[0] == "kvput" else kv_read)(argv[1:])))
        return 0
    endpoint, cert, key, ca = argv[1:5]
    credentials = TlsConfig(cert, key, ca).credentials("admin")
    with KVStoreClient(endpoint, use_shm=False, credentials=credentials) as client:
        print(json.dumps(client.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
