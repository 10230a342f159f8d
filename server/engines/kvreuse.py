"""Which KV cells a new reply can reuse: the bookkeeping of the llamacpp engine's sequences (pure).

The llama.cpp context holds ``n_active + n_resident`` sequences, each in its own KV stream
(non-unified cache). Ids ``[0, n_active)`` are the active slots: a reply decodes in a free one
next to its version's other replies (``choose_slot``), so each version's replies in flight keep
consecutive ids and llama.cpp batches them in one micro-batch. Ids ``[n_active, n_active +
n_resident)`` are the resident pool. When a reply ends,
its cells stay where they are ("parked") and are recorded as an ``Entry``: the version that
wrote them and the tokens at positions ``0..n-1``. A new reply reuses the entry of its version
with the longest common token prefix (``plan``): in place when it is parked in the slot the
reply gets (the next turn of a conversation on a quiet server: no copy), else by a stream copy
(``Op("copy")``) and a trim (``Op("keep")``: drop the cells from that position on). A parked
entry whose slot is needed moves to the resident pool; the least recently used entry is dropped
when the pool is full. Only tokens are compared, never conversation ids, so a conversation
resumed on another server, regenerated, trimmed or edited reuses exactly the prefix that still
matches; entries are per version, so a hot-swapped adapter never reads cells another wrote.

Settling: a parked entry holds the reply's prompt only, because the reply's own cells were
decoded one token at a time, by kernels that round differently from a prefill's (reuse must give
the replies of full prefills, token for token). When the engine has nothing else to do, it
prefills the reply and its end of turn again as the next turn's prompt will render them, in
chunks, over those cells (``extend``): the next turn of the conversation then prefills only the
customer's new message. A reply that arrives first takes the entry as it is (``plan``); what a
settle had prefilled by then is reused.

The system prompt: after a reply is prefilled, ``share_prefix`` copies its first
``prefix_len`` cells (the rendered system turn) into the pool as a prefix entry, once per
version and system prompt; a new conversation then copies that instead of prefilling it.

The engine turns each ``Op`` into ``llama_memory_seq_cp`` (a whole-stream copy, done by
llama.cpp at the start of the next ``llama_decode``) or ``llama_memory_seq_rm``; ops run in
order, so a parked entry is copied out before its slot is overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def choose_slot(
    active: dict[int, str], n_active: int, version: str, preferred: list[int] | tuple[int, ...] = ()
) -> int:
    """The active slot (sequence id) a new reply of ``version`` decodes in; ``active``: the slots in
    use and their versions. llama.cpp decodes each version apart, and with a non-unified KV cache
    it puts only consecutive sequence ids in one micro-batch: a version whose replies hold ids 0, 2,
    4 and 6 costs four graph computations per step where 0-3 costs one. So a reply goes next to its
    version's run of slots when it has one, else as far as it can from every other version's (the
    first canary reply beside live replies in 0-3 takes the top slot, and its run grows down); on an
    idle engine any slot will do. Among equally good slots, one in ``preferred`` (where the reply's
    cached prefix is parked: reused in place, no copy), else the lowest. Needs a free slot."""
    free = [s for s in range(n_active) if s not in active]
    mine = [s for s, v in active.items() if v == version]
    others = [s for s, v in active.items() if v != version]

    def cost(slot: int) -> int:
        if mine:
            return min(abs(slot - m) for m in mine)  # 1: adjacent to the run
        if others:
            return -min(abs(slot - o) for o in others)  # the farther from the others, the better
        return 0

    best = min(cost(s) for s in free)
    good = [s for s in free if cost(s) == best]
    return next((s for s in good if s in preferred), good[0])


def lane_for(single_active: int, batch_active: int, waiting: int, single_streams: int) -> str:
    """The lane a new reply starts in (the engine's two formats, see ``llamacpp.py``): "single"
    when the batch lane decodes nothing and this reply, the single lane's and every other reply
    admitted but not decoding yet (``waiting``: queued, or still being tokenized) number at most
    ``single_streams`` (0: no single lane); else "batch". When more arrive, the single lane's
    replies move to the batch lane (the engine's ``_migrate``), so one decode per round serves
    them all; a reply never starts beside the batch lane's, which would make that two."""
    if batch_active or not 0 < single_active + waiting + 1 <= single_streams:
        return "batch"
    return "single"


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class Op:
    kind: str  # "copy": stream ``src`` into ``dst``; "keep": drop ``dst``'s cells at positions >= ``n``
    dst: int
    src: int = -1
    n: int = 0


@dataclass
class Entry:
    version: str
    tokens: list[int]  # the token at each position whose KV the sequence holds
    used: int = 0  # tick of the last use (LRU)
    prefix: bool = False  # a shared system-prompt prefix


@dataclass
class Plan:
    seq: int  # the slot the reply decodes in
    reuse: int  # positions already in its cells: prefill starts here
    ops: list[Op] = field(default_factory=list)


class KvBook:
    """The engine's record of what each sequence's KV cells hold (see the module docstring).

    ``min_reuse``: a copy is made only for a prefix at least this long (a copy moves a whole
    stream; a few tokens are cheaper to prefill). ``n_resident = 0`` with ``enabled=False``
    turns reuse off: every reply prefills its whole prompt (the reference path).
    """

    def __init__(self, n_active: int, n_resident: int, *, min_reuse: int = 16, enabled: bool = True) -> None:
        self.n_active = n_active
        self.n_resident = n_resident
        self.min_reuse = min_reuse
        self.enabled = enabled
        self.entries: dict[int, Entry] = {}  # seq id -> what its cells hold (parked or resident; never active)
        self.active: dict[int, str] = {}  # slot -> the version decoding in it
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to reuse
        self.prompt_tokens = 0  # prompt tokens of every planned reply
        self.copies = 0  # stream copies ordered
        self.settled_tokens = 0  # reply tokens prefilled again between replies (``extend``)
        self.choose_slot = choose_slot  # the slot rule (bench/canary.py swaps in the old one to compare)
        self._tick = 0

    def _touch(self, entry: Entry) -> None:
        self._tick += 1
        entry.used = self._tick

    def plan(self, version: str, prompt: list[int]) -> Plan:
        """The slot a new reply decodes in, how many of its prompt tokens are already there, and
        the ops that put them there. ``prompt`` is what the reply's cells will hold before it
        decodes. At least its last two tokens are prefilled again: one token alone would go
        through llama.cpp's vector kernels, whose rounding differs from a prefill's."""
        matches: dict[int, int] = {}
        if self.enabled:
            for s, e in self.entries.items():
                m = min(common_prefix(e.tokens, prompt), len(prompt) - 2) if e.version == version else 0
                if m > 0:
                    matches[s] = m
        match = max(matches.values(), default=0)
        tied = [s for s, m in matches.items() if m == match]
        seq = self.choose_slot(self.active, self.n_active, version, tied)  # in place wins a tie: no copy
        self.active[seq] = version
        self.prompt_tokens += len(prompt)
        best = seq if seq in tied else (tied[0] if tied else -1)
        ops: list[Op] = []
        if best == seq and match > 0:
            del self.entries[seq]
            ops.append(Op("keep", seq, n=match))
            self.reused_tokens += match
            return Plan(seq, match, ops)
        parked = self.entries.pop(seq, None)
        if parked is not None:
            ops += self._store(parked, seq, keep_from=best)
        if best >= 0 and match >= self.min_reuse:
            self._touch(self.entries[best])
            ops += [Op("copy", seq, src=best), Op("keep", seq, n=match)]
            self.copies += 1
            self.reused_tokens += match
            return Plan(seq, match, ops)
        ops.append(Op("keep", seq, n=0))
        return Plan(seq, 0, ops)

    def _store(self, entry: Entry, src: int, keep_from: int = -1) -> list[Op]:
        """Copy ``entry`` (now in ``src``) into the resident pool, evicting the least recently used
        entry there (never ``keep_from``) if the pool is full; nothing when ``entry`` is the oldest."""
        pool = range(self.n_active, self.n_active + self.n_resident)
        free = [s for s in pool if s not in self.entries]
        if free:
            dst = free[0]
        else:
            held = [s for s in pool if s != keep_from]
            if not held:
                return []
            dst = min(held, key=lambda s: self.entries[s].used)
            if self.entries[dst].used > entry.used:
                return []  # every resident is newer: drop this one instead
        self.entries[dst] = entry
        self.copies += 1
        return [Op("copy", dst, src=src)]

    def share_prefix(self, version: str, tokens: list[int], seq: int) -> list[Op]:
        """After ``seq`` was prefilled with ``tokens`` (a system turn, rendered, at its start): keep
        them as the version's prefix entry unless one holds them already."""
        if not self.enabled or len(tokens) < self.min_reuse:
            return []
        for e in self.entries.values():
            if e.prefix and e.version == version and e.tokens == tokens:
                self._touch(e)
                return []
        entry = Entry(version, list(tokens), prefix=True)
        self._touch(entry)
        ops = self._store(entry, seq)
        return [*ops, Op("keep", ops[0].dst, n=len(tokens))] if ops else []

    def release(self, seq: int, version: str, tokens: list[int] | None) -> list[Op]:
        """A reply in ``seq`` ended; ``tokens``: what its cells hold (None: unknown, after an error).
        Its cells stay parked there; entries of the version that they extend are dropped (stale
        copies of the same conversation), the prefix entries excepted."""
        self.active.pop(seq, None)
        if not self.enabled or not tokens:
            return [Op("keep", seq, n=0)]
        ops = []
        for s, e in list(self.entries.items()):
            if e.version == version and not e.prefix and common_prefix(e.tokens, tokens) == len(e.tokens):
                del self.entries[s]
                ops.append(Op("keep", s, n=0))
        entry = Entry(version, list(tokens))
        self._touch(entry)
        self.entries[seq] = entry
        return ops

    def seq_of(self, entry: Entry) -> int | None:
        """Where ``entry`` is now (parked, or moved to the pool), or None once it was taken or dropped."""
        for s, e in self.entries.items():
            if e is entry:
                return s
        return None

    def extend(self, seq: int, tokens: list[int]) -> None:
        """``seq``'s cells now hold ``tokens`` right after its entry's: a settle prefilled them."""
        entry = self.entries[seq]
        entry.tokens = [*entry.tokens, *tokens]
        self.settled_tokens += len(tokens)

    def drop(self, seq: int) -> list[Op]:
        """Forget the entry in ``seq`` (what its cells hold is not known any more)."""
        self.entries.pop(seq, None)
        return [Op("keep", seq, n=0)]

    def drop_version(self, version: str) -> list[Op]:
        """Forget every entry of ``version`` (its adapter was unloaded)."""
        gone = [s for s, e in self.entries.items() if e.version == version]
        for s in gone:
            del self.entries[s]
        return [Op("keep", s, n=0) for s in gone]
