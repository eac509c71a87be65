"""Per-request routing: prompt → block keys → prefix index → policy decision, or a refusal.

The gateway calls :meth:`Router.decide` once per request, after validation and tokenization and
before any worker call (docs/design/scheduling.md §1, step 2):

1. **Block keys** as the workers' KV connector computes them (dataplane/connector.py):
   ``kvstore.blocks.hashing.block_keys(prompt, block_size, root_key(model_fingerprint, kv_layout,
   cache_salt))``. The fingerprint, layout and block size come from the workers' Health
   (:meth:`InstanceRegistry.kv_identity`); the cache salt is the request's namespace, so one
   tenant's prompts never match another's blocks.
2. **Prefix index**: the keys are matched in a :class:`kvstore.cluster.view.ClusterView` following
   the metadata store's event stream (store nodes publish DRAM/SSD blocks, workers their
   engines' HBM blocks), and split into the pool's run and each engine's HBM run by
   :func:`cached_prefix`. Without a view (no ``--kv-metadata``) or before any worker has said how
   it names blocks, nothing is known cached and the policies still work.
3. **SLOs**: ``x-strata-ttft-slo-ms`` / ``x-strata-tpot-slo-ms`` headers (positive numbers of
   milliseconds), else the configured defaults (:class:`SchedulingConfig`).
4. The registry's current policy decides: :class:`Assign` or :class:`Reject`, which
   :func:`rejection_error` turns into the HTTP answer: 429 with ``Retry-After: ceil(retry_after_s)``
   (OVERLOADED), 429 without it (SLO_UNATTAINABLE), 503 (NO_INSTANCE).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from controlplane.api.openai_protocol import OpenAIError
from controlplane.instances.instance import KVIdentity
from controlplane.instances.registry import InstanceRegistry
from controlplane.scheduling import (
    NO_CACHE,
    CachedPrefix,
    Decision,
    Reject,
    RejectReason,
    RequestSnapshot,
    cached_prefix,
)
from controlplane.workers.roles import WorkerRole, role_name
from kvstore.blocks.hashing import PUBLIC_HASH_KEY, BlockKey, block_keys, root_key
from kvstore.cluster.view import ClusterView

__all__ = [
    "TPOT_SLO_HEADER",
    "TTFT_SLO_HEADER",
    "RejectedRequest",
    "Router",
    "kv_bytes_per_token",
    "parse_slo_headers",
    "rejection_error",
]

TTFT_SLO_HEADER: Final = "x-strata-ttft-slo-ms"
TPOT_SLO_HEADER: Final = "x-strata-tpot-slo-ms"
_MAX_SLO_MS: Final = 86_400_000.0  # a day: anything longer is a typo, not an SLO
_MAX_ROOTS: Final = 4096


class RejectedRequest(OpenAIError):
    """A request the scheduler refused before any work (429 or 503); ``retry_after_s`` is the
    Retry-After header's value in whole seconds, or None for no header."""

    def __init__(self, message: str, *, status: int, code: str, retry_after_s: int | None) -> None:
        super().__init__(
            message,
            status=status,
            type="server_error" if status >= 500 else "rate_limit_error",
            code=code,
        )
        self.retry_after_s = retry_after_s


def parse_slo_headers(headers: Mapping[str, str]) -> tuple[float | None, float | None]:
    """(TTFT SLO, TPOT SLO) in seconds from the request's headers; None where absent.
    Raises OpenAIError (400) naming the header for anything but a positive finite number."""
    return _slo_header(headers, TTFT_SLO_HEADER), _slo_header(headers, TPOT_SLO_HEADER)


def _slo_header(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value_ms = float(raw.strip())
    except ValueError:
        value_ms = math.nan
    if not (math.isfinite(value_ms) and 0.0 < value_ms <= _MAX_SLO_MS):
        raise OpenAIError(
            f"Header {name} must be a positive number of milliseconds (at most "
            f"{_MAX_SLO_MS:.0f}), got {raw!r}.",
            param=name,
            code="invalid_slo_header",
        )
    return value_ms / 1000.0


def rejection_error(reject: Reject, registry: InstanceRegistry) -> RejectedRequest:
    """The HTTP answer to a Reject (docs/design/scheduling.md §5)."""
    if reject.reason is RejectReason.NO_INSTANCE:
        # Not registry.describe_role: it names the workers' endpoints and why each is down,
        # which are internal (the admin API shows them; /health with --health-details).
        return RejectedRequest(
            f"Unavailable: no {role_name(WorkerRole.DECODE)} worker is ready; retry later.",
            status=503,
            code="worker_unavailable",
            retry_after_s=None,
        )
    if reject.reason is RejectReason.OVERLOADED:
        retry = reject.retry_after_s if reject.retry_after_s is not None else 1.0
        seconds = max(1, math.ceil(retry))
        return RejectedRequest(
            f"The cluster cannot serve this request within its SLOs now ({reject.detail}); "
            f"retry after {seconds} s.",
            status=429,
            code="overloaded",
            retry_after_s=seconds,
        )
    return RejectedRequest(
        f"No instance could meet this request's SLOs even when idle ({reject.detail}); "
        "retrying will not help: relax the x-strata-*-slo-ms headers or shorten the prompt.",
        status=429,
        code="slo_unattainable",
        retry_after_s=None,
    )


def kv_bytes_per_token(model_dir: Path, default: int, bytes_per_value: int = 2) -> int:
    """KV bytes of one token (all layers, K and V) from the model's config.json, at
    ``bytes_per_value`` (2: bf16/fp16); ``default`` when the config does not say enough."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        config = config.get("text_config", config)
        layers = int(config["num_hidden_layers"])
        heads = int(config.get("num_attention_heads", 0))
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return default
    value = 2 * layers * kv_heads * head_dim * bytes_per_value
    return value if value > 0 else default


class Router:
    """Turns a tokenized request into the registry policy's decision (see the module doc).

    ``view``: the prefix index (started and stopped by its owner, the gateway server); None:
    no prefix information. Runs on the gateway's event loop; the view's lock is the only shared
    state it touches.
    """

    __slots__ = ("_hash_key", "_identity", "_registry", "_roots", "_view")

    def __init__(
        self,
        registry: InstanceRegistry,
        view: ClusterView | None,
        hash_key: bytes = PUBLIC_HASH_KEY,
    ) -> None:
        """``hash_key``: the cluster's block-key key (``block_hash_key``), as the workers'."""
        self._registry = registry
        self._view = view
        self._hash_key = hash_key
        self._identity: KVIdentity | None = None
        self._roots: dict[str, BlockKey] = {}

    @property
    def view(self) -> ClusterView | None:
        return self._view

    def block_keys(self, prompt_token_ids: Sequence[int], cache_salt: str) -> list[BlockKey]:
        """The prompt's block keys as the workers compute them; [] while no worker has said."""
        identity = self._registry.kv_identity()
        if identity is None:
            return []
        if identity != self._identity:
            self._identity = identity
            self._roots.clear()
        root = self._roots.get(cache_salt)
        if root is None:
            if len(self._roots) >= _MAX_ROOTS:  # salts are client-chosen: bound the memo
                self._roots.clear()
            root = root_key(
                identity.model_fingerprint, identity.kv_layout, cache_salt, self._hash_key
            )
            self._roots[cache_salt] = root
        return block_keys(prompt_token_ids, identity.block_size, root, self._hash_key)

    def cached(self, prompt_token_ids: Sequence[int], cache_salt: str) -> CachedPrefix:
        """What the cluster holds of the prompt's prefix (NO_CACHE without an index)."""
        if self._view is None:
            return NO_CACHE
        keys = self.block_keys(prompt_token_ids, cache_salt)
        if not keys:
            return NO_CACHE
        return cached_prefix(self._view.match(keys), self._registry.engine_sources())

    def decide(
        self,
        prompt_token_ids: Sequence[int],
        cache_salt: str,
        max_tokens: int,
        *,
        ttft_slo_s: float | None = None,
        tpot_slo_s: float | None = None,
    ) -> Decision:
        request = RequestSnapshot(
            num_prompt_tokens=len(prompt_token_ids),
            max_tokens=max_tokens,
            block_size=self._registry.limits.block_size,
            cached=self.cached(prompt_token_ids, cache_salt),
            ttft_slo_s=ttft_slo_s,
            tpot_slo_s=tpot_slo_s,
        )
        return self._registry.decide(request)
