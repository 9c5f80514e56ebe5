"""python -m bench.worker CASE PARAMS-JSON: run one case of bench.cases in this fresh process and print its
result as one JSON line.

PARAMS may hold "peak": a contender's name, whose peak memory is then measured (one call) instead of timing
them all; or "inline_peaks": true, to measure every contender's peak in this process after timing them
(rough: other contenders ran before; the smoke test uses it to stay fast).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def has_peak(name: str) -> bool:
    """Contenders whose memory is reported (not the floors, the probes and the copies)."""
    return not any(word in name for word in ("probe", "floor", "copy", "1 adapter"))


def run_case(case_name: str, params: dict) -> dict:
    import torch

    from .cases import CASES
    from .measure import interleaved, peak_of

    if params.get("threads"):
        torch.set_num_threads(params["threads"])
    case = CASES[case_name](params)
    try:
        if params.get("peak"):
            name = params["peak"]
            case.setup.get(name, lambda: None)()
            result = {"peak": {name: peak_of(case.contenders[name], params.get("device", "cpu"))}}
        else:
            times = interleaved(case.contenders, params.get("repeat", 3), setup=case.setup, warmup=case.warmup)
            result = {"times": times, "check": case.check() if case.check else {}}
            if params.get("inline_peaks"):
                result["peak"] = {}
                for name in filter(has_peak, case.contenders):
                    case.setup.get(name, lambda: None)()
                    result["peak"][name] = peak_of(case.contenders[name], params.get("device", "cpu"))
        result["info"] = case.info
    finally:
        if case.cleanup:
            case.cleanup()
    return result


def main() -> None:
    print(json.dumps(run_case(sys.argv[1], json.loads(sys.argv[2]))))


if __name__ == "__main__":
    main()
