"""Benchmarks, each printing figures measured side by side in one run (never timed tests).

    python -m scaling.bench --sizes Ti/16,S/16 --peer transformers    # throughput.py
    python -m scaling.bench --zero-memory --sizes Ti/16               # zero.py
    python -m scaling.bench.loader --generate-jpeg 2000               # loader.py
    python -m scaling.bench.host                                      # host.py
    python -m launchers.bench_overhead                                # a sweep's overhead

Modules: throughput.py (images/s, TFLOP/s, MFU, memory; the CLI of `python -m scaling.bench`),
peer.py (the transformers ViT built to our shape), zero.py (per-rank ZeRO state vs the ZeRO
paper), env.py (device, versions, memory, output rows), loader.py (data loader throughput),
host.py (host CPU per trained image, stage by stage, and the host cores a GPU needs).
The overhead benchmark lives in launchers/, since it starts runs the way the launchers do.
"""
