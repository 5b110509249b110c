"""Two pieces of CPU work at once, each on its own thread with half of torch's threads, results in order.

The engine's passes over a file (prune windows, conflict-scan batches) alternate kernels that keep every
core busy (the big Gram products) with ones that do not (batched r×r LAPACK calls, fp16↔fp32 copies,
the Python between kernels). With two pieces in flight the second core is used during the latter, and
single-threaded kernels skip OpenMP's synchronisation: on a 2-core CPU a prune pass runs ~1.4× faster.
torch's thread settings are per thread (OpenMP, MKL's local setting); the global count is put back.
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch


def worth_it(device, pieces: int) -> bool:
    """Whether `in_order` helps: CPU work, more than one piece, more than one core. (Also when torch was
    set to one thread on a busy machine: single-threaded workers never wait on each other.)"""
    return torch.device(device).type == "cpu" and pieces > 1 and (os.cpu_count() or 1) > 1


def in_order(items: Iterable, work: Callable, workers: int = 2) -> Iterator:
    """work(item) for every item, `workers` at a time on worker threads, yielded in the items' order.

    Close the generator (or exhaust it) to stop: pending items are cancelled, running ones finish."""
    threads = torch.get_num_threads()
    per = max(1, threads // workers)

    def run(item):
        torch.set_num_threads(per)
        return work(item)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lens-work")
    try:
        todo = iter(items)
        pending = deque(pool.submit(run, x) for x in itertools.islice(todo, workers))
        while pending:
            result = pending.popleft().result()
            for x in itertools.islice(todo, 1):
                pending.append(pool.submit(run, x))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def ordered(items: list, work: Callable, device, parallel: bool = True) -> Iterator:
    """work(item) for every item, in order: two at a time (`in_order`) where `worth_it`, else one by one on
    this thread. A generator either way: close it to stop early."""
    if parallel and worth_it(device, len(items)):
        return in_order(items, work)
    return (work(x) for x in items)
