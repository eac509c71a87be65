"""Strata control plane: the OpenAI-compatible gateway and its scheduler.

Per request it tokenizes, asks the scheduling policy for a prefill and a decode instance (or
refuses the request before any work), runs the prefill and the decode on the workers over gRPC with
failover, and streams the answer back; around that, the instance registry, the admin API and the
local-process launcher. Subpackages by concept, layered: controlplane/README.md (module map and
which layer may import which; enforced by import-linter).
"""
