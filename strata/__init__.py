"""Strata's command line and process launcher (`strata serve`, `strata worker`, `strata store`).

This package sits above the three components: it starts them as processes and never reaches into
their internals, so the layering rules of controlplane/, dataplane/ and kvstore/ stay intact.
"""
