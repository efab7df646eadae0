"""Measuring: wall and CPU clocks, peak live tensor memory (CUDA allocator; CPU allocation trace), peak RSS."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_window_start() -> int | None:
    """Reset the process's peak-RSS mark (Linux ``clear_refs``) and return the current RSS, else None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


class MemoryMeter:
    """Peak live tensor bytes allocated after :meth:`start`, above what was live then.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation/free trace of ``torch.profiler``
    (``profile_memory=True``) — only between :meth:`start` and :meth:`stop`, so the profiler's overhead stays
    out of the timed steps. Also the growth of the process's peak RSS (meaningful in a fresh process).
    """

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.device = device
        self._prof = None
        self.peak: int | None = None
        self.rss_start: int | None = None

    def start(self) -> None:
        import torch

        self.rss_start = _rss_window_start()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

    def stop(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return self.peak
        self._prof.__exit__(None, None, None)
        self.peak = peak_from_trace(self._prof)
        self._prof = None
        return self.peak

    def rss_growth(self) -> int | None:
        """Peak RSS since :meth:`start` minus the RSS then (Linux; None elsewhere)."""
        hwm = _proc_status_bytes("VmHWM")
        return None if hwm is None or self.rss_start is None else hwm - self.rss_start


def peak_from_trace(prof) -> int:
    """Peak of the running sum of CPU allocation sizes (frees are negative) in a ``torch.profiler`` trace."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation and str(ev.extra_fields.device).startswith("cpu"):
            events.append((ev.start_time_ns, int(ev.extra_fields.alloc_size)))
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


def clock_name(device: str) -> str:
    return "wall" if str(device).startswith("cuda") else "cpu"


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds ``fn()`` takes on the clock of the term timings: this process's CPU time on CPU (robust to other
    processes on the cores), synchronised wall time on CUDA."""
    clock = time.perf_counter if clock_name(device) == "wall" else time.process_time
    sync(device)
    t0 = clock()
    out = fn()
    sync(device)
    return clock() - t0, out


# ---------------------------------------------------------------------------------------------- the variants


def time_steps(
    step: Callable[[], None], meter: MemoryMeter, warmup: int, steps: int, device: str, say
) -> dict:
    """Run ``warmup`` + ``steps`` calls of ``step``; the first ends ``meter``'s window (the memory figure).

    Returns the medians and all values of the timed steps' wall time (``step_s``) and this process's CPU time
    (``step_cpu_s``), the peak memory and the RSS growth.
    """
    times: list[float] = []
    cpu_times: list[float] = []
    for i in range(warmup + steps):
        sync(device)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        dt, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if i == 0:
            peak = meter.stop()
            say(f"warm-up step 1 (memory traced) {dt:.2f} s, peak {peak / 2**20:.0f} MiB")
        elif i < warmup:
            say(f"warm-up step {i + 1} {dt:.2f} s")
        else:
            times.append(dt)
            cpu_times.append(cpu)
            say(f"step {len(times)}/{steps} {dt:.2f} s (CPU {cpu:.2f} s)")
    return {
        "step_s": statistics.median(times),
        "step_s_all": times,
        "step_cpu_s": statistics.median(cpu_times),
        "step_cpu_s_all": cpu_times,
        "clock": clock_name(device),
        "peak_mem_bytes": meter.peak,
        "rss_growth_bytes": meter.rss_growth(),
    }
