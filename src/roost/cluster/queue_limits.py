"""x-max-length and x-max-length-bytes, exact across the nodes of a cluster.

A length-limited queue has a row in ``roost_queue_counts`` (and one in
``roost_transient_queue_counts``, unlogged like the table it counts): its
ready rows (``owner IS NULL``) and their body bytes. Every statement that
makes rows of a queue ready or not ready (inserts, claims, releases,
purges, the drop-head deletes) updates it in the same statement or
transaction; for a queue without limits there is no row and the update
finds nothing to change.

A writer batch publishing to a limited queue first locks its count rows
(``FOR UPDATE``), so the batches of every node are decided one after the
other against one exact count, then decides each publish in order
(:func:`decide`), as a single node's ``Queue.admit`` and ``_make_room``
would: ``reject-publish`` and ``reject-publish-dlx`` refuse what does not
fit (nacked; ``-dlx`` dead-letters it too), ``drop-head`` deletes rows
from the head (highest priority, oldest first; rows of this same batch
included) until it fits, and discards at once what could never fit. One
round trip more than a batch without limited rows; none for a batch
without.

The outcome of each publish goes back to its node: refused publishes are
nacked (:class:`~roost.broker.journal.PartlyRefused`), dead-lettered ones
republished there (at most once, as RabbitMQ's default dead-lettering).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from roost.broker.message import Message

# The count table of each message table.
COUNTS = {
    "roost_messages": "roost_queue_counts",
    "roost_transient_messages": "roost_transient_queue_counts",
}


def count_update(counts: str, source: str, sign: str, size: str = "octet_length(body)") -> str:
    """An UPDATE of the ``counts`` table (:data:`COUNTS`) by the rows of the CTE ``source``
    (with a ``queue_id`` column; ``size`` their body bytes) made ready
    (``sign`` ``+``) or not (``-``): a CTE body to add to the statement
    that changed them. Queues without a count row (no limits) are not
    touched, and no row is locked for them."""
    return (
        f"UPDATE {counts} k SET ready = k.ready {sign} x.n, bytes = k.bytes {sign} x.s"
        f" FROM (SELECT queue_id, count(*) AS n, sum({size}) AS s FROM {source}"
        " GROUP BY queue_id) x WHERE k.queue_id = x.queue_id"
    )


class Limit(NamedTuple):
    """A queue's length limits, as its arguments set them."""

    max_length: int | None
    max_bytes: int | None
    overflow: str  # drop-head | reject-publish | reject-publish-dlx
    # drop-head: the content of dropped rows comes back to dead-letter it.
    dead_letter: bool = False

    def over(self, count: int, size: int) -> bool:
        return (self.max_length is not None and count > self.max_length) or (
            self.max_bytes is not None and size > self.max_bytes
        )


class HeadRow(NamedTuple):
    """A ready row at the head of a queue, locked by the deciding batch;
    the content only when the queue dead-letters what it drops."""

    id: int
    transient: bool
    priority: int
    size: int
    exchange: str = ""
    routing_key: str = ""
    properties: bytes = b""
    body: bytes = b""


class Publish(NamedTuple):
    """One publish of the batch to a limited queue, in batch order."""

    position: int  # in the batch
    size: int
    priority: int


class Decision:
    """What :func:`decide` found for one queue's publishes of a batch."""

    __slots__ = ("accepted", "discarded", "dropped", "dropped_new", "refused", "shift")

    def __init__(self) -> None:
        self.accepted: list[int] = []  # batch indexes to insert
        self.refused: list[int] = []  # reject-publish(-dlx): nacked
        self.discarded: list[int] = []  # drop-head, could never fit
        self.dropped_new: list[int] = []  # drop-head, by later ones of the batch
        self.dropped: list[HeadRow] = []  # drop-head, rows already there
        # Change of (ready, bytes) per table (False: durable, True: transient).
        self.shift: dict[bool, list[int]] = {False: [0, 0], True: [0, 0]}


FetchHead = Callable[[int, Sequence[int]], Awaitable[list[HeadRow]]]


async def decide(
    limit: Limit,
    ready: int,
    size: int,
    publishes: Sequence[Publish],
    transient: Callable[[int], bool],
    fetch_head: FetchHead,
) -> Decision:
    """Decide ``publishes`` in order against ``ready`` rows of ``size``
    bytes. ``fetch_head(n, seen)`` locks and returns up to ``n`` more rows
    from the head (not in ``seen``), asked only when drop-head must drop
    rows that were there before the batch."""
    out = Decision()
    head: deque[HeadRow] = deque()
    seen: list[int] = []
    exhausted = False
    # Accepted publishes of this batch, in head order: they are behind
    # every row already there of the same priority.
    fresh: list[tuple[int, int, Publish]] = []
    drop_head = limit.overflow == "drop-head"
    pending = len(publishes)

    async def existing_head() -> HeadRow | None:
        nonlocal exhausted
        if not head and not exhausted:
            # Locked until the batch commits, and skipped by claims
            # meanwhile: no more than it may drop. With a count limit
            # alone, that is known; with bytes, a few at a time.
            if limit.max_bytes is None and limit.max_length is not None:
                over = ready + 1 + pending - limit.max_length
                want = max(1, min(ready - len(fresh), over))
            else:
                want = 16
            rows = await fetch_head(min(want, 10_000), seen)
            seen.extend(r.id for r in rows)
            head.extend(rows)
            exhausted = not rows
        return head[0] if head else None

    for p in publishes:
        pending -= 1
        if drop_head:
            if limit.max_length == 0 or (limit.max_bytes is not None and p.size > limit.max_bytes):
                out.discarded.append(p.position)
                continue
            while limit.over(ready + 1, size + p.size):
                old = await existing_head() if ready > len(fresh) else None
                if old is not None and (not fresh or (-old.priority, 0) <= (fresh[0][0], 1)):
                    head.popleft()
                    out.dropped.append(old)
                    shift = out.shift[old.transient]
                    shift[0] -= 1
                    shift[1] -= old.size
                    ready -= 1
                    size -= old.size
                elif fresh:
                    _, _, gone = heapq.heappop(fresh)
                    out.dropped_new.append(gone.position)
                    shift = out.shift[transient(gone.position)]
                    shift[0] -= 1
                    shift[1] -= gone.size
                    ready -= 1
                    size -= gone.size
                else:
                    # The rest of the head is being claimed (locked): it is
                    # about to leave the ready rows anyway.
                    break
            heapq.heappush(fresh, (-p.priority, p.position, p))
        elif limit.over(ready + 1, size + p.size):
            out.refused.append(p.position)
            continue
        out.accepted.append(p.position)
        shift = out.shift[transient(p.position)]
        shift[0] += 1
        shift[1] += p.size
        ready += 1
        size += p.size
    if out.dropped_new:
        gone_ = set(out.dropped_new)
        out.accepted = [i for i in out.accepted if i not in gone_]
    return out


class Counted(NamedTuple):
    """What a committed batch did to one limited queue, for its node."""

    queue_id: int
    refused: list[Message]  # the messages (MessageRow.message) refused
    dropped: list[Message]  # this batch's messages dropped (drop-head)
    dropped_rows: list[HeadRow]  # rows already there, dropped (drop-head)
    ready: int  # ready rows once the batch committed, cluster-wide
