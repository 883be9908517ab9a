"""The KV cache's block pool: refcounted blocks, and automatic prefix caching keyed by adapter content.

A full block's key is a hash chain, sha256(parent key, the identity of whoever computed it, its
token ids), so two sequences share a block only if they hold the same tokens before and in it and
ran the same weights. The identity is the base model's own constant or an adapter's content digest
(`LoadedAdapter.digest`: its weights and config), never its name: an adapter deleted and registered
again under the same name with other weights gets other keys, and its requests never read the old
blocks.

Block life: `allocate` hands out blocks with refcount 1 (from the free list first, then by evicting
the least recently freed cached block); a running sequence's blocks get their key as soon as their
tokens are known (`register`) but count as cached only once the step that computes them has run
(`commit`). `free` drops a reference; a block whose last reference goes keeps its content in an
LRU if it was computed under a key, and is reclaimed only when an allocation needs it. A new
sequence `match`es the longest run of computed cached blocks of its tokens and takes references on
them (`take`), so it prefills only the rest; the block holding its last token is never taken, so
that token is always computed and there are logits to sample from. When the block after that run
is still being computed by a running sequence (n > 1 choices, or requests arriving together with
one system prompt), `match` says so and the scheduler waits a step to share it rather than compute
it twice.

With caching disabled the pool is a plain free list: nothing is keyed, matched or kept.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

_DOMAIN = b"loragate-prefix-cache-v1\0"
BASE_IDENTITY = hashlib.sha256(_DOMAIN + b"base-model").digest()


def adapter_identity(digest: str) -> bytes:
    """The key identity of an adapter from its content digest (never equal to the base's)."""
    return hashlib.sha256(_DOMAIN + b"lora-adapter\0" + digest.encode()).digest()


def block_key(parent: bytes, identity: bytes, tokens: Seq[int]) -> bytes:
    """sha256 over the parent block's key, the identity and the block's token ids."""
    return hashlib.sha256(parent + identity + array("q", tokens).tobytes()).digest()


class Hashable(Protocol):
    """What the pool needs from a sequence (`engine.sequence.Sequence` provides it)."""

    block_table: list[int]
    num_computed: int
    block_hashes: list[bytes]
    hash_identity: bytes | None
    num_committed_blocks: int

    @property
    def num_tokens(self) -> int: ...

    def token_at(self, i: int) -> int: ...


@dataclass
class Match:
    """The computed cached blocks a sequence can start from, and whether the next block is being
    computed by a running sequence right now (worth waiting a step for)."""

    blocks: list[int]
    pending: bool = False


class PrefixCache:
    """The block pool of one KV cache (see the module docstring). Single-threaded: the step loop
    owns it."""

    def __init__(self, num_blocks: int, block_size: int, enabled: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enabled = enabled
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # nothing reusable in them
        self._lru: OrderedDict[int, None] = OrderedDict()  # refcount 0, cached content; oldest first
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        self._computed = [False] * num_blocks
        self._by_key: dict[bytes, int] = {}
        self.num_cached = 0  # blocks whose computed content is keyed (in use or in the LRU)
        self.queries = 0  # prompt tokens looked up by newly admitted requests
        self.hits = 0  # of those, tokens found computed in the cache

    # ---- the allocator -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: empty ones and cached ones nobody references."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n blocks with refcount 1, all or nothing; cached content is evicted least recent first."""
        if n > self.num_free:
            raise MemoryError(f"need {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._lru.popitem(last=False)
                self._unkey(b)
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Walked from the tail, so that a sequence's last blocks
        are evicted before its first ones (the head of a prompt is the part others share)."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            if self._computed[b]:
                self._lru[b] = None
            else:
                self._unkey(b)  # keyed for a computation that never ran
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def _unkey(self, b: int) -> None:
        key = self._key[b]
        if key is not None:
            if self._by_key.get(key) == b:
                del self._by_key[key]
            self._key[b] = None
        if self._computed[b]:
            self._computed[b] = False
            self.num_cached -= 1

    # ---- prefix caching ------------------------------------------------------------------------
    def hashes(self, seq: Hashable, identity: bytes, num_blocks: int) -> list[bytes]:
        """The keys of seq's first `num_blocks` full blocks (computed once, kept on the sequence)."""
        if seq.hash_identity != identity:
            seq.hash_identity, seq.block_hashes = identity, []
        keys, bs = seq.block_hashes, self.block_size
        while len(keys) < num_blocks:
            j = len(keys)
            parent = keys[-1] if keys else b""
            keys.append(block_key(parent, identity, [seq.token_at(i) for i in range(j * bs, (j + 1) * bs)]))
        return keys[:num_blocks]

    def match(self, seq: Hashable, identity: bytes | None) -> Match:
        """The longest run of computed cached blocks that starts seq's tokens, short of the block
        holding its last token (which must be computed to have logits)."""
        if not self.enabled or identity is None:
            return Match([])
        limit = (seq.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        for key in self.hashes(seq, identity, limit):
            b = self._by_key.get(key)
            if b is None:
                return Match(blocks)
            if not self._computed[b]:
                return Match(blocks, pending=True)
            blocks.append(b)
        return Match(blocks)

    def can_take(self, blocks: list[int], new: int) -> bool:
        """Whether `blocks` can be referenced and `new` more allocated, together."""
        reclaimed = sum(1 for b in blocks if self._ref[b] == 0)  # they leave the LRU
        return new <= self.num_free - reclaimed

    def take(self, blocks: list[int]) -> None:
        """Reference cached blocks (a match's)."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1

    def register(self, seq: Hashable) -> None:
        """Key seq's blocks whose tokens are all known, before they are computed: a sequence
        admitted meanwhile sees them as pending and waits for them instead of computing them too.
        A key already held by another block leaves this block anonymous."""
        if not self.enabled or seq.hash_identity is None:
            return
        full = min(len(seq.block_table), seq.num_tokens // self.block_size)
        for j, key in enumerate(self.hashes(seq, seq.hash_identity, full)):
            b = seq.block_table[j]
            if self._key[b] is None and key not in self._by_key:
                self._key[b] = key
                self._by_key[key] = b

    def commit(self, seq: Hashable) -> None:
        """After a step: seq's blocks that are now full of computed tokens become cached content."""
        if not self.enabled or seq.hash_identity is None:
            return
        done = seq.num_computed // self.block_size
        if done <= seq.num_committed_blocks:
            return
        keys = self.hashes(seq, seq.hash_identity, done)
        for j in range(seq.num_committed_blocks, done):
            b = seq.block_table[j]
            if self._key[b] is None:
                if keys[j] in self._by_key:
                    continue  # the same content is cached in another block already
                self._key[b] = keys[j]
                self._by_key[keys[j]] = b
            if not self._computed[b]:
                self._computed[b] = True
                self.num_cached += 1
        seq.num_committed_blocks = done

    # ---- invariants, for tests -----------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free) and not free & lru
        for b in range(self.num_blocks):
            assert self._ref[b] >= 0
            assert (self._ref[b] == 0) == (b in free or b in lru), b
            assert b not in free or (self._key[b] is None and not self._computed[b]), b
            assert b not in lru or self._computed[b], b
            key = self._key[b]
            assert key is None or self._by_key.get(key) == b, b
            assert not self._computed[b] or key is not None, b
        assert all(self._key[b] == k for k, b in self._by_key.items())
        assert self.num_cached == sum(self._computed)
