"""Evaluation: sweeps that write records, then Pareto fronts, hypervolume, tables and plots from records.

    backend = default_backend()                      # or ToyBackend.default(), DiffusersBackend(pipe, ...)
    settings = build_settings(["base", "mpa", "ls"], pair_grid(["r1", "r2"], [0, 0.5, 1]))
    run_sweep(backend, settings, prompts, seeds, "records.jsonl")
    write_report("records.jsonl", "report/")

Heavy modules (diffusers, matplotlib) are imported by the functions that need them.
"""

from __future__ import annotations

from .._lazy import lazy_exports

from .hypervolume import hypervolume  # eager: a lazy name equal to its module's would be shadowed by the module

# name -> submodule, imported on first use (PEP 562): the command line imports ``evaluate.methods`` to build
# the sweep's options without the analysis, records and sweep modules; backends and the report pull in
# diffusers / matplotlib only when asked for.
_WHERE = {
    **dict.fromkeys(("cost_table", "mean_ci", "method_fronts", "oracle_gain", "summarize", "weighted_reward"),
                    "analysis"),
    **dict.fromkeys(("Backend", "GenResult", "MethodOptions", "Setting", "generate", "register_method",
                     "sample_seed"), "methods"),
    "pareto_front": "pareto", "pareto_mask": "pareto",
    "RecordWriter": "records", "read_records": "records", "write_records": "records",
    **dict.fromkeys(("build_settings", "merge_shards", "pair_grid", "run_sweep"), "sweep"),
    "write_report": "report", "ToyBackend": "backends", "DiffusersBackend": "pipelines",
    "default_backend": "pipelines",
}
__all__ = ["hypervolume", *_WHERE]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
