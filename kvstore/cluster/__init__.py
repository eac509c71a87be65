"""The cluster side: ``index`` (``PrefixIndex``), ``view`` (``ClusterView``: the index following
the metadata stream, membership, reaping), ``membership`` (``NodeAgent``: a node's registration,
heartbeat and KV events), ``peers`` (``PeerFetcher``: read-through, migration)."""
