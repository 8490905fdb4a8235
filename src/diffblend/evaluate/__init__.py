"""Evaluation: sweeps that write records, then Pareto fronts, hypervolume, tables and plots from records.

    backend = default_backend()                      # or ToyBackend.default(), DiffusersBackend(pipe, ...)
    settings = build_settings(["base", "mpa", "ls"], pair_grid(["r1", "r2"], [0, 0.5, 1]))
    run_sweep(backend, settings, prompts, seeds, "records.jsonl")
    write_report("records.jsonl", "report/")

Heavy modules (diffusers, matplotlib) are imported by the functions that need them.
"""

from .analysis import cost_table, mean_ci, method_fronts, oracle_gain, summarize, weighted_reward
from .hypervolume import hypervolume
from .methods import Backend, GenResult, MethodOptions, Setting, generate, register_method, sample_seed
from .pareto import pareto_front, pareto_mask
from .records import RecordWriter, read_records, write_records
from .sweep import build_settings, merge_shards, pair_grid, run_sweep

__all__ = [
    "cost_table", "mean_ci", "method_fronts", "oracle_gain", "summarize", "weighted_reward", "hypervolume",
    "Backend", "GenResult", "MethodOptions", "Setting", "generate", "register_method", "sample_seed",
    "pareto_front", "pareto_mask", "RecordWriter", "read_records", "write_records", "build_settings",
    "merge_shards", "pair_grid", "run_sweep", "write_report", "ToyBackend", "DiffusersBackend", "default_backend",
]


def __getattr__(name):  # lazy: these pull in matplotlib / diffusers
    if name == "write_report":
        from .report import write_report

        return write_report
    if name == "ToyBackend":
        from .backends import ToyBackend

        return ToyBackend
    if name in ("DiffusersBackend", "default_backend"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
