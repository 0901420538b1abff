"""What this node's prefix cache holds, told to the coordinator on the work channel.

The coordinator cannot name token blocks (it has no tokenizer for most models), so it
routes by chain hashes over the prompt's text (`protocol.prefix.prefix_chain`). The agent
hashes each prompt it served the same way and remembers, next to those text prefixes, the
engine's own block keys for the prompt's tokens. At each beat it looks at which block keys
the engine still holds and reports the text prefixes whose tokens are still covered: a
prefix counts as held while the blocks covering its share of the prompt are all cached.

Bounded: at most `MAX_SERVED` prompts remembered, at most `MAX_REPORTED` prefixes held at a
time, and a beat carries only the change since the last report (`prefix_add`,
`prefix_drop`) — the first beat on a new channel sends everything (`prefix_full`). A node
whose engine has no prefix cache (vLLM or an upstream server: their caches cannot be read
from outside) reports nothing, and the coordinator keeps guessing from what it routed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from protocol.prefix import prefix_chain

MAX_SERVED = 512
MAX_REPORTED = 256


class PrefixReport:
    def __init__(self, held_keys: Callable[[], set[bytes]], max_served: int = MAX_SERVED,
                 max_reported: int = MAX_REPORTED) -> None:
        self.held_keys = held_keys  # the engine's cached block keys, read at each beat
        self.max_served, self.max_reported = max_served, max_reported
        # served prompts, oldest first: (chain [(text prefix key, size)], token block keys)
        self._served: OrderedDict[bytes, tuple[list[tuple[bytes, int]], list[bytes]]] = OrderedDict()
        self._sent: dict[bytes, int] = {}  # what the coordinator was last told

    def served(self, model: str, payload: dict[str, Any], block_keys: list[bytes]) -> None:
        """A prompt was prefilled and its blocks stored: remember both namings."""
        chain = prefix_chain(model, payload)
        if not chain or not block_keys:
            return
        last = chain[-1][0]
        self._served.pop(last, None)
        self._served[last] = (chain, block_keys)
        while len(self._served) > self.max_served:
            self._served.popitem(last=False)

    def held(self) -> dict[bytes, int]:
        """Text prefix key -> size for the prefixes whose tokens the cache still holds, the
        most recently served first, at most `max_reported`."""
        cached = self.held_keys()
        out: dict[bytes, int] = {}
        for chain, keys in reversed(self._served.values()):
            run = 0  # leading blocks still cached (the cache matches prefixes only)
            for k in keys:
                if k not in cached:
                    break
                run += 1
            if not run:
                continue
            covered = run / len(keys) * chain[-1][1]  # the share of the prompt's size covered
            for key, size in chain:
                if size <= covered and key not in out:
                    out[key] = size
                    if len(out) >= self.max_reported:
                        return out
        return out

    def beat_fields(self, full: bool) -> dict[str, Any]:
        """The fields to add to a `beat` frame: everything when `full` (a new channel), else
        the change since the last report; {} when nothing changed."""
        now = self.held()
        if full:
            self._sent = now
            return {"prefix_full": True, "prefix_add": [k.hex() for k in now]}
        add = [k.hex() for k in now if k not in self._sent]
        drop = [k.hex() for k in self._sent if k not in now]
        self._sent = now
        out: dict[str, Any] = {}
        if add:
            out["prefix_add"] = add
        if drop:
            out["prefix_drop"] = drop
        return out
