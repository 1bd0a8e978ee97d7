"""Benchmarks of sfox-relay: ``python -m bench`` (see bench/run.py), plus one-off spikes."""
