"""``slo_aware`` (Mooncake's): the (P, D) pair (or local D) with the lowest predicted TTFT whose
predicted TPOT meets the TPOT SLO, with admission control (the formulas and the rejection rule:
controlplane/scheduling/policies/__init__.py; docs/design/scheduling.md §4). A busy instance's
TTFT is admitted against the SLO scaled by its margin (`RequestCosts.meets_ttft_slo`), so that
the admitted requests' tail, not only their mean, meets the SLO."""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.scheduling.policies.base import CostPolicy
from controlplane.scheduling.policies.costs import INF, Candidates, RequestCosts
from controlplane.scheduling.predictor.model import Transport
from controlplane.scheduling.types import (
    Assign,
    Decision,
    InstanceSnapshot,
    Reject,
    RejectReason,
    Route,
)

__all__ = ["SloAwarePolicy"]


class SloAwarePolicy(CostPolicy):
    """Mooncake's: lowest predicted TTFT whose predicted TPOT meets the SLO; admission control."""

    name = "slo_aware"

    def _choose(self, costs: RequestCosts, prefills: Candidates, decodes: Candidates) -> Decision:
        ttft_slo = costs.ttft_slo_s if costs.ttft_slo_s is not None else INF
        tpot_slo = costs.tpot_slo_s if costs.tpot_slo_s is not None else INF
        check_slots = costs.needs_slot

        # Options where the decode instance prefills itself: (ttft, tpot, order, route, D).
        local: list[tuple[float, float, int, Route, InstanceSnapshot]] = []
        remote: list[tuple[int, InstanceSnapshot]] = []  # decode instances that need a prefill
        for order, decode in enumerate(decodes):
            route = costs.local_route(decode)
            if route is None and not prefills:
                route = Route.LOCAL_NO_PREFILL
            if route is None:
                remote.append((order, decode))
                if decode.can_prefill():  # BOTH: itself, as a colocated option
                    route = Route.LOCAL_SAME_INSTANCE
                else:
                    continue
            local.append(
                (costs.ttft_s(decode, local=True), costs.tpot_s(decode, None), order, route, decode)
            )

        # Disaggregated options: prefill instances by TTFT, each with its best decode instance.
        ranked = sorted(
            ((costs.ttft_s(p, local=False), order, p) for order, p in enumerate(prefills)),
            key=lambda option: (option[0], option[1]),
        )
        # A one-token request prefilled elsewhere never reaches its decode instance.
        handoff = costs.request.max_tokens > 1
        tpot_by_route = _DecodeTable(costs, remote, check_slots and handoff)
        best: tuple[float, float, int, Assign] | None = None
        for ttft, _, prefill in ranked:
            if ttft > ttft_slo:
                break  # margins are >= 1: no later one is admitted either
            if not costs.meets_ttft_slo(prefill, ttft):
                continue
            found = tpot_by_route.best_for(prefill, tpot_slo)
            if found is not None:
                tpot, order, decode = found
                best = (
                    ttft,
                    tpot,
                    order,
                    Assign(
                        prefill.id,
                        decode.id,
                        ttft,
                        tpot,
                        costs.cached_blocks(prefill),
                        Route.DISAGGREGATED,
                        self.name,
                    ),
                )
                break
        for ttft, tpot, order, route, decode in local:
            if not costs.meets_ttft_slo(decode, ttft) or tpot > tpot_slo:
                continue
            if check_slots and not costs.has_free_slot(decode):
                continue
            if best is None or (ttft, tpot, order) < best[:3]:
                best = (ttft, tpot, order, self._local(costs, decode, ttft, tpot, route))
        if best is None and costs.local_fallback:
            best = self._fallback(costs, remote, local, ttft_slo, tpot_slo, check_slots)
        if best is not None:
            return best[3]
        return self._reject(costs, ranked, tpot_by_route, local)

    def _local(
        self, costs: RequestCosts, decode: InstanceSnapshot, ttft: float, tpot: float, route: Route
    ) -> Assign:
        """``decode`` prefills the request itself."""
        return Assign(None, decode.id, ttft, tpot, costs.cached_blocks(decode), route, self.name)

    def _fallback(
        self,
        costs: RequestCosts,
        remote: Sequence[tuple[int, InstanceSnapshot]],
        local: list[tuple[float, float, int, Route, InstanceSnapshot]],
        ttft_slo: float,
        tpot_slo: float,
        check_slots: bool,
    ) -> tuple[float, float, int, Assign] | None:
        """No pair and no conditional-disaggregation route meets the SLOs: the decode instance
        with the lowest TTFT that meets both prefilling the request itself (no transfer, its
        own queue), if any, and whose running sequences still meet the TPOT SLO with the
        prefill in their steps (its service time spread over their mean remaining tokens).
        The options it adds also count for the rejection's wait."""
        best: tuple[float, float, int, Assign] | None = None
        config = self.config
        for order, decode in remote:
            if decode.can_prefill():
                continue  # a BOTH instance is a local option already
            ttft, tpot = costs.ttft_s(decode, local=True), costs.tpot_s(decode, None)
            local.append((ttft, tpot, order, Route.LOCAL_FALLBACK, decode))
            if ttft > ttft_slo or not costs.meets_ttft_slo(decode, ttft) or tpot > tpot_slo:
                continue
            if check_slots and not costs.has_free_slot(decode):
                continue
            load = decode.load
            running_slo = costs.running_tpot_slo_s  # theirs, even for a one-token request
            if load.running_decodes and running_slo is not None:
                remaining = load.remaining_decode_tokens or (
                    config.default_remaining_tokens * load.running_decodes
                )
                per_sequence = max(1.0, remaining / load.running_decodes)
                others_s = (
                    decode.predictor.decode_step_s(load.running_decodes, load.decode_context_tokens)
                    + costs.service_ttft_s(decode, local=True) / per_sequence
                )
                if others_s > running_slo:
                    continue  # the prefill would push the running sequences past the SLO
            if best is None or (ttft, tpot, order) < best[:3]:
                assign = self._local(costs, decode, ttft, tpot, Route.LOCAL_FALLBACK)
                best = (ttft, tpot, order, assign)
        return best

    def _reject(
        self,
        costs: RequestCosts,
        ranked: Sequence[tuple[float, int, InstanceSnapshot]],
        decode_table: _DecodeTable,
        local: Sequence[tuple[float, float, int, Route, InstanceSnapshot]],
    ) -> Reject:
        """Admission: no option meets both SLOs. The wait of a pair is the longer of its two
        sides' waits; sides are independent across pairs, so the best pair waits
        ``max(min TTFT wait, min TPOT wait)``."""
        wait = INF
        if ranked and decode_table.rows:
            ttft_wait = min(
                costs.ttft_wait_s(prefill, ttft, local=False) for ttft, _, prefill in ranked
            )
            tpot_wait = min(decode_table.tpot_waits(ranked))
            wait = max(ttft_wait, tpot_wait)
        for ttft, _, _, _, decode in local:
            option = max(
                costs.ttft_wait_s(decode, ttft, local=True),
                costs.tpot_wait_s(decode, 0.0),
            )
            wait = min(wait, option)
        slos = f"TTFT SLO {_fmt(costs.ttft_slo_s)}, TPOT SLO {_fmt(costs.tpot_slo_s)}"
        if wait == INF:
            fastest = ""
            if costs.ttft_slo_s is not None and (ranked or local):
                quiet = [costs.quiet_ttft_s(p) for _, _, p in ranked]
                quiet += [costs.quiet_ttft_s(d) for *_, d in local]
                fastest = f" (the fastest idle TTFT predicted is {min(quiet) * 1e3:.1f} ms)"
            return Reject(
                RejectReason.SLO_UNATTAINABLE,
                None,
                f"no instance could meet {slos} even when idle{fastest}",
            )
        config = self.config
        retry = min(config.max_retry_after_s, max(config.min_retry_after_s, wait))
        return Reject(RejectReason.OVERLOADED, retry, f"no instance pair meets {slos} now")


def _fmt(slo: float | None) -> str:
    return "none" if slo is None else f"{slo * 1e3:g} ms"


class _DecodeTable:
    """TPOT of each decode instance that needs a prefill, by how its KV would arrive, so that
    the best decode instance for a prefill instance costs O(hosts), not O(decode instances)."""

    __slots__ = ("_by_host", "_costs", "_network", "rows")

    def __init__(
        self,
        costs: RequestCosts,
        decodes: Sequence[tuple[int, InstanceSnapshot]],
        check_slots: bool,
    ) -> None:
        self._costs = costs
        self.rows = decodes
        network: list[tuple[float, int, InstanceSnapshot]] = []
        by_host: dict[str, tuple[float, int, InstanceSnapshot]] = {}
        for order, decode in decodes:
            if check_slots and not costs.has_free_slot(decode):
                continue
            step = costs.step_s(decode)
            network.append(
                (step + costs.transfer_share_s(decode, decode.network_transport), order, decode)
            )
            if decode.host:
                entry = (step + costs.transfer_share_s(decode, Transport.SHM), order, decode)
                if decode.host not in by_host or entry[:2] < by_host[decode.host][:2]:
                    by_host[decode.host] = entry
        network.sort(key=lambda row: (row[0], row[1]))
        self._network = network
        self._by_host = by_host

    def best_for(
        self, prefill: InstanceSnapshot, tpot_slo: float
    ) -> tuple[float, int, InstanceSnapshot] | None:
        """The decode instance with the lowest TPOT after a prefill on ``prefill`` (not itself),
        if it meets ``tpot_slo``."""
        best: tuple[float, int, InstanceSnapshot] | None = None
        for row in self._network:
            if row[2].id == prefill.id or (prefill.host and row[2].host == prefill.host):
                continue
            best = row
            break
        same_host = self._by_host.get(prefill.host) if prefill.host else None
        if same_host is not None and same_host[2].id == prefill.id:
            same_host = self._same_host_excluding(prefill)
        if same_host is not None and (best is None or same_host[:2] < best[:2]):
            best = same_host
        if best is None or best[0] > tpot_slo:
            return None
        return best

    def _same_host_excluding(
        self, prefill: InstanceSnapshot
    ) -> tuple[float, int, InstanceSnapshot] | None:
        rows = [
            (self._costs.tpot_s(d, Transport.SHM), order, d)
            for order, d in self.rows
            if d.host == prefill.host and d.id != prefill.id
        ]
        return min(rows, key=lambda row: (row[0], row[1]), default=None)

    def tpot_waits(self, prefills: Sequence[tuple[float, int, InstanceSnapshot]]) -> list[float]:
        """Per decode instance, its TPOT wait with the KV arriving the fastest way it can (by
        shared memory when some prefill instance shares its host)."""
        hosts = {p.host for _, _, p in prefills if p.host}
        costs = self._costs
        waits = []
        for _, decode in self.rows:
            transport = Transport.SHM if decode.host in hosts else decode.network_transport
            waits.append(costs.tpot_wait_s(decode, costs.transfer_share_s(decode, transport)))
        return waits
