"""A poisoned start-up profile does not replace an instance's model: the registry checks it
against a sibling's (same role, model fingerprint and hardware) and the online observations,
keeps the sibling's model, says why in the profile state and counts the rejection."""

from __future__ import annotations

import asyncio
from typing import Any

from controlplane.instances.instance import Instance
from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.store import LocalRegistryStore
from controlplane.metrics import GatewayMetrics
from controlplane.workers.client import PrefillResult, WorkerHealth
from controlplane.workers.profiling import ProfileSettings
from controlplane.workers.roles import WorkerRole

PREFILL = WorkerRole.PREFILL


class ReportingWorker:
    """A prefill worker double whose Prefill reports ``factor · (1 ms + 10 us/token)`` as its
    engine time (factor 10: a worker that was swamped while profiled, or misreports)."""

    def __init__(self, factor: float, hardware: str = "cpu/x") -> None:
        self.factor = factor
        self.hardware = hardware

    async def health(self, *, timeout_s: float) -> WorkerHealth:
        return WorkerHealth(
            True, PREFILL, "m", 16, 256, 4, hardware=self.hardware, model_fingerprint=b"f"
        )

    async def prefill(self, **kwargs: Any) -> PrefillResult:
        await asyncio.sleep(0.001)
        n = len(kwargs["prompt_token_ids"])
        return PrefillResult(1, "", None, (), n, 0, self.factor * (1e-3 + 1e-5 * n))

    async def close(self) -> None:
        pass


def make_registry(metrics: GatewayMetrics) -> InstanceRegistry:
    return InstanceRegistry(
        metrics=metrics,
        health_check_timeout_s=1.0,
        store=LocalRegistryStore(),
        profile=ProfileSettings(max_model_len=256, max_batch=4, vocab_size=1000, budget_s=10.0),
    )


async def add_profiled(
    registry: InstanceRegistry, endpoint: str, instance_id: str, worker: ReportingWorker
) -> Instance:
    await registry.register_configured(PREFILL, [endpoint])
    instance = registry.get(instance_id)
    instance.client = worker  # type: ignore[assignment]
    await registry.check_all()
    for _ in range(1000):
        if instance.profile_state != "running":
            break
        await asyncio.sleep(0.01)
    return instance


def rejected(metrics: GatewayMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "strata_gateway_profiles_rejected_total", {"role": "prefill", "reason": reason}
    )
    return value or 0.0


def test_a_profile_10x_off_its_sibling_is_rejected_and_the_siblings_model_kept() -> None:
    async def main() -> None:
        metrics = GatewayMetrics()
        registry = make_registry(metrics)
        first = await add_profiled(registry, "127.0.0.1:10001", "w1", ReportingWorker(1.0))
        assert first.profile_state == "done"
        for factor, name in ((10.0, "w2"), (0.1, "w3")):
            poisoned = await add_profiled(
                registry, f"127.0.0.1:1000{name[1]}", name, ReportingWorker(factor)
            )
            words = "10.0x slower" if factor > 1 else "10.0x faster"
            assert poisoned.profile_state.startswith(f"rejected: prefill {words} than w1's at ")
            assert poisoned.predictor.calibrated
            assert poisoned.predictor.prefill_fit == first.predictor.prefill_fit
        assert rejected(metrics, "sibling") == 2.0
        # Within the factor (a 1.5x slower sibling of the same hardware): accepted, its own fit.
        honest = await add_profiled(registry, "127.0.0.1:10004", "w4", ReportingWorker(1.5))
        assert honest.profile_state == "done"
        assert honest.predictor.prefill_s(200, 0) > 1.4 * first.predictor.prefill_s(200, 0)
        assert rejected(metrics, "sibling") == 2.0
        # Other hardware is no sibling: nothing to compare with, nothing observed: accepted.
        other = await add_profiled(registry, "127.0.0.1:10005", "w5", ReportingWorker(10.0, "gpu"))
        assert other.profile_state == "done"
        await registry.close()

    asyncio.run(main())


def test_online_observations_reject_a_profile_that_does_not_explain_them() -> None:
    async def main() -> None:
        metrics = GatewayMetrics()
        registry = make_registry(metrics)
        # No sibling; the instance served requests (solo prefills) before its profile landed.
        await registry.register_configured(PREFILL, ["127.0.0.1:10001"])
        instance = registry.get("w1")
        for n in (50, 100, 150, 200, 250):
            instance.predictor.observe_prefill(n, 0, 1e-3 + 1e-5 * n)
        instance.client = ReportingWorker(10.0)  # type: ignore[assignment]
        await registry.check_all()
        for _ in range(1000):
            if instance.profile_state != "running":
                break
            await asyncio.sleep(0.01)
        assert (
            instance.profile_state == "rejected: prefill 10.0x slower than observed (median of 5)"
        )
        assert not instance.predictor.calibrated  # the priors and their online refits stay
        assert rejected(metrics, "observations") == 1.0
        await registry.close()

    asyncio.run(main())
