"""Strata control plane: the OpenAI-compatible gateway (and, later, the global scheduler).

Module map and import rules: controlplane/README.md.
"""
