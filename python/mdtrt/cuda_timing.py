"""Timing GPU work with CUDA events on several GPUs at once (torch's events; used by the attention
sample and the benchmarks)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["event_times_ms"]


def event_times_ms(torch: Any, gpus: Sequence[int], fn: Callable[[], Any], iterations: int,
                   warmup: int = 2) -> list[float]:
    """Milliseconds of each call of ``fn``, timed with CUDA events on every GPU's current stream.

    A start event is recorded on each GPU before the call and an end event after it; ``fn`` must
    leave its work ordered before the end event (on those streams, or waited for). A call counts
    as long as its slowest GPU.

    Parameters
    ----------
    torch : module
        The imported ``torch`` (passed in so that this module does not import it).
    gpus : sequence of int
        CUDA device indices to time on.
    fn : callable
        The work, called with no arguments ``warmup + iterations`` times.
    iterations : int
        Timed calls.
    warmup : int, optional
        Untimed calls before the timed ones (default 2).

    Returns
    -------
    list of float
        ``iterations`` times in milliseconds, in call order.
    """
    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(iterations):
        events = []
        for gpu in gpus:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(gpu))
            events.append((start, end, gpu))
        fn()
        for _, end, gpu in events:
            end.record(torch.cuda.current_stream(gpu))
        pairs.append(events)
    for gpu in gpus:
        torch.cuda.synchronize(gpu)
    return [max(start.elapsed_time(end) for start, end, _ in events) for events in pairs]
