"""Merge two task adapters with NAN and compare with a uniform average.

    python examples/merge_two_adapters.py [ADAPTER_A ADAPTER_B] [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

import nan_peft
from _inputs import demo_inputs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="*", type=Path, help="two adapters (default: two of the demo's)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    if args.adapters and len(args.adapters) != 2:
        parser.error(f"give two adapters, not {len(args.adapters)}")
    args.out = args.out or Path(tempfile.mkdtemp(prefix="nan-peft-example-"))
    adapters = args.adapters or demo_inputs(args.out)[1][:2]

    nan = nan_peft.merge_adapters(adapters)  # NAN coefficients, exact merge
    uniform = nan_peft.merge_adapters(adapters, coefficients="uniform")
    for name, norm in nan.norms.items():
        print(f"{name}: ||dW||_F = {norm:.4g}")
    print("NAN coefficients:    ", [round(c, 4) for c in nan.coefficients.per_adapter.tolist()])
    print("uniform coefficients:", [round(c, 4) for c in uniform.coefficients.per_adapter.tolist()])
    nan.save_pretrained(args.out / "merged", overwrite=True)
    print(f"wrote {args.out / 'merged'} (rank {nan.rank})")
    return {"norms": nan.norms, "nan": nan.coefficients.per_adapter.tolist(), "output": args.out / "merged"}


if __name__ == "__main__":
    main()
