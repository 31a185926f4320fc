"""Facts about the benchmark machine and guards against measuring on a busy one.

Shared by ``benchmarks/bench_offline.py`` and ``benchmarks/bench_online.py``:

* ``cpu_model`` / ``cpu_flags``: what the numbers were measured on.
* ``CpuMonitor``: CPU time used by *other* processes during a measurement, as a fraction of all
  cores. On a 2-core machine a second busy process makes every OpenMP region wait for a
  descheduled thread, so numbers taken under foreign load are not comparable. Processes that are
  part of the measurement (a server under test and its children) can be named and are counted
  as "own" time, not foreign.
* ``wait_quiet``: before a timed run, wait until the rest of the machine is idle.
* ``measure_bandwidth`` / ``measure_matmul``: the physical limits (need torch; imported lazily).
* ``roofline``: a model's decode and throughput limits on this machine from those measurements and
  its config alone (``tokenmill bench roofline``).
"""
from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tokenmill.config import torch_dtype

logger = logging.getLogger(__name__)

# Default for wait_quiet(max_wait=None); scripts set it from their --wait-quiet flag.
_WAIT_QUIET_S = 0.0


def set_wait_quiet_default(seconds: float) -> None:
    """Make ``wait_quiet()`` without an explicit ``max_wait`` wait up to ``seconds``."""
    global _WAIT_QUIET_S
    _WAIT_QUIET_S = float(seconds)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def system_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def _process_tree(pids: Iterable[int]) -> list[Any]:
    """psutil.Process objects of ``pids`` and all their live descendants (each once)."""
    import psutil

    procs: dict[int, Any] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs[p.pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            continue
    return list(procs.values())


def process_tree_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds (user + system, all threads, reaped children too) of ``pids`` and their live descendants."""
    import psutil

    total = 0.0
    for p in _process_tree(pids):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuMonitor:
    """CPU time used by *other* processes during a measurement, as a fraction of all cores.

    ``pids`` (or a callable returning them) are processes that belong to the measurement, e.g. a
    server under test: their CPU time (and their children's) counts as own, not foreign. A process
    tree that exits during the measurement is not seen at ``stop`` and its time would count as
    foreign, so stop the monitor before stopping the server.
    """

    def __init__(self, pids: Iterable[int] | Callable[[], Iterable[int]] = ()) -> None:
        self._pids = pids
        self.t0 = time.perf_counter()
        self.busy0 = system_busy_seconds()
        self.own0 = own_cpu_seconds()
        self.tree0 = process_tree_cpu_seconds(self._pid_list())

    def _pid_list(self) -> list[int]:
        return list(self._pids() if callable(self._pids) else self._pids)

    def stop(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.t0
        busy, own = system_busy_seconds(), own_cpu_seconds()
        tree = process_tree_cpu_seconds(self._pid_list())
        if busy is None or self.busy0 is None or wall <= 0:
            return {"foreign_cpu_frac": None, "own_cpu_frac": None}
        ncpu = os.cpu_count() or 1
        own_used = (own - self.own0) + max(0.0, tree - self.tree0)
        foreign = max(0.0, (busy - self.busy0) - own_used)
        res: dict[str, float | None] = {
            "foreign_cpu_frac": foreign / (wall * ncpu),
            "own_cpu_frac": (own - self.own0) / (wall * ncpu),
        }
        if self._pid_list():
            res["server_cpu_frac"] = max(0.0, tree - self.tree0) / (wall * ncpu)
        return res


def check_quiet(what: str, mon: dict[str, Any], threshold: float = 0.1) -> bool:
    """Warn (and return False) when other processes used more than ``threshold`` of the CPU."""
    frac = mon.get("foreign_cpu_frac")
    if frac is not None and frac > threshold:
        logger.warning("%s: other processes used %.0f%% of the CPU during the measurement; "
                       "the numbers are not representative", what, 100 * frac)
        return False
    return True


def wait_quiet(max_wait: float | None = None, threshold: float = 0.1,
               pids: Iterable[int] | Callable[[], Iterable[int]] = ()) -> float:
    """Before a timed run: wait (up to ``max_wait`` s) until other processes use < threshold of the CPU.

    ``pids``: processes of the measurement itself (an idle server under test) not to count as foreign.
    Returns the seconds waited.
    """
    max_wait = _WAIT_QUIET_S if max_wait is None else max_wait
    if max_wait <= 0:
        return 0.0
    t0 = time.perf_counter()
    while True:
        mon = CpuMonitor(pids)
        time.sleep(1.0)
        frac = mon.stop()["foreign_cpu_frac"]
        waited = time.perf_counter() - t0
        if frac is None or frac < threshold:
            if waited > 1.5:
                logger.info("machine quiet after %.0f s", waited)
            return waited
        if waited >= max_wait:
            logger.warning("machine still busy (%.0f%% foreign CPU) after %.0f s; measuring anyway", 100 * frac, waited)
            return waited


def _timer(device: str) -> Callable[[], float]:
    """A clock that first waits for the device's queued work (CUDA runs asynchronously)."""
    import torch

    if device == "cpu":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def measure_bandwidth(mbytes: int = 512, reps: int = 10, device: str = "cpu") -> dict[str, float]:
    """Large-tensor memory bandwidth in GB/s: copy (read + write bytes counted), read-only (sum), matvec; on
    `device` (cpu, or cuda for the GPU's own memory)."""
    import torch

    clock = _timer(device)
    n = mbytes * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    src.sum()
    copy_t, read_t = [], []
    for _ in range(reps):
        t0 = clock()
        dst.copy_(src)
        copy_t.append(clock() - t0)
        t0 = clock()
        src.sum()
        read_t.append(clock() - t0)
    nbytes = src.numel() * src.element_size()
    res = {
        "buffer_mb": mbytes,
        "copy_gb_s": 2 * nbytes / min(copy_t) / 1e9,
        "read_gb_s": nbytes / min(read_t) / 1e9,
    }
    del src, dst
    # the decode access pattern: one matrix-vector product streaming a weight matrix
    mat = torch.ones(n // 4096, 4096, dtype=torch.float32, device=device)
    vec = torch.ones(4096, dtype=torch.float32, device=device)
    torch.mv(mat, vec)
    mv_t = []
    for _ in range(reps):
        t0 = clock()
        torch.mv(mat, vec)
        mv_t.append(clock() - t0)
    res["matvec_gb_s"] = mat.numel() * mat.element_size() / min(mv_t) / 1e9
    del mat, vec
    return res


def measure_matmul(n: int = 2048, reps: int = 5,
                   dtypes: Sequence[str] = ("bfloat16", "float32"), device: str = "cpu") -> dict[str, float]:
    """Peak GFLOP/s of an n x n x n matmul per dtype (best of ``reps``), as ``{dtype}_gflop_s``."""
    import torch

    clock = _timer(device)
    out: dict[str, float] = {"n": n}
    for name in dtypes:
        dt = torch_dtype(name)
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        torch.mm(a, b)  # warm-up (picks the kernel, e.g. oneDNN AMX for bf16)
        best = float("inf")
        for _ in range(reps):
            t0 = clock()
            torch.mm(a, b)
            best = min(best, clock() - t0)
        out[f"{name}_gflop_s"] = 2 * n**3 / best / 1e9
        del a, b
    return out


def basic_machine_info() -> dict[str, Any]:
    """CPU, cores, Python and platform, load average now (no measurement, no torch import)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def process_tree_peak_rss_mb(pids: Iterable[int]) -> float | None:
    """Sum of the peak resident set sizes (VmHWM, which psutil does not report) of ``pids`` and their live
    descendants, in MiB."""
    total_kb, found = 0, False
    for p in _process_tree(pids):
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total_kb += int(line.split()[1])
                        found = True
                        break
        except OSError:
            continue
    return total_kb / 1024 if found else None


def bandwidth_bytes_s(bandwidth: dict[str, float]) -> float:
    """The bandwidth the limits use: the largest measured figure (copy, read, matvec), in bytes/s; the
    largest gives the strictest (lowest) fraction of the limit."""
    return max(bandwidth["copy_gb_s"], bandwidth["read_gb_s"], bandwidth.get("matvec_gb_s", 0.0)) * 1e9


def roofline(param_counts: dict[str, int], bandwidth: dict[str, float], matmul: dict[str, float],
             dtypes: Sequence[str]) -> dict[str, Any]:
    """Physical limits of a model with ``param_counts`` (ModelConfig.param_counts()) per dtype.

    decode tokens/s <= bandwidth / weight bytes (one step of batch 1 reads every weight once; KV ignored);
    batched tokens/s <= matmul FLOP/s / (2 x parameters). ``bandwidth`` and ``matmul`` are
    measure_bandwidth() / measure_matmul() results (matmul must have every dtype).
    """
    params = sum(param_counts.values())
    bw = bandwidth_bytes_s(bandwidth)
    per_dtype: dict[str, Any] = {}
    for name in dtypes:
        elem = torch_dtype(name).itemsize
        flops = matmul[f"{name}_gflop_s"] * 1e9
        weight_bytes = params * elem
        per_dtype[name] = {
            "bytes_per_param": elem,
            "weight_bytes": weight_bytes,
            "matmul_gflop_s": flops / 1e9,
            "decode_tok_s_limit": bw / weight_bytes if weight_bytes else None,
            "throughput_tok_s_limit": flops / (2 * params) if params else None,
        }
    return {"params": params, "param_counts": dict(param_counts), "bandwidth_gb_s_used": bw / 1e9,
            "per_dtype": per_dtype}
