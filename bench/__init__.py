"""Benchmarks of nan-peft against peft, mergekit and the hardware: python -m bench [--quick] [--only ...].

See bench/run.py for what is measured and bench/report.py for the keys of the JSON result. Benchmarks are
not tests: the test suite only runs a seconds-long smoke version of this harness (tests/test_bench_smoke.py).
This package imports nothing heavy, so that bench.peakwrap runs under any interpreter.
"""
