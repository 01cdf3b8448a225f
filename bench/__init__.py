"""Benchmarks: model build, int8 agreement, raw ONNX Runtime throughput, the server under open-loop load.

Run with `make bench` (`python -m bench --model-repo model_repo --out bench_out`). Every server number
is reported as a ratio of a limit measured in the same run, because the machines this runs on are
shared and their speed varies from minute to minute.
"""
