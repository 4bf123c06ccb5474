"""Paced operator actions: chunks of about one second's worth, cancellable between chunks."""

from adapters.pacing import at_rate


async def test_a_rate_splits_the_ids_into_one_second_chunks_in_order():
    chunks: list[list[str]] = []

    async def step(chunk: list[str]) -> int:
        chunks.append(chunk)
        return len(chunk) - 1  # one of each chunk was not done (already replayed elsewhere)

    ids = [str(i) for i in range(2500)]
    done, finished = await at_rate(ids, 1000, step)
    assert [len(c) for c in chunks] == [1000, 1000, 500] and sum(chunks, []) == ids
    assert (done, finished) == (2497, True)


async def test_without_a_rate_everything_goes_in_one_step():
    seen = []

    async def step(chunk):
        seen.append(chunk)
        return len(chunk)

    assert await at_rate(["a", "b", "c"], None, step) == (3, True) and seen == [["a", "b", "c"]]


async def test_cancelling_stops_before_the_next_chunk_and_progress_is_reported():
    progress: list[int] = []
    cancel = False

    async def step(chunk):
        nonlocal cancel
        cancel = True  # the operator cancels while the first chunk runs
        return len(chunk)

    done, finished = await at_rate([str(i) for i in range(30)], 10, step, lambda: cancel, progress.append)
    assert (done, finished, progress) == (10, False, [10])
