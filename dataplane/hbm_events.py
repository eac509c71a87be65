"""HBM events: the blocks in an engine's prefix cache, published as kvstore events (Tier.HBM).

Each worker is one event *source* (``kvstore.cluster.events``): its instance id names it, its events
are numbered 0, 1, 2, ... and the stream starts with ``SourceCleared``. Readers (``ClusterView`` in
the store nodes and the gateway) then see ``(instance, HBM)`` as a holder of those keys, so routing
can prefer the instance that already holds a prefix.

Where the events come from, and why from there::

  engine-core process (vLLM)                      worker process: HbmEventPublisher's thread
  --------------------------                      ------------------------------------------
  BlockPool queues BlockStored / BlockRemoved /   SUB socket -> KVEventBatch (vLLM's seq checked;
  AllBlocksCleared as it caches, evicts, resets   a gap is refilled from the replay socket)
  the scheduler hands each step's batch to        -> HbmBlockTranslator: vLLM hash -> Strata key
  vLLM's ZmqEventPublisher (a queue put; its      -> kvstore events, numbered per source
  own thread serializes and sends)                -> MetadataStore.publish, batched

- The engine's step pays only vLLM's own event bookkeeping and a queue put: serialization, the
  translation and all metadata-store I/O run in other threads (vLLM's publisher thread, ours).
- vLLM's events carry everything a Strata key needs (the block's token ids, its parent's vLLM hash,
  the cache salt of a chain's first block), so :class:`HbmBlockTranslator` derives keys with
  :mod:`kvstore.blocks.hashing` exactly as the connector and the gateway do. Rejected: asking the
  connector's scheduler side for its per-request keys -- it forgets a request when the request
  finishes, which is before that step's events are published, and it only hashes prompts, while
  vLLM also caches blocks of generated tokens (the next turn of a chat reuses them).
- If the metadata store is unreachable, messages are dropped rather than queued without bound and
  the stream restarts, once the store answers again, with ``SourceCleared`` and a snapshot.
- The worker is a heartbeating cluster member of kind ``engine``
  (``kvstore.cluster.membership.Membership``): if it dies without a goodbye (``kill -9``, OOM), its
  heartbeat expires and a ``ClusterView`` reaps it exactly like a dead store node --
  ``SourceCleared(SOURCE_GONE_SEQ)`` -- so its ``(instance, HBM)`` entries leave the index within
  the heartbeat timeout. Being an engine, not a store, it is never chosen as a peer to read
  blocks from (``ClusterView.live_nodes``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from kvstore.blocks.hashing import PUBLIC_HASH_KEY, BlockKey, block_keys
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import (
    SOURCE_GONE_SEQ,
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    SourceCleared,
    SourceSnapshot,
    encode_event,
    encode_snapshot,
)
from kvstore.cluster.membership import Membership
from kvstore.metadata import MemberKind, MetadataStore

__all__ = ["HbmBlockTranslator", "HbmEventPublisher"]

logger = logging.getLogger("strata.worker.hbm_events")

VllmBlockHash = bytes | int
"""vLLM's ``ExternalBlockHash``: bytes, or an int with some hash functions."""

_END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)  # vLLM's replay end marker


_MAX_ROOTS = 4096
"""Namespaces (cache salts) whose root keys are memoized."""


class HbmBlockTranslator:
    """Turns vLLM KV cache events into kvstore events of one source; owns the source's seq.

    State: for each vLLM block hash in the engine's prefix cache, its Strata key and how many
    cached copies the engine has (two requests computing the same prefix at once each cache a
    copy; each copy is removed by its own event). A Strata key is announced when its first copy
    appears and withdrawn when its last one goes.

    Only full, plain-text blocks translate: a ``BlockStored`` with LoRA, multimodal or
    prompt-embedding extra keys, a partial block, another KV cache group, or an unknown parent
    hash is skipped and counted in ``num_skipped`` (the engine still holds it, the index just does
    not learn of it -- the index is a hint, a miss only costs a recomputation).

    Not thread-safe: one thread owns it (the publisher's).
    """

    def __init__(
        self,
        source: str,
        block_size: int,
        root_for: Callable[[str], BlockKey],
        *,
        hash_key: bytes = PUBLIC_HASH_KEY,
    ) -> None:
        """``root_for(namespace)`` is the root key of a namespace (cache salt; "" for none);
        ``hash_key`` the cluster's block-key key (``block_hash_key``)."""
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.source = source
        self.block_size = block_size
        self._root_for = root_for
        self._hash_key = hash_key
        self._roots: dict[str, BlockKey] = {}
        self._strata_of: dict[VllmBlockHash, BlockKey] = {}
        self._copies: dict[VllmBlockHash, int] = {}
        self._next_seq = 0
        self.num_skipped = 0

    # -- stream ------------------------------------------------------------------------------

    def clear(self) -> SourceCleared:
        """Forget every block (a start, or the engine dropped its cache): ``SourceCleared``."""
        self._strata_of.clear()
        self._copies.clear()
        return SourceCleared(self.source, self._take_seq())

    def leave(self) -> SourceCleared:
        """The source is gone for good (the worker stops): ``SourceCleared(SOURCE_GONE_SEQ)``."""
        self._strata_of.clear()
        self._copies.clear()
        return SourceCleared(self.source, SOURCE_GONE_SEQ)

    def restart(self) -> tuple[SourceCleared, SourceSnapshot]:
        """Restart the stream without forgetting: ``SourceCleared`` then a snapshot of the same
        seq, for readers that missed events (the metadata store was unreachable)."""
        cleared = SourceCleared(self.source, self._take_seq())
        return cleared, self.snapshot()

    def snapshot(self) -> SourceSnapshot:
        """Everything held, as of the last event issued (answers a resync request)."""
        if self._next_seq == 0:
            raise RuntimeError("no event issued yet: start the stream with clear()")
        return SourceSnapshot.of(self.source, self._next_seq - 1, {Tier.HBM: self.held_keys()})

    def held_keys(self) -> list[BlockKey]:
        """The Strata keys of the blocks in the engine's prefix cache, in the order cached."""
        return list(self._strata_of.values())

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # -- translation ----------------------------------------------------------------------------

    def translate(self, events: Iterable[Any]) -> list[KVEvent]:
        """kvstore events for a batch of vLLM ``BlockStored`` / ``BlockRemoved`` /
        ``AllBlocksCleared`` events, in order."""
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        out: list[KVEvent] = []
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(event, out)
            elif isinstance(event, BlockRemoved):
                self._removed(event.block_hashes, event.group_idx, out)
            elif isinstance(event, AllBlocksCleared):
                out.append(self.clear())
            else:
                self.num_skipped += 1
        return out

    def _root(self, namespace: str) -> BlockKey:
        root = self._roots.get(namespace)
        if root is None:
            if len(self._roots) >= _MAX_ROOTS:  # salts are client-chosen: bound the memo
                self._roots.clear()
            root = self._roots[namespace] = self._root_for(namespace)
        return root

    def _namespace(self, event: Any) -> str | None:
        """The cache salt of a chain's first block, "" without one; None if untranslatable."""
        extra = event.extra_keys
        first = extra[0] if extra else None
        if extra and any(keys is not None for keys in extra[1:]):
            return None  # per-block extra keys (multimodal, prompt embeddings)
        if first is None:
            return ""
        if len(first) == 1 and isinstance(first[0], str):
            return first[0]  # vLLM publishes the cache salt bare
        return None

    def _stored(self, event: Any, out: list[KVEvent]) -> None:
        hashes = list(event.block_hashes)
        size = self.block_size
        if (
            not hashes
            or event.block_size != size
            or len(event.token_ids) != len(hashes) * size
            or event.lora_name is not None
            or event.lora_id is not None
            or event.group_idx not in (None, 0)
            or (event.extra_keys is not None and len(event.extra_keys) != len(hashes))
        ):
            self.num_skipped += 1
            return
        parent_hash = event.parent_block_hash
        if parent_hash is None:
            namespace = self._namespace(event)
            if namespace is None:
                self.num_skipped += 1
                return
            parent = self._root(namespace)
        else:
            known = self._strata_of.get(parent_hash)
            if known is None or (event.extra_keys and any(k is not None for k in event.extra_keys)):
                self.num_skipped += 1
                return
            parent = known
        keys = block_keys(event.token_ids, size, parent, self._hash_key)
        run: list[BlockKey] = []
        run_parent: BlockKey | None = None if parent_hash is None else parent
        previous = run_parent
        for vllm_hash, key in zip(hashes, keys, strict=True):
            copies = self._copies.get(vllm_hash, 0)
            self._copies[vllm_hash] = copies + 1
            if copies == 0:
                self._strata_of[vllm_hash] = key
                if not run:
                    run_parent = previous
                run.append(key)
            elif run:
                out.append(self._stored_event(run, run_parent))
                run = []
            previous = key
        if run:
            out.append(self._stored_event(run, run_parent))

    def _stored_event(self, keys: list[BlockKey], parent: BlockKey | None) -> BlocksStored:
        return BlocksStored(self.source, self._take_seq(), Tier.HBM, tuple(keys), parent)

    def _removed(
        self, hashes: Iterable[VllmBlockHash], group_idx: int | None, out: list[KVEvent]
    ) -> None:
        if group_idx not in (None, 0):
            return
        gone: list[BlockKey] = []
        for vllm_hash in hashes:
            copies = self._copies.get(vllm_hash)
            if copies is None:
                continue  # never announced (skipped, or a partial-block entry)
            if copies > 1:
                self._copies[vllm_hash] = copies - 1
                continue
            del self._copies[vllm_hash]
            gone.append(self._strata_of.pop(vllm_hash))
        if gone:
            out.append(BlocksRemoved(self.source, self._take_seq(), Tier.HBM, tuple(gone)))


class HbmEventPublisher:
    """Follows vLLM's ZMQ KV event stream and publishes the translation to a metadata store.

    One daemon thread owns the sockets, the translator and the event stream's metadata-store I/O;
    a second one heartbeats (so a slow publish or a vLLM replay never delays a heartbeat):

    - ``start()`` registers the worker as a member of kind ``engine`` (heartbeat first, then
      register, with ``info`` -- e.g. its gRPC ``endpoint`` -- plus ``pid``), then publishes
      ``SourceCleared`` (seq 0 of a new stream) before the engine can have cached anything for
      this worker's clients; ``stop()`` publishes what is left and a final
      ``SourceCleared(SOURCE_GONE_SEQ)`` (graceful leave), so readers forget this instance at
      once, and deregisters.
    - Every ``heartbeat_interval_s`` the heartbeat thread renews the membership, which expires
      after ``heartbeat_timeout_s`` (defaults as a store node's: 1 s, 5 s). A worker that dies
      without stopping is reaped by a ``ClusterView`` once that expires, with
      ``SourceCleared(SOURCE_GONE_SEQ)``: its HBM entries leave the index. If a heartbeat finds
      the worker reaped while alive (it stalled past the timeout), it registers again and the
      stream restarts (``SourceCleared`` + snapshot), as a store node's ``NodeAgent`` does.
    - Every ``flush_interval_s`` the messages translated so far go out in one ``publish`` call.
    - Every ``resync_poll_s`` it asks the store whether a reader requested a snapshot.
    - A failed ``publish`` drops the batch (nothing queues without bound while the store is
      away) and, every ``retry_s`` until one succeeds, tries to restart the stream
      (``SourceCleared`` + snapshot).
    - A gap in vLLM's own sequence numbers is refilled from vLLM's replay socket; if the replay
      buffer no longer has it, the translator starts over empty (``SourceCleared``): the index then
      under-reports this engine's cache until blocks are cached again, which is safe.
    """

    def __init__(
        self,
        store: MetadataStore,
        translator: HbmBlockTranslator,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        topic: str = "",
        flush_interval_s: float = 0.02,
        resync_poll_s: float = 0.5,
        retry_s: float = 1.0,
        info: Mapping[str, Any] | None = None,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
    ) -> None:
        if not 0 < heartbeat_interval_s < heartbeat_timeout_s:
            raise ValueError("need 0 < heartbeat_interval_s < heartbeat_timeout_s")
        self.store = store
        self.translator = translator
        self._endpoint = endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic.encode("utf-8")
        self._flush_interval_s = flush_interval_s
        self._resync_poll_s = resync_poll_s
        self._retry_s = retry_s
        self.membership = Membership(
            store,
            translator.source,
            MemberKind.ENGINE,
            {"pid": os.getpid(), **(info or {})},
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
        self._heartbeat_interval_s = heartbeat_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._rejoin = threading.Event()  # reaped while alive and registered again
        self._outbox: list[bytes] = []
        self._broken = False  # readers may have missed messages: restart the stream
        self._next_engine_seq = 0
        self._sub: Any = None
        self._decoder: Any = None
        self.num_dropped = 0
        self.num_engine_batches = 0
        self.num_rejoins = 0

    @property
    def source(self) -> str:
        return self.translator.source

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> HbmEventPublisher:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._sub = zmq.Context.instance().socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        self._sub.connect(self._endpoint)  # vLLM's publisher binds; zmq retries until it does
        try:
            self.membership.register()
        except Exception as exc:  # the heartbeat thread registers once the store answers
            logger.warning("metadata store unreachable (register %s): %s", self.source, exc)
        self._outbox.append(encode_event(self.translator.clear()))
        self._flush()
        self._thread = threading.Thread(target=self._run, name="strata-hbm-events", daemon=True)
        self._thread.start()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeater, name="strata-hbm-heartbeat", daemon=True
        )
        self._heartbeat_thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish what is pending and a final ``SourceCleared``, deregister; close the sockets."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        heartbeat, self._heartbeat_thread = self._heartbeat_thread, None
        if heartbeat is not None:
            heartbeat.join(timeout_s)
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("HBM event thread did not stop within %.1f s", timeout_s)
            return
        self._drain(block_ms=0)
        self._outbox.append(encode_event(self.translator.leave()))
        self._flush()
        try:
            self.membership.deregister()
        except Exception as exc:  # its heartbeat expires and a view reaps it instead
            logger.warning("could not deregister %s: %s", self.source, exc)
        self._sub.close(linger=0)

    # -- the thread -------------------------------------------------------------------------------

    def _heartbeater(self) -> None:
        while not self._stop.wait(self._heartbeat_interval_s):
            try:
                if self.membership.beat(rejoin=not self._stop.is_set()):
                    logger.warning(
                        "%s was removed from the members while alive; re-announcing", self.source
                    )
                    self._rejoin.set()
            except Exception as exc:
                logger.warning("heartbeat of %s failed: %s", self.source, exc)

    def _run(self) -> None:
        next_resync_poll = time.monotonic() + self._resync_poll_s
        next_retry = 0.0
        while not self._stop.is_set():
            try:
                self._drain(block_ms=max(1, int(self._flush_interval_s * 1000)))
                now = time.monotonic()
                if self._rejoin.is_set():
                    # Readers forgot this source when it was reaped: a new SourceCleared and a
                    # snapshot of everything held (they land after the sweeper's GONE).
                    self._rejoin.clear()
                    next_retry = now + self._retry_s
                    self._flush()  # what was translated before, in seq order
                    self._restart_stream()
                    self.num_rejoins += 1
                elif self._broken and now >= next_retry:
                    next_retry = now + self._retry_s
                    self._restart_stream()
                elif not self._broken and now >= next_resync_poll:
                    next_resync_poll = now + self._resync_poll_s
                    self._answer_resync_request()
                self._flush()
            except Exception:
                logger.exception("HBM event publishing failed; continuing")
                self._stop.wait(self._retry_s)

    def _drain(self, block_ms: int) -> None:
        """Translate every batch vLLM has sent (waiting up to ``block_ms`` for the first)."""
        import zmq

        sub = self._sub
        if not sub.poll(block_ms):
            return
        while True:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_engine_message(frames)

    def _on_engine_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            logger.warning("ignoring a malformed KV event message (%d frames)", len(frames))
            return
        _topic, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big")
        if seq < self._next_engine_seq:
            return  # already seen (a replay overlapping the live stream)
        if seq > self._next_engine_seq:
            self._replay(self._next_engine_seq, seq)
            if seq < self._next_engine_seq:
                return
            if seq > self._next_engine_seq:
                logger.warning(
                    "lost vLLM KV events %d..%d (not in the replay buffer); starting over",
                    self._next_engine_seq,
                    seq - 1,
                )
                self._outbox.append(encode_event(self.translator.clear()))
        self._apply_batch(seq, payload)

    def _apply_batch(self, seq: int, payload: bytes) -> None:
        batch = self._decoder.decode(payload)
        self._next_engine_seq = seq + 1
        self.num_engine_batches += 1
        self._outbox.extend(encode_event(e) for e in self.translator.translate(batch.events))

    def _replay(self, start: int, stop: int) -> None:
        """Ask vLLM's replay socket for batches ``start..stop-1`` and apply them in order."""
        if self._replay_endpoint is None:
            return
        import zmq

        sock: Any = zmq.Context.instance().socket(zmq.DEALER)
        try:
            sock.connect(self._replay_endpoint)
            sock.send_multipart([b"", start.to_bytes(8, "big")])
            while sock.poll(2000):
                frames = sock.recv_multipart()
                if len(frames) != 4 or frames[2] == _END_SEQ:
                    break
                seq = int.from_bytes(frames[2], "big")
                if self._next_engine_seq <= seq < stop:
                    if seq > self._next_engine_seq:
                        break  # the buffer no longer reaches back far enough
                    self._apply_batch(seq, frames[3])
        finally:
            sock.close(linger=0)

    def _answer_resync_request(self) -> None:
        try:
            requested = self.store.take_resync_request(self.source)
        except Exception as exc:
            logger.warning("metadata store unreachable (resync poll): %s", exc)
            self._broken = True
            return
        if requested:
            self._outbox.append(encode_snapshot(self.translator.snapshot()))

    def _restart_stream(self) -> None:
        cleared, snapshot = self.translator.restart()
        self._outbox = [encode_event(cleared), encode_snapshot(snapshot)]
        self._broken = False
        self._flush()
        if not self._broken:
            logger.info("HBM events: stream of %s restarted with a snapshot", self.source)

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        if self._broken:
            self.num_dropped += len(batch)
            return
        try:
            self.store.publish(batch)
        except Exception as exc:
            logger.warning("metadata store unreachable; dropped %d HBM events: %s", len(batch), exc)
            self.num_dropped += len(batch)
            self._broken = True

    def close(self) -> None:
        """Stop (if running) and close the metadata store connection."""
        self.stop()
        with contextlib.suppress(Exception):
            self.store.close()
