"""Benchmarks: hardware-in-loop tables of latency, throughput, memory, size and accuracy."""
