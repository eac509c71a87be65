"""The kvstore wire protocol as a sans-I/O codec: ``frame`` (the 24-byte header, opcodes,
statuses), ``messages`` (op payloads), ``requests`` (request frames), ``replies`` (what a reply
means: results and the one error mapping), ``types`` (typed results). No I/O: the clients, the
peer fetcher and the server own their sockets."""
