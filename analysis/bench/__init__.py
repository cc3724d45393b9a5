"""Benchmarks of the analysis (the loader, `sweep.py status`) and the loader of before the fast
path, kept as the oracle that the benchmark and tests/test_analysis_speed.py compare with."""
