"""Fixed KV slots: row i of a batched cache belongs to at most one conversation at a time.

A conversation keeps its slot between turns, so its next turn prefills only what is new (as
an engine without batching does with a session's own cache). A turn that needs a slot takes,
in this order: the slot its conversation already holds; a slot nobody holds (its holder
closed); the slot idle for longest, whose holder then loses its cached history and re-reads it
(a full prefill) on its next turn. When every slot is in a turn, the new turn waits.
Lower slots are preferred, so the active rows stay packed at the front of the batch.
"""

import itertools
import weakref


class SlotTable:
    def __init__(self, count: int):
        self.holders: list[weakref.ref | None] = [None] * count
        self.busy = [False] * count  # in a turn now
        self.last_used = [0] * count
        self.clock = itertools.count(1)

    def __len__(self) -> int:
        return len(self.holders)

    def holder(self, slot: int):
        ref = self.holders[slot]
        return None if ref is None else ref()

    def held_by(self, owner) -> int | None:
        return next((i for i in range(len(self)) if self.holder(i) is owner), None)

    def take(self, owner) -> tuple[int, bool] | None:
        """(slot, whether its cache is still `owner`'s) for a new turn of `owner`; None when all
        slots are in turns. The slot is busy until `release`."""
        slot = self.held_by(owner)
        kept = slot is not None and not self.busy[slot]
        if not kept:
            idle = [i for i in range(len(self)) if not self.busy[i]]
            if not idle:
                return None
            unheld = [i for i in idle if self.holder(i) is None]
            slot = unheld[0] if unheld else min(idle, key=lambda i: self.last_used[i])
        self.holders[slot], self.busy[slot] = weakref.ref(owner), True
        return slot, kept

    def release(self, slot: int):
        self.busy[slot] = False
        self.last_used[slot] = next(self.clock)

    def forget(self, owner) -> int | None:
        """`owner` gives its slot up (its conversation was reset); returns the slot, if it held one."""
        slot = self.held_by(owner)
        if slot is not None:
            self.holders[slot] = None
        return slot

    def width(self) -> int:
        """Rows a batched step must cover: up to the last busy slot."""
        return max((i + 1 for i in range(len(self)) if self.busy[i]), default=0)
