"""Scheduling policies: which prefill and decode instance serve a request, or a rejection.

One interface, :class:`SchedulingPolicy` (``decide(request, instances) -> Decision``), five
implementations, one per module, chosen by :class:`PolicyKind` (its value is the name used on the
command line and by `strata admin policy`; :func:`make_policy`): ``round_robin``,
``least_loaded``, ``prefix_aware``, ``conductor`` (a baseline: Mooncake's as published) and
``slo_aware`` (the default; it is also the only one besides ``conductor`` that
rejects work). docs/design/scheduling.md has the derivations and a worked example; the formulas:

**Cached prefix on an instance X** (blocks of ``bs`` tokens; ``B = (prompt - 1) // bs`` blocks
can hit, as vLLM always computes the last token)::

    hbm(X)     = min(B, blocks resident in X's HBM)
    cached(X)  = max(hbm(X), min(B, pool blocks))        new(X) = prompt - bs·cached(X)
    loaded(X)  = cached(X) - hbm(X)   (read from the pool: its SSD-only blocks first, then DRAM)

**TTFT** when X prefills (``q``: its queued prefill tokens in ``r`` requests)::

    TTFT(X) = queue_s(q, r) + load_s(loaded(X)) + prefill_s(new(X), bs·cached(X))
              [+ step_s(b, k) of X's running decodes when X also decodes: local prefill]

**TPOT** on decode instance D (``b`` running sequences, ``k`` context tokens), KV moved from the
prefill instance P unless D prefilled itself::

    TPOT(D) = step_s(b + 1, k + prompt) + transfer_s(bytes of the prompt not in D's HBM)
                                            / max(1, max_tokens - 1)

with shared memory when P and D share a host, D's network transport otherwise.

**Conditional disaggregation** (every policy; ``conditional_disaggregation`` turns it off): the
chosen decode instance D prefills the request itself when every block that can hit is in its HBM
(``Route.LOCAL_RESIDENT``), or when ``new(D) < local_prefill_threshold_tokens``
(``Route.LOCAL_SHORT``); also when no prefill instance is ready, and when a BOTH instance is
picked for both sides.

**Policies.** Ties always go to the instance listed first.

* ``round_robin``: decode instances in turn; prefill instances in turn when one is needed.
* ``least_loaded``: decode: fewest running sequences, then fewest context tokens; prefill: fewest
  queued prefill tokens, then requests.
* ``prefix_aware`` (Dynamo's KV router): prefill: ``w·new(P)/bs + q(P)/bs`` (blocks to prefill
  plus queued blocks); decode: ``w·(prompt blocks not in D's HBM) + k(D)/bs`` (blocks to move in
  plus active blocks).
* ``conductor``: Mooncake's Conductor as published (its module docstring), the baseline
  ``slo_aware`` grew from: lowest TTFT over the prefill instances (each with its own HBM prefix,
  fetching a much longer one from elsewhere), the decode instance with the lowest TBT, early
  rejection when either misses its SLO.
* ``slo_aware`` (Mooncake): the (P, D) pair (or local D) with the lowest predicted TTFT whose
  predicted TPOT meets the TPOT SLO (and D has a free sequence slot), the D with the lowest TPOT
  among equals. A busy option's TTFT meets the SLO only scaled by its instance's margin
  (``ttft_margin``: a quantile of its recent observed/predicted TTFTs). **Admission**: if no
  option meets both the TTFT and the TPOT SLO, reject:
  :attr:`RejectReason.OVERLOADED` with ``retry_after_s`` = the time until the best option's queue
  has drained enough, or :attr:`RejectReason.SLO_UNATTAINABLE` if not even idle instances could
  meet the SLOs (idle: ``RequestCosts.quiet_ttft_s``, the profile's own fit, no queue). Waiting
  ``w`` seconds removes ``w`` seconds of queued prefill (so the TTFT wait is ``TTFT -
  SLO/margin``); a decode batch shrinks as its sequences finish, assumed uniformly over ``2·m``
  steps (``m``: mean remaining tokens per sequence), so reaching the largest batch
  ``b*`` that meets the TPOT SLO takes ``2·m·(1 - b*/b)`` steps of ``step_s(b, k)``.

Pure and synchronous: no I/O, no clocks. Policies keep no state but round-robin's positions.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

from controlplane.scheduling.policies.base import SchedulingPolicy
from controlplane.scheduling.policies.conductor import ConductorPolicy
from controlplane.scheduling.policies.costs import RequestCosts
from controlplane.scheduling.policies.least_loaded import LeastLoadedPolicy
from controlplane.scheduling.policies.prefix_aware import PrefixAwarePolicy
from controlplane.scheduling.policies.round_robin import RoundRobinPolicy
from controlplane.scheduling.policies.slo_aware import SloAwarePolicy
from controlplane.scheduling.types import SchedulingConfig

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "ConductorPolicy",
    "LeastLoadedPolicy",
    "PolicyKind",
    "PrefixAwarePolicy",
    "RequestCosts",
    "RoundRobinPolicy",
    "SchedulingPolicy",
    "SloAwarePolicy",
    "make_policy",
]


class PolicyKind(enum.Enum):
    """The scheduling policies; the value is the policy's name."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    PREFIX_AWARE = "prefix_aware"
    SLO_AWARE = "slo_aware"
    CONDUCTOR = "conductor"


_POLICIES: Final[dict[PolicyKind, Callable[[SchedulingConfig | None], SchedulingPolicy]]] = {
    PolicyKind.ROUND_ROBIN: RoundRobinPolicy,
    PolicyKind.LEAST_LOADED: LeastLoadedPolicy,
    PolicyKind.PREFIX_AWARE: PrefixAwarePolicy,
    PolicyKind.SLO_AWARE: SloAwarePolicy,
    PolicyKind.CONDUCTOR: ConductorPolicy,
}
POLICY_NAMES: Final = tuple(kind.value for kind in PolicyKind)
DEFAULT_POLICY: Final = PolicyKind.SLO_AWARE.value


def make_policy(kind: PolicyKind | str, config: SchedulingConfig | None = None) -> SchedulingPolicy:
    """The policy of ``kind`` (or of its name, one of :data:`POLICY_NAMES`; ValueError
    otherwise)."""
    if not isinstance(kind, PolicyKind):
        try:
            kind = PolicyKind(kind)
        except ValueError:
            raise ValueError(
                f"unknown policy {kind!r}; choose one of {', '.join(POLICY_NAMES)}"
            ) from None
    return _POLICIES[kind](config)
