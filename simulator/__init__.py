"""Strata's simulator: the real control plane's decisions against timing models of engines,
KV transfers and store tiers (docs/design/simulator.md; simulator/README.md; ``strata
simulate``)."""
