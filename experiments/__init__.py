"""Experiment modules: each exposes get_config() and runs with `python -m experiments.NAME`."""
