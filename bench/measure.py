"""Timing, peak memory and the machine: the measuring tools every case uses.

Machines are shared and noisy, so a figure is a ratio of contenders timed side by side in one process,
interleaved (a, b, c, a, b, c, ...), and each time is the median of the repetitions. Peak memory is measured
in a fresh process per contender: the kernel's high-water mark of resident memory (VmHWM), reset just before
the measured call, minus the resident size at that moment. (ru_maxrss cannot be reset, and keeps the peak of
threads that have exited.)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on the CPU), so that timings cover it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(function: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    return time.perf_counter() - start


def interleaved(
    contenders: Mapping[str, Callable[[], object]],
    repeat: int,
    setup: Mapping[str, Callable[[], object]] | None = None,
    warmup: Iterable[str] | None = None,
) -> dict[str, dict]:
    """Time each contender `repeat` times, interleaved (a, b, c, a, b, c, ...); {name: {"median": s, "times": [...]}}.

    setup[name], when given, runs untimed before each call of that contender (removing its last output).
    A warm-up call of each contender in `warmup` (default: all) comes first, untimed: imports, allocator and
    kernel caches. Leave out the ones too slow to call more often than needed.
    """
    setup = setup or {}
    for name in contenders if warmup is None else warmup:
        setup.get(name, _nothing)()
        contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, function in contenders.items():
            setup.get(name, _nothing)()
            times[name].append(timed(function))
    return {name: {"median": statistics.median(values), "times": values} for name, values in times.items()}


def _nothing() -> None:
    pass


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current resident size (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """VmHWM: the peak resident size since the process started or since reset_peak."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def peak_of(function: Callable[[], object], device: str = "cpu") -> dict:
    """Run `function` once; how far above the resident size before the call its peak went (bytes), and on a
    CUDA device also how far above the memory allocated before the call the GPU's peak went (gpu_peak_increase)."""
    import gc

    import torch

    gc.collect()
    gpu = str(device).startswith("cuda")
    if gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    before = resident_bytes()
    reset = reset_peak()
    function()
    synchronize()
    peak = peak_bytes()
    out = {"peak_increase": max(0, peak - before), "resident_before": before, "peak": peak, "reset": reset}
    if gpu:
        out["gpu_peak_increase"] = torch.cuda.max_memory_allocated(device) - allocated
    return out


def run_worker(case: str, params: Mapping, env: Mapping[str, str] | None = None, timeout: float = 3600) -> dict:
    """Run bench.worker in a fresh interpreter; its result (the last line of its output, JSON)."""
    command = [sys.executable, "-m", "bench.worker", case, json.dumps(dict(params))]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"bench.worker {case} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def process_peak(command: list[str], cwd: Path | None = None, env: Mapping[str, str] | None = None, timeout: float = 3600) -> dict:
    """Wall time and whole-process peak resident memory of a command, read from its own VmHWM at exit by a
    wrapper (bench.peakwrap) that runs the command's Python entry point in-process."""
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-peak-{os.getpid()}-{time.monotonic_ns()}.json"
    full = {**os.environ, **(env or {}), "BENCH_PEAK_FILE": str(marker)}
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=full, timeout=timeout)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed ({run.returncode}):\n{run.stderr[-3000:]}")
    peak = json.loads(marker.read_text()) if marker.exists() else {}
    marker.unlink(missing_ok=True)
    return {"wall": wall, "peak": peak.get("peak"), "stdout": run.stdout[-2000:]}


def machine() -> dict:
    """The machine and software a result was measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        with open("/proc/meminfo") as handle:
            memory = int(next(line.split()[1] for line in handle if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("peft", "transformers", "safetensors", "nan-peft"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": versions,
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_slug(info: Mapping) -> str:
    """A file name for a machine: cpu family, cores, memory, gpu ("amd-epyc-2c-24g")."""
    words = [w for w in "".join(c if c.isalnum() else " " for c in info["cpu"].lower()).split() if w not in {"r", "tm", "cpu", "processor", "with"}]
    name = "-".join(words[:3]) or "cpu"
    memory = f"-{round((info.get('memory_bytes') or 0) / 2**30)}g" if info.get("memory_bytes") else ""
    gpu = "-" + "".join(c if c.isalnum() else "-" for c in info["gpu"].lower()).strip("-") if info.get("gpu") else ""
    return f"{name}-{info['cores']}c{memory}{gpu}"
