"""python -m bench.peakwrap MODULE:FUNCTION [ARG]...: call a console script's entry point in this process with
sys.argv = [FUNCTION, ARG...], and at exit write {"peak": VmHWM bytes} to the file named by $BENCH_PEAK_FILE.

The whole process's peak resident memory, imports included, read from the kernel at exit (ru_maxrss of a
child that started threads is not reliable here). Runs under any interpreter: it imports nothing of bench's.
"""

import atexit
import importlib
import json
import os
import sys


def _write_peak() -> None:
    target = os.environ.get("BENCH_PEAK_FILE")
    if not target:
        return
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    with open(target, "w") as handle:
        json.dump({"peak": peak}, handle)


def main() -> None:
    entry, *arguments = sys.argv[1:]
    module, _, function = entry.partition(":")
    atexit.register(_write_peak)
    sys.argv = [function or module, *arguments]
    getattr(importlib.import_module(module), function or "main")()


if __name__ == "__main__":
    main()
