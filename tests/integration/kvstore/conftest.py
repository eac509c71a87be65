"""Fixtures that run real store nodes (``python -m kvstore.server``) on loopback."""

from tests.integration.kvstore.node_process import NodeFactory, NodeProcess, start_node

__all__ = ["NodeFactory", "NodeProcess", "start_node"]
