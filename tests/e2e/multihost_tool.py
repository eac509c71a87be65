"""Run inside a namespace host by test_multihost.py (the test's own process has no route into
the hosts' subnet):

``complete URL API_KEY MAX_TOKENS`` reads a prompt on stdin, sends it as a greedy completion and
prints ``{"token_ids": [...], "text": ..., "cached_tokens": N}``;
``stats ENDPOINT CERT KEY CA`` prints a store node's STATS (as an ``admin/*`` certificate).
"""

from __future__ import annotations

import json
import sys
import urllib.request

from kvstore.client.sync import KVStoreClient
from strata_common.tls import TlsConfig


def complete(url: str, api_key: str, max_tokens: int, prompt: str) -> dict[str, object]:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
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


def main(argv: list[str]) -> int:
    if argv[0] == "complete":
        url, api_key, max_tokens = argv[1], argv[2], int(argv[3])
        print(json.dumps(complete(url, api_key, max_tokens, sys.stdin.read())))
        return 0
    endpoint, cert, key, ca = argv[1:5]
    credentials = TlsConfig(cert, key, ca).credentials("admin")
    with KVStoreClient(endpoint, use_shm=False, credentials=credentials) as client:
        print(json.dumps(client.stats()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
