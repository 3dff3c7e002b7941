"""queue_limits.decide: a batch's publishes to a length-limited queue,
decided in order as a single node's Queue.admit and _make_room decide
them, against the rows already there."""

from __future__ import annotations

from collections.abc import Sequence

from roost.cluster.queue_limits import Decision, HeadRow, Limit, Publish, decide


class Head:
    """The rows already in the queue, in delivery order, as the writer's
    head query returns them (locked ones left out)."""

    def __init__(self, rows: list[HeadRow]) -> None:
        self.rows = rows
        self.asked = 0

    async def __call__(self, n: int, seen: Sequence[int]) -> list[HeadRow]:
        self.asked += 1
        return [r for r in self.rows if r.id not in seen][:n]


def _publishes(*sizes: int, priority: int = 0) -> list[Publish]:
    return [Publish(i, size, priority) for i, size in enumerate(sizes)]


async def _decide(
    limit: Limit, head: list[HeadRow], publishes: list[Publish]
) -> tuple[Decision, Head]:
    fetch = Head(head)
    ready = len(head)
    size = sum(r.size for r in head)
    return await decide(limit, ready, size, publishes, lambda i: False, fetch), fetch


async def test_reject_publish_takes_what_fits_in_order() -> None:
    d, head = await _decide(
        Limit(3, None, "reject-publish"), [HeadRow(1, False, 0, 10)], _publishes(1, 1, 1, 1)
    )
    assert d.accepted == [0, 1] and d.refused == [2, 3]
    assert d.shift[False] == [2, 2]
    assert head.asked == 0  # never reads the head


async def test_reject_publish_by_bytes_lets_a_smaller_one_in_after_a_refusal() -> None:
    d, _ = await _decide(Limit(None, 100, "reject-publish-dlx"), [], _publishes(60, 50, 40))
    assert d.accepted == [0, 2] and d.refused == [1]


async def test_drop_head_drops_the_oldest_rows_then_the_batchs_own() -> None:
    rows = [HeadRow(i, False, 0, 1) for i in (10, 11)]
    d, _ = await _decide(Limit(2, None, "drop-head"), rows, _publishes(1, 1, 1))
    assert [r.id for r in d.dropped] == [10, 11]
    assert d.dropped_new == [0]
    assert d.accepted == [1, 2]
    assert d.shift[False] == [3 - 2 - 1, 3 - 2 - 1]


async def test_drop_head_with_bytes_drops_until_it_fits() -> None:
    rows = [HeadRow(1, False, 0, 40), HeadRow(2, True, 0, 40), HeadRow(3, False, 0, 40)]
    d, _ = await _decide(Limit(None, 130, "drop-head"), rows, _publishes(70))
    assert [r.id for r in d.dropped] == [1, 2]
    assert d.accepted == [0]
    assert d.shift == {False: [1 - 1, 70 - 40], True: [-1, -40]}


async def test_drop_head_discards_what_could_never_fit() -> None:
    d, _ = await _decide(Limit(10, 100, "drop-head"), [], _publishes(101, 5))
    assert d.discarded == [0] and d.accepted == [1]
    d, _ = await _decide(Limit(0, None, "drop-head"), [], _publishes(1))
    assert d.discarded == [0] and not d.accepted


async def test_drop_head_takes_the_highest_priority_first() -> None:
    # The head is the next to deliver: a high-priority publish of the batch
    # goes before the low-priority rows already there.
    rows = [HeadRow(1, False, 0, 1)]
    publishes = [Publish(0, 1, 5), Publish(1, 1, 0)]
    d, _ = await _decide(Limit(1, None, "drop-head"), rows, publishes)
    # 0 arrives: the full queue drops its head, row 1. 1 arrives: the head
    # is now 0 (priority 5), dropped.
    assert [r.id for r in d.dropped] == [1]
    assert d.dropped_new == [0]
    assert d.accepted == [1]


async def test_drop_head_stops_at_rows_being_claimed() -> None:
    # Two rows counted ready, both locked by claims in flight: nothing to
    # drop now, and they are leaving the ready rows anyway.
    d, _ = await _decide_with(Limit(2, None, "drop-head"), 2, [], _publishes(1))
    assert d.accepted == [0] and not d.dropped


async def _decide_with(
    limit: Limit, ready: int, head: list[HeadRow], publishes: list[Publish]
) -> tuple[Decision, Head]:
    fetch = Head(head)
    return await decide(limit, ready, ready, publishes, lambda i: False, fetch), fetch
