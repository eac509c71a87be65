"""Strata's bottom layer: small, dependency-free helpers every package shares.

It imports nothing else of Strata (``kvstore``, ``controlplane``, ``dataplane`` and ``strata`` all
import it), so that a size, a duration or an endpoint is parsed the same way everywhere.
"""
