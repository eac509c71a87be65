"""The cluster side: ``events`` (KV events and their wire format), ``match`` and ``index``
(``PrefixIndex``), ``view`` (``ClusterView``: the index following the metadata stream,
membership, reaping), ``membership`` (``NodeAgent``: a node's registration, heartbeat and KV
events), ``peers`` (``PeerFetcher``: read-through, migration). The metadata backends it follows
are the layer below, :mod:`kvstore.metadata`."""
