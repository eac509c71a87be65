"""SIEVE (Zhang et al., NSDI '24): one FIFO, a visited bit and a hand."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SIEVEPolicy"]


class _SieveNode:
    __slots__ = ("key", "newer", "older", "visited")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.visited = False
        self.newer: _SieveNode | None = None
        self.older: _SieveNode | None = None


class SIEVEPolicy:
    """SIEVE: a FIFO of keys with a visited bit, and a hand sweeping from oldest to newest.

    * **Insert** at the new end, not visited. **Access** sets the visited bit (no reordering).
    * **Select**: from the hand (initially the oldest key), clear visited bits while moving toward
      newer keys (wrapping to the oldest), and stop at the first unvisited key ``can_evict``
      accepts; the hand stays there. Keys are never moved, so survivors keep their age -- what
      distinguishes SIEVE from CLOCK.
    * **Remove** unlinks the key; a hand on it moves to the next newer key.

    A hand-made doubly linked list (not an ``OrderedDict``) because the hand must continue from a
    key in the middle of the queue.
    """

    __slots__ = ("_hand", "_newest", "_nodes", "_oldest")

    def __init__(self) -> None:
        self._nodes: dict[bytes, _SieveNode] = {}
        self._newest: _SieveNode | None = None
        self._oldest: _SieveNode | None = None
        self._hand: _SieveNode | None = None

    def on_insert(self, key: bytes) -> None:
        if key in self._nodes:
            self.on_access(key)
            return
        node = _SieveNode(key)
        node.older = self._newest
        if self._newest is not None:
            self._newest.newer = node
        else:
            self._oldest = node
        self._newest = node
        self._nodes[key] = node

    def on_access(self, key: bytes) -> None:
        node = self._nodes.get(key)
        if node is not None:
            node.visited = True

    def on_remove(self, key: bytes) -> None:
        node = self._nodes.pop(key, None)
        if node is None:
            return
        if self._hand is node:
            self._hand = node.newer
        if node.newer is not None:
            node.newer.older = node.older
        else:
            self._newest = node.older
        if node.older is not None:
            node.older.newer = node.newer
        else:
            self._oldest = node.newer

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        node = self._hand
        # Each node is seen at most twice: once to clear its bit, once as a candidate.
        for _ in range(2 * len(self._nodes)):
            if node is None:
                node = self._oldest
            assert node is not None
            if node.visited:
                node.visited = False
            elif can_evict(node.key):
                self._hand = node
                return node.key
            node = node.newer
        self._hand = node
        return None

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes
