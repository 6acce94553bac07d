"""Timing and peak memory of one case, each in a fresh process forked from a preloaded server.

Time. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median). CPU:
``time.perf_counter`` around single calls after warm-up, median; the CPU time of the same calls
(``time.process_time``) is recorded too and drives the numbers with ``--timer cpu`` (on a
shared machine the wall time includes other processes' time slices; rows whose wall time is
1.5x their CPU time are flagged ``contended``).

Peak memory: what the call adds on top of its inputs. GPU: ``max_memory_allocated`` after
``reset_peak_memory_stats`` minus ``memory_allocated`` before. CPU: in a fresh process in which
glibc serves every allocation over 64 KiB with mmap and gives it back on free (``mallopt``, set
before the first allocation), the growth of the peak RSS over the RSS before one call, after
the peak mark was reset (:mod:`fastrlhf._memory`). The timed calls come after that, with
glibc's steady-state thresholds restored, so they do not pay a page fault per fresh block.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
import traceback
from collections.abc import Sequence
from typing import Any, Optional

import torch

from .._memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from .cases import build_case
from .registry import DTYPES, Shape, Skip

# CPU, one thread: a median wall time this much above the median CPU time of the same calls
# means other processes held the core during the measurement (flagged in the table).
CONTENDED = 1.5

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def _malloc_returns_memory() -> bool:
    """Make RSS track live memory: allocations over 64 KiB use mmap and are unmapped on free.

    Setting M_MMAP_THRESHOLD explicitly also turns off glibc's dynamic threshold, which would
    otherwise keep freed blocks of up to 32 MiB resident in the heap and hide their reuse from
    VmHWM. Must be set before the process allocates: chunks already in the heap's free lists
    would be reused (and kept) whatever the threshold says afterwards.
    """
    return _mallopt(64 * 1024, 128 * 1024)


def _malloc_steady_state() -> bool:
    """glibc's default behaviour after warm-up: the dynamic mmap threshold at its 32 MiB cap
    (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit) and the trim threshold at twice that, so blocks
    below 32 MiB are recycled from the heap instead of page-faulted afresh on every call."""
    return _mallopt(32 * 2**20, 64 * 2**20)


def _is_device_limitation(e: Exception) -> bool:
    msg = str(e).lower()
    return isinstance(e, (ValueError, RuntimeError, NotImplementedError, AssertionError)) and any(
        w in msg for w in ("cuda", "gpu", "xpu", "device", "triton")
    )


def measure(task: dict[str, Any]) -> dict[str, Any]:
    """Build the case, warm it up, measure its peak memory once, then time it. Returns a result dict."""
    op, impl = task["op"], task["impl"]
    shape = Shape(**task["shape"])
    dtype = DTYPES[task["dtype"]]
    device = torch.device(task["device"])
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(task["threads"])
    case = build_case(op, impl, shape, device, dtype)

    # Warm-up: first call checked and kept for the output check; compilation happens here.
    try:
        first = case.fn()
    except Exception as e:
        if _is_device_limitation(e):
            raise Skip(f"{impl} does not run on {device.type}: {type(e).__name__}: {str(e)[:160]}") from e
        raise
    check = float(first.double().sum()) if isinstance(first, torch.Tensor) else None
    del first
    for _ in range(task["warmup"] - 1):
        case.fn()
    gc.collect()

    res: dict[str, Any] = {"check_value": check, "note": case.note}
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        case.fn()
        torch.cuda.synchronize()
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        from triton.testing import do_bench

        ms = do_bench(case.fn, warmup=25, rep=task["rep_ms"], return_mode="median")
        res.update(time_ms=float(ms), wall_ms=float(ms), reps=None)
    else:
        res["peak_mem_bytes"] = None  # only meaningful in a fresh process with RSS tracking live memory
        if task.get("isolated"):
            if not task.get("malloc_mmap"):
                res["note"] = (res["note"] + " (mallopt unavailable: peak RSS may under-count)").strip()
            base = rss_bytes()
            if base is not None and reset_peak_rss():
                case.fn()
                res["peak_mem_bytes"] = max(0, peak_rss_bytes() - base)
            # Time with the allocator as it behaves in a long-running process (see above):
            # with every large block mmap-ed, each call would also pay its page faults.
            _malloc_steady_state()
        walls: list[float] = []
        cpus: list[float] = []
        total = 0.0
        while len(walls) < task["max_reps"] and (len(walls) < task["min_reps"] or total < task["min_time_s"]):
            c0, t0 = time.process_time(), time.perf_counter()
            case.fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            walls.append(dt)
            cpus.append(dc)
            total += dt
        wall_ms, cpu_ms = 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)
        res.update(wall_ms=wall_ms, cpu_ms=cpu_ms, time_ms_min=1e3 * min(walls), reps=len(walls),
                   time_ms=cpu_ms if task.get("timer") == "cpu" else wall_ms)
        if task["threads"] == 1 and wall_ms > CONTENDED * cpu_ms:
            # Another process held the core: the wall time includes its time slices.
            res["note"] = (res["note"] + f" contended: wall {wall_ms / cpu_ms:.1f}x CPU time").strip()
    return res


def measure_result(task: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` with its outcome as a status: ``ok``, ``skipped`` (and why) or ``error``."""
    try:
        res = measure(task)
        res["status"] = "ok"
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # a failure is a result too (OOM, kernel error): report, don't crash the run
        tb = traceback.format_exc(limit=3)
        res = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:300]}", "traceback": tb}
    return res


def _child(conn, task: dict[str, Any]) -> None:
    """Entry point of a fresh measurement process: sends back one result dict."""
    if task.get("isolated") and task["device"] == "cpu":
        task["malloc_mmap"] = _malloc_returns_memory()  # before the first allocation of the case
    try:
        conn.send(measure_result(task))
    finally:
        conn.close()


def _stream_child(conn, threads: int, device: str, timer: str = "wall") -> None:
    """STREAM-like copy bandwidth (bytes read + written per second) with the benchmark's threads.

    ``timer="cpu"`` times the copies with this process's CPU time, like the measurements.
    """
    try:
        if device == "cpu":
            torch.set_num_threads(threads)
        n = (256 if device == "cpu" else 1024) * 2**20 // 4  # 256 MiB (CPU) / 1 GiB (GPU) of fp32
        a = torch.ones(n, device=device)
        b = torch.empty_like(a)
        clock = time.process_time if (timer == "cpu" and device == "cpu") else time.perf_counter
        times = []
        for _ in range(10):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            b.copy_(a)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(clock() - t0)
        conn.send({"bytes_per_s": 2 * n * 4 / min(times[2:])})  # best of 8, as STREAM reports
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


class Runner:
    """Runs tasks, each in a fresh process forked from a server that has imported the libraries."""

    def __init__(self, isolate: bool, threads: int, timeout_s: float, preload: Sequence[str] = ()):
        self.isolate = isolate
        self.timeout_s = timeout_s
        self.ctx = None
        if isolate:
            import multiprocessing as mp

            os.environ["OMP_NUM_THREADS"] = str(threads)
            os.environ["MKL_NUM_THREADS"] = str(threads)
            os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
            self.ctx = mp.get_context("forkserver")
            # The server imports only libraries (no CUDA call), so each forked child starts
            # with the imports done but no allocations, caches or CUDA context of its own.
            # Heavy optional imports (TRL pulls in transformers, inductor) cost seconds per
            # child on a loaded 2-core machine; the caller preloads them where that is safe.
            self.ctx.set_forkserver_preload(["torch", "fastrlhf", "fastrlhf.bench.measure", *preload])

    def _in_child(self, target, args) -> dict[str, Any]:
        parent_conn, child_conn = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        proc.start()
        child_conn.close()
        try:
            if parent_conn.poll(self.timeout_s):
                res = parent_conn.recv()
            else:
                res = {"status": "error", "reason": f"timed out after {self.timeout_s:.0f} s"}
        except EOFError:
            res = None
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()  # only the child this runner started
            proc.join()
        if res is None:
            code = proc.exitcode
            why = "killed (out of memory?)" if code is not None and code < 0 else f"exit code {code}"
            res = {"status": "error", "reason": f"measurement process died: {why}"}
        parent_conn.close()
        return res

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = self._run(dict(task, isolated=self.isolate))
        res["wall_s"] = round(time.perf_counter() - t0, 2)  # whole measurement: build, compile, calls
        return res

    def _run(self, task: dict[str, Any]) -> dict[str, Any]:
        if self.isolate:
            return self._in_child(_child, (task,))
        res = measure_result(task)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return res

    def stream_bandwidth(self, threads: int, device: str, timer: str = "wall") -> Optional[float]:
        if self.isolate:
            res = self._in_child(_stream_child, (threads, device, timer))
        else:
            import multiprocessing as mp

            a, b = mp.Pipe(duplex=False)
            _stream_child(b, threads, device, timer)
            res = a.recv()
        return res.get("bytes_per_s")
