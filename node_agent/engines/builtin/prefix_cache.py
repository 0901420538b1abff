"""Prefix KV cache of the built-in engine: KV blocks of earlier requests, reused by later ones.

A sequence's KV cache is cut into blocks of `block` tokens. Block i is keyed by a chain hash
of every token up to and including it (blake2b of the previous block's key and this block's
token ids, seeded by the model's identity), so a key names a whole prefix, as in vLLM's
automatic prefix caching: two requests share block i only if they share all tokens 0..(i+1)
* block. A new request looks its blocks up in order and stops at the first miss; the hits
are copied into its slot (a memcpy, far cheaper than recomputing attention and the MLP for
those positions) and only the rest of the prompt is prefilled. At least the prompt's last
token is always computed, so the first logits come from a real forward pass.

Blocks are stored by copy in a pool of up to `capacity` blocks ([blocks, layers, kv_heads,
block, head_dim] for K and for V), so a request never pins a block and an
evicted block can never be read by a request that already copied it. Eviction is LRU over
blocks; a chain's blocks are touched deepest first so that its first blocks are the most
recently used and a chain is evicted from its tail (a block whose parent is gone can never be
hit again). The pool is a list of 16 MiB segments, each made (torch.empty: neither zeroed nor
copied) when the blocks reach it, so an unused pool costs no memory and growth moves nothing:
the earlier pool, one allocation doubled and zeroed as it filled, took ~20% of a fresh
tiny-20m serving run (32 requests), mostly faulting in up to 256 MiB at a time. Blocks are
copied one at a time (on CPU through numpy, see `_host_view`); a store or load is a few
hundred microseconds. A lookup also compares the block's stored token ids, so a hash
collision cannot serve a wrong block.

Everything here runs on the engine thread; nothing is locked.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

SEGMENT_BYTES = 16 << 20


def _host_view(t: torch.Tensor):
    """A numpy view of a CPU tensor (bfloat16 as int16: the copies only move bytes). Block
    copies go through numpy on CPU: it copies on the calling thread, where torch would hand
    a copy of more than 32K elements to its OpenMP team (on a shared machine it waits for a
    descheduled member: 24-48 ms per copy measured with 2 threads and a busy neighbour), and
    resizing the team to one thread around each copy, as this did before, stops libgomp's
    spinning between the decode step's parallel regions."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def chain_hashes(seed: bytes, tokens: list[int], block: int, have: list[bytes], upto: int) -> list[bytes]:
    """Extend `have` (keys of blocks 0..len(have)-1 of `tokens`) to the first `upto` blocks;
    returns `have`."""
    prev = have[-1] if have else seed
    for i in range(len(have), upto):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(array("q", tokens[i * block:(i + 1) * block]).tobytes())
        prev = h.digest()
        have.append(prev)
    return have


class PrefixCache:
    def __init__(self, model, capacity_bytes: int, block: int = 16, seed: bytes = b""):
        c = model.cfg
        self.model, self.block = model, block
        self.block_bytes = 2 * c.num_layers * c.num_kv_heads * block * c.head_dim * model.embed.element_size()
        self.capacity = max(0, capacity_bytes // self.block_bytes)
        self.seed = hashlib.blake2b(seed, digest_size=16).digest()
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # key -> pool index, least recent first
        self._tokens: dict[int, tuple[int, ...]] = {}  # pool index -> the block's token ids
        self._used = 0  # pool indexes handed out so far (the pool fills before anything is evicted)
        self.stats = {"lookups": 0, "lookup_tokens": 0, "hit_tokens": 0, "inserted_blocks": 0,
                      "evicted_blocks": 0}
        self._host = model.device.type == "cpu"
        self._seg_blocks = max(1, SEGMENT_BYTES // self.block_bytes)
        self._segs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.capacity and self._host:
            # the first segment now, its pages faulted in (numpy: no OpenMP pool on the caller's
            # thread), so a fresh engine's first stores do not pay for them
            k, v, _ = self._segment(0)
            _host_view(k).fill(0)
            _host_view(v).fill(0)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.block_bytes

    def hashes(self, tokens: list[int], have: list[bytes], upto: int) -> list[bytes]:
        return chain_hashes(self.seed, tokens, self.block, have, upto)

    def block_keys(self, limit: int | None = None) -> list[bytes]:
        """Keys of the cached blocks, most recently used first (at most `limit`)."""
        keys = reversed(self._lru)
        return [k for _, k in zip(range(limit if limit is not None else len(self._lru)), keys)]

    def match(self, tokens: list[int], hashes: list[bytes]) -> list[int]:
        """Pool indexes of the longest cached run of whole blocks at the start of `tokens`,
        leaving at least the last token out (`hashes` memoises the chain keys)."""
        usable = (len(tokens) - 1) // self.block
        if not self.capacity or usable <= 0:
            return []
        self.hashes(tokens, hashes, usable)
        hit = []
        for i in range(usable):
            idx = self._lru.get(hashes[i])
            if idx is None or self._tokens[idx] != tuple(tokens[i * self.block:(i + 1) * self.block]):
                break
            hit.append(idx)
        return hit

    # ------------------------------------------------------------------ updates
    def load(self, slot: int, tokens: list[int], hashes: list[bytes]) -> int:
        """Copy the longest cached prefix of `tokens` into positions 0.. of `slot`; returns
        how many positions it filled (a multiple of the block size)."""
        hit = self.match(tokens, hashes)
        self.stats["lookups"] += 1
        self.stats["lookup_tokens"] += len(tokens)
        if not hit:
            return 0
        self._copy(slot, [(i, idx) for i, idx in enumerate(hit)], to_pool=False)
        self._touch(hashes[:len(hit)])
        n = len(hit) * self.block
        self.stats["hit_tokens"] += n
        return n

    def store(self, slot: int, tokens: list[int], hashes: list[bytes], valid: int) -> int:
        """Keep the whole blocks among positions 0..valid-1 of `slot` (whose tokens are
        `tokens`); blocks already held are only touched. Returns the blocks newly stored."""
        nblocks = min(valid // self.block, self.capacity)
        if nblocks <= 0:
            return 0
        self.hashes(tokens, hashes, nblocks)
        keys = hashes[:nblocks]
        missing = [i for i, key in enumerate(keys) if key not in self._lru]
        self._touch([keys[i] for i in range(nblocks) if keys[i] in self._lru])
        if missing:
            dest = [self._take() for _ in missing]
            self._copy(slot, list(zip(missing, dest)), to_pool=True)
            for i, d in zip(missing, dest):
                self._lru[keys[i]] = d
                self._tokens[d] = tuple(tokens[i * self.block:(i + 1) * self.block])
            self.stats["inserted_blocks"] += len(missing)
        self._touch(keys)
        return len(missing)

    def clear(self) -> None:
        """Drop every block and the pool's memory."""
        self._lru.clear()
        self._tokens.clear()
        self._used = 0
        self._segs = []

    def _segment(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """K segment, V segment and offset of pool index `idx`; segments are made as the
        pool fills (never copied or zeroed: a block is written before it can be read)."""
        n, off = divmod(idx, self._seg_blocks)
        while len(self._segs) <= n:
            c, m = self.model.cfg, self.model
            size = min(self._seg_blocks, self.capacity - len(self._segs) * self._seg_blocks)
            shape = (size, c.num_layers, c.num_kv_heads, self.block, c.head_dim)
            self._segs.append((torch.empty(shape, device=m.device, dtype=m.dtype),
                               torch.empty(shape, device=m.device, dtype=m.dtype)))
        k, v = self._segs[n]
        return k, v, off

    def _copy(self, slot: int, pairs: list[tuple[int, int]], to_pool: bool) -> None:
        """Copy block i of `slot` to (to_pool) or from pool index d, for each (i, d); runs
        of consecutive blocks and pool indexes in one segment move in one copy."""
        b, m = self.block, self.model
        j = 0
        while j < len(pairs):
            i0, d0 = pairs[j]
            k, v, off = self._segment(d0)
            n = 1
            while (j + n < len(pairs) and pairs[j + n] == (i0 + n, d0 + n) and off + n < k.shape[0]):
                n += 1
            j += n
            for cache, seg in ((m.k_cache, k), (m.v_cache, v)):
                run = cache[:, slot, :, i0 * b:(i0 + n) * b]  # [layers, kv_heads, n * b, head_dim]
                run = run.view(run.shape[0], run.shape[1], n, b, run.shape[-1]).permute(2, 0, 1, 3, 4)
                dst, src = (seg[off:off + n], run) if to_pool else (run, seg[off:off + n])
                if self._host:  # numpy: see _host_view
                    _host_view(dst)[...] = _host_view(src)
                else:
                    dst.copy_(src)

    def _take(self) -> int:
        """A free pool index, evicting the least recently used block when the pool is full.
        `store` touches the chain it extends first, so the victim is never one of its own
        blocks (a chain is at most `capacity` blocks long)."""
        if self._used < self.capacity:
            self._used += 1
            return self._used - 1
        _, idx = self._lru.popitem(last=False)
        del self._tokens[idx]
        self.stats["evicted_blocks"] += 1
        return idx

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain's blocks as used, its first block most recently (see the module note)."""
        for key in reversed(keys):
            if key in self._lru:
                self._lru.move_to_end(key)
