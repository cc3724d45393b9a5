"""Benchmarks, each printing figures measured side by side in one run (never timed tests).

`python -m scaling.bench` is throughput.py (images/s, TFLOP/s, MFU, memory) and, with
`--zero-memory`, zero.py (per-rank ZeRO state vs the ZeRO paper); peer.py builds the
transformers ViT to our shape, env.py records device, versions and memory; loader.py, host.py,
decode.py and gpu_check.py run as `python -m scaling.bench.X`. The sweep-overhead benchmark
lives in launchers/ (it starts runs as they do). Commands, results: docs/benchmarks.md.
"""
