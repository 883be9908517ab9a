"""The KV cache's block pool: refcounted blocks, and automatic prefix caching keyed by adapter content.

A full block's key is a hash chain, sha256(parent key, the identity of whoever computed it, its
token ids), so two sequences share a block only if they hold the same tokens before and in it and
ran the same weights. The identity is the base model's own constant or an adapter's content digest
(`LoadedAdapter.digest`: its weights and config), never its name: an adapter deleted and registered
again under the same name with other weights gets other keys, and its requests never read the old
blocks.

Block life: `allocate` hands out blocks with refcount 1 (from the empty ones first, then by
evicting the least recently freed cached block). After each step, `commit` keys a sequence's
blocks that are now full of computed tokens: from then on they are cached content. `free` drops a
reference; a cached block whose last reference goes stays in an LRU and is reclaimed only when an
allocation needs it; any other block is simply empty again.

A new sequence `match`es the longest run of cached blocks of its tokens, `start`s from it (taking
references, so it prefills only the rest) and promises the keys of the full blocks it will compute.
The block holding its last token is never matched: that token is always computed, so there are
logits to sample from. When the block after a match is promised by a running sequence (n > 1
choices, a burst of requests with one system prompt, a long prompt in chunked prefill), `match`
says so and the scheduler waits for it rather than compute it twice. `release` (finish, abort,
preemption) withdraws the promises and frees the blocks; a preempted sequence finds its own
cached blocks again when it is recomputed, unless they were reclaimed meanwhile.

With caching disabled the pool is a plain free list: nothing is keyed, matched or kept.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

_DOMAIN = b"loragate-prefix-cache-v1\0"
BASE_IDENTITY = hashlib.sha256(_DOMAIN + b"base-model").digest()


def adapter_identity(digest: str) -> bytes:
    """The key identity of an adapter from its content digest (never equal to the base's)."""
    return hashlib.sha256(_DOMAIN + b"lora-adapter\0" + digest.encode()).digest()


def block_key(parent: bytes, identity: bytes, tokens: Seq[int]) -> bytes:
    """sha256 over the parent block's key, the identity and the block's token ids."""
    return hashlib.sha256(parent + identity + array("q", tokens).tobytes()).digest()


@dataclass
class PrefixState:
    """A sequence's place in the prefix cache."""

    identity: bytes | None = None  # whose KV its blocks hold; None: not cacheable
    keys: list[bytes] = field(default_factory=list)  # keys of its leading full blocks (memoised)
    committed: int = 0  # leading blocks of its table that hold computed, keyed content
    promised: int = 0  # leading blocks whose keys it promised to compute (see PrefixCache.start)
    # the last match's cached run, valid while the pool's cached contents are unchanged:
    # (pool generation, identity, blocks looked up, blocks found)
    matched: tuple[int, bytes, int, list[int]] | None = None


class SequenceLike(Protocol):
    """What the pool needs from a sequence (`engine.sequence.Sequence` provides it)."""

    block_table: list[int]
    num_computed: int
    prefix: PrefixState

    @property
    def num_tokens(self) -> int: ...

    def token_slice(self, start: int, end: int) -> list[int]: ...


@dataclass
class Match:
    """The cached blocks a sequence can start from, and whether the block after them is promised
    by a running sequence (worth waiting for)."""

    blocks: list[int]
    pending: bool = False


class PrefixCache:
    """The block pool of one KV cache (see the module docstring). Single-threaded: the step loop
    owns it."""

    def __init__(self, num_blocks: int, block_size: int, enabled: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enabled = enabled
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # empty blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks  # set iff the block is cached content
        self._by_key: dict[bytes, int] = {}
        self._promised: Counter[bytes] = Counter()
        self._generation = 0  # bumped whenever a key enters or leaves _by_key (memoised matches expire)
        self.queries = 0  # prompt tokens looked up by newly admitted requests
        self.hits = 0  # of those, tokens found in the cache
        self.evictions = 0  # cached blocks reclaimed by allocations

    # ---- the allocator -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: empty ones and cached ones nobody references."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks holding cached content, referenced or not."""
        return len(self._by_key)

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
                del self._by_key[self._key[b]]
                self._key[b] = None
                self.evictions += 1
                self._generation += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Walked from the tail, so that a sequence's last blocks
        are evicted before its first ones (the head of a prompt is the part others share)."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._key[b] is not None:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    # ---- prefix caching ------------------------------------------------------------------------
    def hashes(self, seq: SequenceLike, identity: bytes, num_blocks: int) -> list[bytes]:
        """The keys of seq's full blocks, at least its first `num_blocks` (memoised on the sequence;
        recomputed if it is now keyed for another identity)."""
        st = seq.prefix
        if st.identity != identity:
            st.identity, st.keys = identity, []
        keys, bs = st.keys, self.block_size
        while len(keys) < num_blocks:
            j = len(keys)
            parent = keys[-1] if keys else b""
            keys.append(block_key(parent, identity, seq.token_slice(j * bs, (j + 1) * bs)))
        return keys

    def match(self, seq: SequenceLike, identity: bytes | None) -> Match:
        """The longest run of cached blocks that starts seq's tokens, short of the block holding
        its last token (which must be computed to have logits). The run is memoised on the sequence
        until the cached contents change: the scheduler asks again for every waiting head each time
        it admits one, which with many clients was most of a burst's scheduling time; whether the
        next block is promised is looked up afresh, since admissions promise blocks."""
        if not self.enabled or identity is None:
            return Match([])
        limit = (seq.num_tokens - 1) // self.block_size
        st = seq.prefix
        memo = st.matched
        if (memo is not None and memo[0] == self._generation and memo[1] == identity and memo[2] == limit
                and st.identity == identity):
            blocks = memo[3]
        else:
            blocks = []
            for key in self.hashes(seq, identity, limit)[:limit]:
                b = self._by_key.get(key)
                if b is None:
                    break
                blocks.append(b)
            st.matched = (self._generation, identity, limit, blocks)
        pending = len(blocks) < limit and st.keys[len(blocks)] in self._promised
        return Match(list(blocks), pending=pending)

    def can_start(self, match: Match, new: int) -> bool:
        """Whether the match's blocks can be referenced and `new` more allocated, together."""
        reclaimed = sum(1 for b in match.blocks if self._ref[b] == 0)  # they leave the LRU
        return new <= self.num_free - reclaimed

    def start(self, seq: SequenceLike, identity: bytes | None, match: Match) -> None:
        """Admit seq (it holds no blocks): reference the match's blocks as the head of its table
        and promise the keys of its other full blocks. The caller allocates the rest."""
        st = seq.prefix
        identity = identity if self.enabled else None
        if st.identity != identity:
            st.identity, st.keys = identity, []
        for b in match.blocks:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
        seq.block_table = list(match.blocks)
        seq.num_computed = len(match.blocks) * self.block_size
        st.committed = st.promised = len(match.blocks)
        if st.identity is not None:
            full = seq.num_tokens // self.block_size
            self._promised.update(self.hashes(seq, st.identity, full)[st.committed:full])
            st.promised = full

    def commit(self, seq: SequenceLike) -> None:
        """After a step: seq's blocks that are now full of computed tokens become cached content
        (unless the same content is cached in another block already) and fulfil its promises."""
        st = seq.prefix
        done = seq.num_computed // self.block_size
        if st.identity is None or done <= st.committed:
            return
        keys = self.hashes(seq, st.identity, done)
        for j in range(st.committed, done):
            b, key = seq.block_table[j], keys[j]
            if key not in self._by_key:
                self._key[b] = key
                self._by_key[key] = b
                self._generation += 1
            if j < st.promised:
                self._unpromise(key)
        st.committed = done

    def release(self, seq: SequenceLike) -> None:
        """seq stops running (finished, aborted or preempted): withdraw what it promised and free
        its blocks. Its cached ones stay in the cache for others, or for its own recompute."""
        st = seq.prefix
        for key in st.keys[st.committed:st.promised]:
            self._unpromise(key)
        st.committed = st.promised = 0
        self.free(seq.block_table)
        seq.block_table = []

    def _unpromise(self, key: bytes) -> None:
        self._promised[key] -= 1
        if self._promised[key] <= 0:
            del self._promised[key]

    # ---- invariants, for tests -----------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free) and not free & lru
        for b in range(self.num_blocks):
            assert self._ref[b] >= 0, b
            assert (self._ref[b] == 0) == (b in free or b in lru), b
            assert b not in free or self._key[b] is None, b
            assert b not in lru or self._key[b] is not None, b
            key = self._key[b]
            assert key is None or self._by_key.get(key) == b, b
        assert len(self._by_key) == sum(k is not None for k in self._key)
        assert all(n > 0 for n in self._promised.values())
