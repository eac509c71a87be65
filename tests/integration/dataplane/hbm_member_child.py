"""A worker's HBM side without an engine, as a process a test can ``kill -9``.

``python -m tests.integration.dataplane.hbm_member_child INSTANCE_ID EVENTS_DIR HB_INTERVAL_S
HB_TIMEOUT_S NUM_BLOCKS`` imports what it needs (vLLM's import is the slow part, so a test can
start other processes meanwhile), reads the metadata spec as one line from stdin, then runs the
real :class:`HbmEventPublisher` (registered as an ``engine`` member, heartbeating) fed by vLLM's
own ``ZmqEventPublisher`` -- the object an engine core publishes through -- with one batch caching
NUM_BLOCKS blocks, prints ``hbm member ready KEY_HEX,KEY_HEX,...`` (the Strata keys it announced)
and waits to be killed. SIGTERM stops it gracefully (final ``SourceCleared``, deregister).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher

from dataplane.hbm_events import HbmBlockTranslator, HbmEventPublisher
from kvstore.blocks.hashing import block_keys, root_key
from kvstore.metadata import open_metadata_store

READY_PREFIX = "hbm member ready "
BLOCK_SIZE = 4
LAYOUT = "test-layout"
FINGERPRINT = bytes(16)


def main(argv: list[str]) -> int:
    instance_id, events_dir = argv[0], argv[1]
    hb_interval_s, hb_timeout_s, num_blocks = float(argv[2]), float(argv[3]), int(argv[4])
    metadata = sys.stdin.readline().strip()
    tokens = list(range(900, 900 + num_blocks * BLOCK_SIZE))
    keys = block_keys(tokens, BLOCK_SIZE, root_key(FINGERPRINT, LAYOUT, ""))
    engine = ZmqEventPublisher(
        0, endpoint=f"ipc://{events_dir}/events", replay_endpoint=f"ipc://{events_dir}/replay"
    )
    hbm = HbmEventPublisher(
        open_metadata_store(metadata),
        HbmBlockTranslator(instance_id, BLOCK_SIZE, lambda ns: root_key(FINGERPRINT, LAYOUT, ns)),
        f"ipc://{events_dir}/events",
        f"ipc://{events_dir}/replay",
        info={"endpoint": "127.0.0.1:1"},
        heartbeat_interval_s=hb_interval_s,
        heartbeat_timeout_s=hb_timeout_s,
    ).start()
    stored = BlockStored(
        block_hashes=[i.to_bytes(32, "big") for i in range(num_blocks)],
        parent_block_hash=None,
        token_ids=tokens,
        block_size=BLOCK_SIZE,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    engine.publish(KVEventBatch(ts=time.time(), events=[stored]))
    # zmq's slow joiner may drop that first batch; each later (empty) batch shows the subscriber
    # a gap, which it refills from the replay socket.
    deadline = time.monotonic() + 30
    while hbm.num_engine_batches == 0:
        if time.monotonic() > deadline:
            print("the HBM publisher never saw the engine's batch", file=sys.stderr)
            return 1
        time.sleep(0.2)
        if hbm.num_engine_batches == 0:
            engine.publish(KVEventBatch(ts=time.time(), events=[]))
    print(READY_PREFIX + ",".join(key.hex() for key in keys), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    hbm.close()
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
