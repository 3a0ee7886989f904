"""The request-size policy and the prefetch budget, without a server."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from zohofs.buffers import BufferPool
from zohofs.cache import ChunkCache
from zohofs.planner import CHUNK, FIRST_WINDOW, MiB, PrefetchBudget, ReadPattern, chunk_range

SIZE = 1 << 30


def pattern(budget: PrefetchBudget | None = None, size: int = SIZE) -> ReadPattern:
    return ReadPattern(budget or PrefetchBudget(128 * MiB), size, max_ahead=32 * MiB,
                       max_request=8 * MiB)


def copy(p: ReadPattern, start: int, end: int, step: int) -> list[tuple[int, int]]:
    """Read ``[start, end)`` front to back; every request made ahead, in order."""
    made = []
    for offset in range(start, end, step):
        for plan in p.advise(offset, min(step, end - offset)):
            p.issued(*plan)
            made.append(plan)
    return made


def test_random_reads_fetch_nothing_ahead() -> None:
    p = pattern()
    for offset in (700 * MiB + 5, 3 * MiB, 900 * MiB, 12345):
        assert p.advise(offset, 128 * 1024) == []
    assert not p.sequential


def test_a_copy_starts_small_and_ramps_up_to_large_parallel_requests() -> None:
    p = pattern()
    made = copy(p, 0, 256 * MiB, 128 * 1024)
    sizes = [length for _, length in made]
    assert sizes[0] <= FIRST_WINDOW // 2  # a small first request
    assert sizes == sorted(sizes)  # growing while the run lasts
    assert sizes[-1] == 8 * MiB  # up to the largest request
    assert sizes.count(8 * MiB) >= 20
    # The window is four requests wide at full speed: several in flight at once.
    assert p.window == 32 * MiB
    # Every byte after the first read is asked for exactly once, in order.
    assert made[0][0] == CHUNK
    for (start, length), (following, _) in itertools.pairwise(made):
        assert start % CHUNK == 0 and start + length == following


def test_prefetch_never_runs_far_past_a_short_sequential_read() -> None:
    # unzip extracting a 1 MiB member: a jump to it, then small sequential reads.
    p = pattern()
    member = 500 * MiB + 1234
    assert copy(p, member, member + MiB, 16 * 1024) == []  # not proven sequential yet
    # A longer run is fetched ahead of, at most twice as far again as it went.
    p = pattern()
    made = copy(p, member, member + 3 * MiB, 16 * 1024)
    assert made and made[-1][0] + made[-1][1] - (member + 3 * MiB) <= 6 * MiB + CHUNK


def test_a_buffered_read_after_a_seek_is_no_sequential_run() -> None:
    # Python's open() reads st_blksize (1 MiB) after a seek; FUSE may deliver it as
    # several consecutive requests.
    p = pattern()
    for offset in (300 * MiB + 77, 12 * MiB + 5, 900 * MiB):
        assert p.advise(offset, 512 * 1024) == [] and p.advise(offset + 512 * 1024,
                                                                 512 * 1024) == []


def test_random_reads_a_few_mib_apart_prove_no_run() -> None:
    # Two random buffered reads (1 MiB each) that happen to land 10 MiB apart: a jump,
    # not a run of 2 MiB to fetch ahead of.
    p = pattern()
    assert p.advise(300 * MiB, MiB) == []
    assert p.advise(311 * MiB, MiB) == []
    assert p.advise(311 * MiB + 100, MiB) == []  # mostly a re-read: the run is 1 MiB
    assert p.advise(301 * MiB, MiB) == []  # right after an earlier one, not the last
    assert not p.sequential
    assert p.advise(302 * MiB, MiB) != []  # this one follows: a run of 2 MiB, proven


def test_a_jump_ends_the_run_and_the_next_run_starts_small_again() -> None:
    p = pattern()
    copy(p, 0, 64 * MiB, 128 * 1024)
    assert p.window == 32 * MiB
    assert p.advise(800 * MiB, 128 * 1024) == []  # the jump itself fetches nothing ahead
    assert not p.sequential
    made = copy(p, 800 * MiB + 128 * 1024, 803 * MiB, 128 * 1024)
    assert p.window == 6 * MiB and made[0][1] <= MiB  # not the old run's 32 MiB


def test_reads_slightly_out_of_order_stay_sequential() -> None:
    p = pattern()
    copy(p, 0, 8 * MiB, 128 * 1024)
    p.advise(8 * MiB + 256 * 1024, 128 * 1024)  # the kernel sent a later read first
    p.advise(8 * MiB, 128 * 1024)
    assert p.sequential


def test_a_proven_run_forgives_the_page_cache_readahead_order() -> None:
    # Through the page cache the kernel's readahead requests reach FUSE MiBs apart and
    # out of order; a run that is proven keeps its window through them.
    p = pattern()
    copy(p, 0, 32 * MiB, MiB)
    for offset in (44 * MiB, 36 * MiB, 33 * MiB, 45 * MiB, 32 * MiB, 50 * MiB):
        p.advise(offset, MiB)
        assert p.window == 32 * MiB, offset
    p.advise(200 * MiB, MiB)  # a real jump still ends it
    assert not p.sequential


def test_readers_share_the_budget_equally() -> None:
    budget = PrefetchBudget(64 * MiB)
    readers = [pattern(budget) for _ in range(16)]
    made = []
    for offset in range(0, 64 * MiB, MiB):  # sixteen copies side by side
        for r in readers:
            made += copy(r, offset, offset + MiB, 128 * 1024)
    assert all(r.window == 4 * MiB for r in readers)
    # The connections are shared by many readers: each makes whole-window requests.
    assert made[-1][1] == 4 * MiB
    # One leaves: the others may grow into its share.
    readers[0].stop()
    copy(readers[1], 64 * MiB, 80 * MiB, 128 * 1024)
    assert readers[1].window == 64 * MiB // 15


def test_the_budget_refuses_what_it_does_not_have() -> None:
    budget = PrefetchBudget(10 * MiB)
    assert budget.take(8 * MiB) and not budget.take(4 * MiB)
    budget.give(8 * MiB)
    assert budget.take(10 * MiB) and budget.used == 10 * MiB


def test_the_end_of_the_file_is_fetched_in_one_last_short_request() -> None:
    size = 3 * MiB + 1000
    p = pattern(size=size)
    made = copy(p, 0, size, 128 * 1024)
    assert made[-1][0] + made[-1][1] == size
    assert sum(length for _, length in made) == size - CHUNK


@given(reads=st.lists(st.tuples(st.integers(0, 64 * MiB), st.integers(1, 2 * MiB)),
                      max_size=60),
       size=st.integers(1, 64 * MiB))
def test_requests_are_aligned_inside_the_file_and_never_repeat_in_a_run(
        reads: list[tuple[int, int]], size: int) -> None:
    budget = PrefetchBudget(16 * MiB)
    p = ReadPattern(budget, size, max_ahead=8 * MiB, max_request=2 * MiB)
    asked: set[int] = set()
    for offset, length in reads:
        if offset >= size:
            continue
        length = min(length, size - offset)
        was = p.sequential
        plans = p.advise(offset, length)
        if not (was and p.sequential):
            asked.clear()  # a new run may ask again for what an old one did
        for start, n in plans:
            assert start % CHUNK == 0 and 0 < n <= 2 * MiB and start + n <= size
            chunks = set(chunk_range(start, start + n))
            assert not chunks & asked
            asked |= chunks
            p.issued(start, n)
        assert p.window <= 8 * MiB
    p.stop()
    assert not p.sequential


def test_held_chunks_outlive_lru_pressure_and_share_the_capacity() -> None:
    cache = ChunkCache(4 * CHUNK)
    view = memoryview(bytes(CHUNK))
    cache.begin(["ahead"])
    cache.arrive("ahead", view, hold=True)
    for i in range(10):  # other readers' chunks stream through the LRU
        cache.put(i, view)
    assert cache.peek("ahead") is view  # never evicted while held
    assert [i for i in range(10) if cache.peek(i) is not None] == [7, 8, 9]  # 3 + 1 held
    cache.release("ahead")  # read at last: now it is the most recently used, evictable
    cache.put(10, view)
    assert cache.peek("ahead") is view and cache.peek(7) is None and cache.held_bytes == 0


def test_a_buffer_is_used_again_only_when_nothing_refers_to_it() -> None:
    pool = BufferPool(CHUNK, limit=4)
    cache = ChunkCache(2 * CHUNK, on_evict=pool.give)
    first = pool.take()
    still_read = memoryview(first).toreadonly()[:10]  # on its way to the kernel, say
    cache.put("a", memoryview(first).toreadonly())
    del first
    second = pool.take()
    second_id = id(second)
    cache.put("b", memoryview(second).toreadonly())
    del second
    cache.put("c", memoryview(pool.take()).toreadonly())  # evicts "a" into the pool
    assert cache.peek("a") is None
    fresh = pool.take()
    assert fresh is not still_read.obj  # a view of it is alive: not handed out again
    cache.put("d", memoryview(fresh).toreadonly())  # evicts "b": nothing refers to it
    assert id(pool.take()) == second_id


def test_nothing_is_fetched_ahead_past_a_limit() -> None:
    pattern = ReadPattern(PrefetchBudget(256 * MiB), 1 << 30, max_ahead=32 * MiB,
                          max_request=8 * MiB)
    pattern.limit(5 * MiB + 100)  # a member ending there, in a 1 GiB archive
    plans = [p for offset in range(0, 5 * MiB, 256 * 1024)
             for p in pattern.advise(offset, 256 * 1024)]
    assert plans and max(start + length for start, length in plans) == 5 * MiB + 100
