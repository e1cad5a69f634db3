"""Figures for benchmarks: percentiles, process CPU / RSS from /proc, the machine.

No dependency beyond the standard library: /proc is read directly.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# Libraries whose versions shape the figures (codec, sockets, drivers, loop, plots).
_LIBRARIES = ("roost", "aiohttp", "msgspec", "asyncpg", "redis", "uvloop", "matplotlib")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_summary(values_ms: list[float], prefix: str = "") -> dict[str, float]:
    """``{prefix}p50_ms``, ``p99_ms``, ``p999_ms``, ``max_ms`` of a list of milliseconds."""
    ordered = sorted(values_ms)
    return {
        f"{prefix}p50_ms": round(percentile(ordered, 50), 3),
        f"{prefix}p99_ms": round(percentile(ordered, 99), 3),
        f"{prefix}p999_ms": round(percentile(ordered, 99.9), 3),
        f"{prefix}max_ms": round(ordered[-1], 3) if ordered else 0.0,
    }


def cdf_points(values_ms: list[float], points: int = 200) -> list[list[float]]:
    """A down-sampled CDF ``[[latency_ms, fraction], ...]`` small enough to keep in a JSON report."""
    ordered = sorted(values_ms)
    if not ordered:
        return []
    n = len(ordered)
    indices = sorted({min(n - 1, int(i * n / points)) for i in range(points)} | {n - 1})
    return [[round(ordered[i], 3), round((i + 1) / n, 5)] for i in indices]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may hold spaces: fields start after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process (thread id -> seconds)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return out


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_KIB


def machine_cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


@dataclass
class ProcStats:
    cpu_seconds: float = 0.0
    cpu_peak_pct: float = 0.0
    rss_peak_kib: int = 0
    rss_last_kib: int = 0


@dataclass
class ProcSampler:
    """Samples CPU% and RSS of some processes every ``interval`` seconds in a thread.

    ``summary()`` gives per-process average and peak CPU% (100 = one core) and
    peak RSS; processes that exit keep their last figures.
    """

    pids: list[int]
    interval: float = 0.5
    stats: dict[int, ProcStats] = field(default_factory=dict)
    started: float = 0.0
    stopped: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _last: dict[int, tuple[float, float]] = field(default_factory=dict)
    _first: dict[int, float] = field(default_factory=dict)
    _machine: tuple[int, int] = (0, 0)
    machine_busy_pct: float = 0.0
    # per-thread CPU at start: the main thread (the event loop) apart from the
    # others (store writer and readers), to tell which layer is busy
    _threads: dict[int, dict[int, float]] = field(default_factory=dict)
    main_thread_seconds: float = 0.0
    other_threads_seconds: float = 0.0

    def start(self) -> ProcSampler:
        self.started = time.monotonic()
        self._machine = machine_cpu_times()
        self._threads = {pid: thread_cpu_seconds(pid) for pid in self.pids}
        for pid in self.pids:
            self.stats[pid] = ProcStats()
            self._sample(pid, self.started)
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self, pid: int, now: float) -> None:
        try:
            cpu, rss = cpu_seconds(pid), rss_kib(pid)
        except (OSError, ValueError, IndexError):
            return
        entry = self.stats[pid]
        self._first.setdefault(pid, cpu)
        last = self._last.get(pid)
        if last is not None and now > last[0]:
            entry.cpu_peak_pct = max(entry.cpu_peak_pct, 100.0 * (cpu - last[1]) / (now - last[0]))
        self._last[pid] = (now, cpu)
        entry.cpu_seconds = cpu - self._first[pid]
        entry.rss_peak_kib = max(entry.rss_peak_kib, rss)
        entry.rss_last_kib = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            for pid in self.pids:
                self._sample(pid, now)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.stopped = time.monotonic()
        self._split_threads()
        busy, total = machine_cpu_times()
        if total > self._machine[1]:
            self.machine_busy_pct = 100.0 * (busy - self._machine[0]) / (total - self._machine[1])
        for pid in self.pids:
            self._sample(pid, self.stopped)
        return self.summary()

    def _split_threads(self) -> None:
        for pid, before in self._threads.items():
            for tid, seconds in thread_cpu_seconds(pid).items():
                used = seconds - before.get(tid, 0.0)
                if tid == pid:
                    self.main_thread_seconds += used
                else:
                    self.other_threads_seconds += used

    def summary(self) -> dict[str, float]:
        """Totals over all sampled processes: CPU% average and peak, RSS peak."""
        wall = max(1e-9, (self.stopped or time.monotonic()) - self.started)
        entries = list(self.stats.values())
        return {
            "cpu_avg_pct": round(100.0 * sum(e.cpu_seconds for e in entries) / wall, 1),
            "cpu_peak_pct": round(sum(e.cpu_peak_pct for e in entries), 1),
            "rss_peak_kib": sum(e.rss_peak_kib for e in entries),
            "cpu_seconds": round(sum(e.cpu_seconds for e in entries), 3),
            # share of all cores busy with anything (other runs on a shared machine included)
            "machine_busy_pct": round(self.machine_busy_pct, 1),
            "main_thread_cpu_pct": round(100.0 * self.main_thread_seconds / wall, 1),
            "other_threads_cpu_pct": round(100.0 * self.other_threads_seconds / wall, 1),
        }


def memory_total_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict[str, object]:
    """Cores, memory, CPU model, kernel, Python and library versions."""
    versions: dict[str, str] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cores": os.cpu_count() or 0,
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_mib": memory_total_kib() // 1024,
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "libraries": versions,
        "open_files_limit": _nofile_limit(),
        "roost_commit": source_commit(),
    }


def source_commit() -> str:
    """The git commit the measured code came from (``+dirty`` with local changes), if known."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "roost"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if head and dirty else "")


def _nofile_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]
