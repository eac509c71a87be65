"""The store node server: the kvstore wire protocol over TCP, on uvloop.

Run it with ``python -m kvstore.server --host 127.0.0.1 --port 7600 --arena-size 2GiB``.

Modules, in the order they build on each other: ``limits`` (per-connection limits), ``transfer``
(the transport ops and what a connection holds through them), ``handlers`` (the op → handler
table), ``connection`` (framing, PUT into the arena, replies in request order),
``cluster_member`` (join, read-through, leave), ``lifecycle`` (:class:`StoreServer`: start, stop,
STATS), ``cli`` (``python -m kvstore.server``).
"""
