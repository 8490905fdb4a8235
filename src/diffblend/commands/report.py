"""``diffblend report RECORDS.jsonl -o DIR``: plots and a markdown report from sweep records."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="plots and a markdown report from sweep records",
        description="Read the JSONL records of `diffblend sweep` and write report.md with its PNG plots: "
                    "headline table (weighted reward, fraction of the MORL oracle's gain, cost ratio), "
                    "Pareto fronts and hypervolume per method, the DB-KLA lambda sweep, image grids.")
    p.add_argument("records", help="the records file written by `diffblend sweep`")
    p.add_argument("-o", "--output-dir", default="report", help="folder for report.md and the plots (default: report)")
    p.add_argument("--title", default="Diffusion Blend sweep", help="the report's title")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..evaluate.report import write_report

    path = write_report(args.records, args.output_dir, title=args.title)
    print(f"wrote {path}")
    return 0
