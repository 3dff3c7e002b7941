"""PagedEntries against a plain deque: append, popleft and prepend (the
memory alarm pages a queue's in-memory tail out in front of its paged
entries) in any order, across chunk boundaries."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.broker import paging
from roost.broker.paging import PagedEntries

Op = tuple[str, int]
ops = st.lists(
    st.tuples(st.sampled_from(["append", "popleft", "prepend"]), st.integers(0, 3 * 64)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_matches_a_deque(script: list[Op]) -> None:
    saved = paging.CHUNK
    paging.CHUNK = 64  # small chunks, so a few hundred entries cross boundaries
    try:
        run(script)
    finally:
        paging.CHUNK = saved


def run(script: list[Op]) -> None:
    entries = PagedEntries()
    model: deque[tuple[int, int, int]] = deque()
    counter = 0

    def fresh(n: int) -> list[tuple[int, int, int]]:
        nonlocal counter
        out = [(counter + i, 2 * (counter + i), -(counter + i)) for i in range(n)]
        counter += n
        return out

    for op, n in script:
        if op == "append":
            for item in fresh(n % 70):
                entries.append(*item)
                model.append(item)
        elif op == "popleft":
            for _ in range(min(n, len(model))):
                assert entries.popleft() == model.popleft()
        else:
            items = fresh(n)
            entries.prepend(items)
            model.extendleft(reversed(items))
        assert len(entries) == len(model)
        assert list(entries) == [(w, r) for w, r, _ in model]
        if model:
            assert entries.first_seq() == model[0][0] & paging.SEQ_MASK
    while model:
        assert entries.popleft() == model.popleft()
    assert len(entries) == 0
