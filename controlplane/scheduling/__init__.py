"""The scheduler's core: latency predictor, policies and admission (pure; no I/O).

Call sequence (docs/design/scheduling.md §1):

1. The registry keeps one :class:`LatencyPredictor` per instance: priors at first,
   :meth:`LatencyPredictor.calibrate` with the timings of :meth:`ProfilePlan.for_engine` when the
   worker becomes ready, then ``observe_prefill`` / ``observe_decode_step`` as requests finish.
2. Per request, the gateway matches the prompt's block keys in the prefix index and turns the
   answer into a :class:`CachedPrefix` (:func:`cached_prefix`), builds a :class:`RequestSnapshot`
   and calls the current policy's ``decide`` with the registry's :class:`InstanceSnapshot` list.
3. :class:`Assign`: run it (prefill on ``prefill`` or, if None, on ``decode``);
   :class:`Reject`: 429 with ``Retry-After: ceil(retry_after_s)`` (OVERLOADED), 429 without it
   (SLO_UNATTAINABLE) or 503 (NO_INSTANCE), before doing any work.
4. When the first token and the last one arrive, feed the observed TTFT and mean TPOT against the
   Assign's predictions to a :class:`PredictionAccuracy` (the MAPE gauges).

Layering: ``predictor`` (a package: model ← fitting ← feedback, accuracy, plan ← predictor; numpy
only) ← ``types`` (+ controlplane.instances.types) ← ``prefix`` (+ kvstore) and ``policies`` (one
policy per module, chosen by :class:`PolicyKind`).
"""

from controlplane.scheduling.policies import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    LeastLoadedPolicy,
    PolicyKind,
    PrefixAwarePolicy,
    RequestCosts,
    RoundRobinPolicy,
    SchedulingPolicy,
    SloAwarePolicy,
    make_policy,
)
from controlplane.scheduling.predictor.accuracy import PredictionAccuracy
from controlplane.scheduling.predictor.fitting import DecodeSample, PrefillSample
from controlplane.scheduling.predictor.model import (
    DecodeCoefficients,
    PrefillCoefficients,
    TransferCoefficients,
    Transport,
)
from controlplane.scheduling.predictor.plan import ProfilePlan
from controlplane.scheduling.predictor.predictor import LatencyPredictor
from controlplane.scheduling.prefix import cached_prefix
from controlplane.scheduling.types import (
    IDLE,
    NO_CACHE,
    Assign,
    CachedPrefix,
    Decision,
    InstanceLoad,
    InstanceSnapshot,
    Reject,
    RejectReason,
    RequestSnapshot,
    Route,
    SchedulingConfig,
)

__all__ = [
    "DEFAULT_POLICY",
    "IDLE",
    "NO_CACHE",
    "POLICY_NAMES",
    "Assign",
    "CachedPrefix",
    "Decision",
    "DecodeCoefficients",
    "DecodeSample",
    "InstanceLoad",
    "InstanceSnapshot",
    "LatencyPredictor",
    "LeastLoadedPolicy",
    "PolicyKind",
    "PredictionAccuracy",
    "PrefillCoefficients",
    "PrefillSample",
    "PrefixAwarePolicy",
    "ProfilePlan",
    "Reject",
    "RejectReason",
    "RequestCosts",
    "RequestSnapshot",
    "RoundRobinPolicy",
    "Route",
    "SchedulingConfig",
    "SchedulingPolicy",
    "SloAwarePolicy",
    "TransferCoefficients",
    "Transport",
    "cached_prefix",
    "make_policy",
]
