"""Per-instance latency model: prefill time, decode step time, KV transfer time.

The scheduler predicts what a choice of instances would cost from three small linear models per
instance (docs/design/scheduling.md §2 has the derivation, the priors and a worked example):

* **Prefill** of ``n`` new (uncached) tokens after ``c`` cached ones::

      prefill_s(n, c) = a0 + a1·n + a2·c + a3·A(n, c),   A(n, c) = n·c + n·(n + 1)/2

  ``a1·n`` is the weight-bound work per new token, ``a2·c`` the per-token cost of attaching the
  cached context (block tables, the cached part of the KV read), and ``A`` counts the query-key
  pairs of causal attention over the new tokens (each new token ``i`` attends ``c + i`` tokens):
  the term that makes long prompts superlinear.
* **Decode step** of a running batch of ``b`` sequences holding ``k`` context tokens in all::

      step_s(b, k) = d0 + d1·b + d2·k

* **Transfer** of ``x`` bytes over a transport (shared memory, TCP, RDMA) or from SSD::

      transfer_s(x) = latency_s + x / bytes_per_s

From these the policies build TTFT and TPOT predictions (controlplane/scheduling/policies/).
Work already queued on an instance (``t`` uncached prompt tokens in ``r`` requests) is predicted
with the same prefill model, as ``r`` prompts of ``t/r`` tokens each with nothing cached:
``queue_s(t, r) = a0·r + a1·t + a3·t·(t/r + 1)/2``.

**Calibration.** :meth:`ProfilePlan.for_engine` lists the (new, cached) and (batch, context)
points to time when a worker becomes ready; :func:`fit_prefill` and :func:`fit_decode` fit them by
least squares with non-negative coefficients (:func:`fit_nonnegative`: every support subset is
solved and the best feasible one kept, which is exact NNLS for these 3-4 features).
:class:`LatencyPredictor` then refits online, every ``refit_every`` observations, from the profile
samples plus a bounded window of recent observations (the window alone once it is full and spans
enough shapes to determine every coefficient, so the model follows drift). Its prediction error is
tracked by :class:`PredictionAccuracy` as a rolling mean absolute percentage error.

**What is compared with what** (the MAPE is of the gateway's view; docs/design/scheduling.md
§2.2-2.3 has the measurements behind each choice):

* *TTFT* is observed at the gateway: HTTP arrival to first token. The prefill model predicts
  engine time (the worker's ``engine_time_s``), so the registry adds
  :attr:`LatencyPredictor.ttft_overhead_s` of the prefill instance: the median of recent
  ``TTFT - engine_time_s`` (gateway work + rpc), seeded by the profile's rpc overhead.
* *TPOT* is observed as ``(last token - first token) / (tokens - 1)``; its first gap is the
  decode instance taking the request over (Decode rpc, KV load, the last partial block
  recomputed: the pool holds whole blocks). :meth:`LatencyPredictor.transfer_s`, which the
  policy spreads over ``max_tokens - 1`` gaps, therefore includes
  :attr:`LatencyPredictor.handoff_s` (median of recent first-gap waits beyond a step).
* *Level*: engine times move with the regime (a busy neighbour on the same CPU doubled the
  tiny model's prefill): :attr:`LatencyPredictor.prefill` and ``decode`` are the fits with their
  fixed cost moved by the weighted median of the last ``LEVEL_WINDOW`` residuals (weights
  ``1/observed``: the shift that minimises their MAPE). Refits keep the shape (they need many
  shapes); the level follows the regime within a few requests.
* *Change points*: 3 consecutive observations off the model by more than 3× the same way
  rescale it at once by their median ratio (:class:`~.feedback.ChangeDetector`): a model 10×
  off (a poisoned profile) is right from the 4th request on.
* *Plausibility*: a profile replaces a model only if :func:`~.plausibility.check_profile`
  finds it physical and within 3× of its siblings' models and of the online observations.
* Only prefills that had their instance to themselves refit the prefill model (the registry
  knows): an overlapped one's engine time holds queueing, which the queue term predicts.

Pure computation: no I/O, no clocks, no threads. Each predictor belongs to one thread (the
gateway's event loop); the registry owns one per instance.
"""
