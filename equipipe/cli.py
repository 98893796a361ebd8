"""The ``equipipe`` command: the subcommands that the workflow's rules call.

Every subcommand takes its configuration slice as JSON (``--cfg``/``--spec``), so a rule passes
only its own slice and reruns only when that slice changes.

Logging is configured here once (``equipipe.logs``; ``--log-level`` or EQUIPIPE_LOG_LEVEL):
messages go to stderr. The ``print`` calls left are the output of the commands whose output IS
their stdout (archive's path, model-info's table, validate-config, config-docs, diff-reports)
and the one-line error a failing command ends with (``equipipe <command>: error: ...``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from equipipe import __version__
from equipipe.logs import LEVEL_ENV, LEVELS, configure_logging

DATASETS = ("spice", "pdb", "geom")


def _json(text: str) -> dict:
    from equipipe.params import read_param

    text = read_param(text)  # "@path": the rule's content-addressed parameter file
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"equipipe: --cfg/--spec is not valid JSON ({e}): {text[:200]}") from None


def _dataset_module(name: str):
    if name not in DATASETS:
        raise SystemExit(f"equipipe: unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return importlib.import_module(f"equipipe.data.{name}")


def cmd_build_embedded(a) -> None:
    _dataset_module(a.dataset).build_embedded(Path(a.out), _json(a.cfg))


def cmd_download(a) -> None:
    _dataset_module(a.dataset).download(a.source, Path(a.out), _json(a.cfg))


def cmd_preprocess(a) -> None:
    _dataset_module(a.dataset).preprocess(Path(a.raw), Path(a.out), _json(a.cfg))


def cmd_split(a) -> None:
    from equipipe.data.splits import write_split

    cfg = _json(a.cfg)
    write_split(
        Path(a.store),
        Path(a.out),
        cfg.get("fractions", {"train": 0.8, "val": 0.1, "test": 0.1}),
        int(cfg.get("seed", 0)),
        cfg.get("predefined"),
    )


def cmd_subset(a) -> None:
    from equipipe.data.splits import write_subset

    write_subset(
        Path(a.split),
        Path(a.out),
        float(a.size) if a.unit == "fraction" else int(float(a.size)),
        a.unit,
        a.name,
    )


def cmd_train(a) -> None:
    from equipipe.distributed import exec_torchrun, under_launcher
    from equipipe.gpulease import lease_gpu

    spec = _json(a.spec)
    device = spec.get("train", {}).get("device", "auto")
    with lease_gpu(device, Path(a.lock_dir) if a.lock_dir else None, count=max(a.gpus, 1)):
        if a.gpus > 1 and not under_launcher():
            # one rank per GPU; exec keeps the leases (inherited lock descriptors) held
            exec_torchrun(a.gpus, sys.argv[1:])
        from equipipe.allocator import keep_freed_memory
        from equipipe.timing import process_seconds
        from equipipe.train import train

        keep_freed_memory()  # large tensors reuse the heap instead of faulting in fresh pages
        if a.tensorboard:
            spec = {**spec, "train": {**spec.get("train", {}), "tensorboard": True}}
        train(spec, Path(a.store), Path(a.split), Path(a.subset), Path(a.out), process_seconds())


def cmd_collect(a) -> None:
    from docutils.core import publish_string

    from equipipe.collect import collect

    out = Path(a.out_comparison)
    windows = _json(a.dip_windows) if a.dip_windows else None
    collect([Path(p) for p in a.runs], Path(a.out_metrics), out, dip_windows=windows)
    html = publish_string(out.with_suffix(".rst").read_text(), writer_name="html")
    out.with_suffix(".html").write_bytes(html)


def cmd_figure(a) -> None:
    import polars as pl

    from equipipe.collect import load_runs
    from equipipe.figures import make_figure
    from equipipe.metrics import read_metrics

    spec = _json(a.spec)
    dirs = [Path(r) for r in a.runs or []]
    runs = load_runs(dirs)
    frames = [read_metrics(d, info) for d, info in zip(dirs, runs.values())]
    metrics = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    extra = dict(kv.split("=", 1) for kv in a.extra or [])
    make_figure(spec, metrics, runs, Path(a.out_prefix), {k: Path(v) for k, v in extra.items()})


def cmd_analyse(a) -> None:
    spec, runs, out = _json(a.spec), [Path(r) for r in a.run], Path(a.out)
    if a.kind == "efficiency":
        from equipipe.efficiency import write_efficiency_table

        write_efficiency_table(runs, out / "efficiency.parquet", spec)
        return
    if a.kind == "md":
        from equipipe.md import md

        md(runs, out, spec)
        return
    if a.kind == "decay":
        from equipipe.decay import write_decay

        write_decay(runs, out, spec)
        return
    from equipipe import analyses

    if a.kind not in ("landscape", "twirling"):
        raise SystemExit(
            f"equipipe: unknown analysis {a.kind!r}; allowed: landscape, twirling, efficiency, md, "
            "decay"
        )
    getattr(analyses, a.kind)(runs[0], out, spec)


def cmd_tuning_summary(a) -> None:
    from equipipe.tuning import markdown_table, summarise_sweep

    _, finals = summarise_sweep(Path(a.runs), Path(a.out), a.prefix, a.split)
    print(markdown_table(finals))


def cmd_table(a) -> None:
    from equipipe.tables import write_html_tables

    write_html_tables(Path(a.folder), Path(a.out), a.title)


def cmd_provenance(a) -> None:
    from equipipe.provenance import write_provenance

    write_provenance(
        Path(a.out),
        Path(a.html) if a.html else None,
        [Path(r) for r in a.runs or []],
        _json(a.datasets),
        Path(a.lock) if a.lock else None,
        Path(a.repo) if a.repo else Path(a.lock or "lock/x").resolve().parent.parent,
    )


def cmd_headlines(a) -> None:
    from equipipe.headlines import write_headlines

    windows = _json(a.dip_windows) if a.dip_windows else None
    write_headlines([Path(r) for r in a.runs], Path(a.out), dip_windows=windows)


def cmd_archive(a) -> None:
    from equipipe.archive import write_archive

    # stdout is this command's output (the archive's path)
    print(write_archive(Path(a.out), Path(a.repo), [Path(f) for f in a.include or []]))


def cmd_diff_reports(a) -> None:
    from equipipe.diffreports import diff_main

    raise SystemExit(diff_main(a.a, a.b, a.threshold, Path(a.out) if a.out else None))


def cmd_model_info(a) -> None:
    from equipipe.models.registry import model_info_rows

    rows = model_info_rows(a.model)
    # stdout is this command's output (the table)
    print(f"{'model':<12} {'size':<8} {'parameters':>14} {'label':>10}  within 10%")
    for r in rows:
        print(
            f"{r['model']:<12} {r['size']:<8} {r['params']:>14,} {r['label'] or '-':>10}  {r['ok']}"
        )


def cmd_validate(a) -> None:
    from equipipe.config import load_config

    cfg = load_config(Path(a.config))
    print(  # stdout is this command's output
        f"{a.config}: valid ({len(cfg['experiments'])} experiments, {len(cfg.get('figures', {}))} figures)"
    )


def cmd_config_docs(a) -> None:
    from equipipe.config_docs import README, render_readme, write_readme

    # stdout is this command's output (the README's state)
    if a.write:
        print(f"{README}: {'rewritten' if write_readme() else 'already up to date'}")
    elif render_readme(README.read_text()) != README.read_text():
        raise SystemExit(
            f"{README} is out of date with the schema: run equipipe config-docs --write"
        )
    else:
        print(f"{README}: up to date with the schema")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="equipipe",
        description="How fast do non-equivariant molecular models learn rotational equivariance? "
        "Subcommands are called by the Snakemake rules (workflow/Snakefile); run the whole study "
        "with `snakemake --cores N` (see README.md and config/README.md).",
    )
    p.add_argument("--version", action="version", version=f"equipipe {__version__}")
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error instead of one line (also: EQUIPIPE_DEBUG=1)",
    )
    p.add_argument(
        "--log-level",
        default=None,
        choices=LEVELS,
        type=str.upper,
        help=f"messages on stderr from this level up (default: ${LEVEL_ENV}, else INFO)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "build-embedded",
        help="build a small real dataset offline (RDKit + GFN2-xTB, MDAnalysis test chains)",
    )
    s.add_argument("dataset", help=f"one of {', '.join(DATASETS)}")
    s.add_argument("--out", required=True, help="output folder (resources/<dataset>/embedded)")
    s.add_argument(
        "--cfg",
        default="{}",
        help="the dataset's config block as JSON (equipipe.data.dataset_block)",
    )
    s.set_defaults(fn=cmd_build_embedded)

    s = sub.add_parser(
        "download", help="download a public release with resume and checksum verification"
    )
    s.add_argument("dataset")
    s.add_argument(
        "--source",
        required=True,
        help="e.g. spice-2.0.1, spice-1.1.4, maceoff23, wwpdb, geom-rdkit",
    )
    s.add_argument("--out", required=True)
    s.add_argument("--cfg", default="{}", help="the dataset's config block as JSON")
    s.set_defaults(fn=cmd_download)

    s = sub.add_parser(
        "preprocess", help="raw files -> store (memory-mapped arrays + index + quarantine)"
    )
    s.add_argument("dataset")
    s.add_argument("--raw", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--cfg", default="{}", help="the dataset's config block as JSON")
    s.set_defaults(fn=cmd_preprocess)

    s = sub.add_parser("split", help="molecule/cluster-level train/val/test split")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--cfg", default="{}", help='{"fractions": {...}, "seed": 0}')
    s.set_defaults(fn=cmd_split)

    s = sub.add_parser("subset", help="nested training subset (id list)")
    s.add_argument("--split", required=True)
    s.add_argument("--size", required=True, help="count in --unit, or a fraction in (0, 1]")
    s.add_argument(
        "--unit", required=True, help="conformers | chains | molecules | examples | fraction"
    )
    s.add_argument("--out", required=True)
    s.add_argument("--name", default=None, help="subset name for messages (default: --out's stem)")
    s.set_defaults(fn=cmd_subset)

    s = sub.add_parser(
        "train", help="train one run with equivariance evaluation (resumes from <out>/work)"
    )
    s.add_argument("--spec", required=True, help="the run's config slice as JSON")
    s.add_argument("--store", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--subset", required=True)
    s.add_argument("--out", required=True)
    s.add_argument(
        "--lock-dir",
        default=os.environ.get("EQUIPIPE_GPU_LOCKS", ".equipipe_gpu_locks"),
        help="folder of GPU lease lock files (multi-GPU workstation)",
    )
    s.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="GPUs of this job (> 1: DDP via torchrun, one rank per GPU)",
    )
    s.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files into --out (as train.tensorboard: true; "
        "watch with `tensorboard --logdir results/runs`)",
    )
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser(
        "collect", help="stack runs into metrics_all.parquet and the measured-vs-study table"
    )
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--out-metrics", required=True)
    s.add_argument("--out-comparison", required=True)
    s.add_argument(
        "--dip-windows",
        help="JSON (or @file) experiment -> [lo, hi] steps of the dip search (null: open end)",
    )
    s.set_defaults(fn=cmd_collect)

    s = sub.add_parser("figure", help="draw one figure (png, pdf, svg)")
    s.add_argument("--spec", required=True)
    s.add_argument("--runs", nargs="*", help="run folders whose metrics the figure draws")
    s.add_argument("--extra", nargs="*", help="name=path inputs (analysis outputs)")
    s.add_argument("--out-prefix", required=True)
    s.set_defaults(fn=cmd_figure)

    s = sub.add_parser("analyse", help="mechanism analyses of a finished run")
    s.add_argument("kind", help="landscape | twirling | efficiency | md | decay")
    s.add_argument(
        "--run",
        nargs="+",
        required=True,
        help="run folder(s); efficiency and md take every run of their experiments",
    )
    s.add_argument("--out", required=True)
    s.add_argument("--spec", default="{}")
    s.set_defaults(fn=cmd_analyse)

    s = sub.add_parser(
        "tuning-summary",
        help="summarise the tuning sweep (config/tuning.yaml) into sweep_curves.csv and "
        "sweep_final.csv",
    )
    s.add_argument("--runs", default="results/runs", help="folder holding the tune_* runs")
    s.add_argument("--out", default="docs/tuning", help="folder of the two CSVs")
    s.add_argument("--prefix", default="tune_", help="experiment-name prefix of the sweep")
    s.add_argument("--split", default="val", help="held-out split the sweep evaluated")
    s.set_defaults(fn=cmd_tuning_summary)

    s = sub.add_parser(
        "table", help="render an analysis folder's tables (parquet) as one HTML page"
    )
    s.add_argument("folder")
    s.add_argument("--out", required=True)
    s.add_argument("--title", default="")
    s.set_defaults(fn=cmd_table)

    s = sub.add_parser(
        "provenance", help="results/provenance.json: code, environment, machine, runs, data"
    )
    s.add_argument("--runs", nargs="*", help="run folders (their run.json)")
    s.add_argument(
        "--datasets", default="{}", help='JSON {name: {"source", "store", "raw"}} of the data used'
    )
    s.add_argument("--lock", default=None, help="the lock file (lock/requirements.txt)")
    s.add_argument(
        "--repo",
        default=None,
        help="the code's folder: git repository or unpacked archive (default: the lock's "
        "folder's parent)",
    )
    s.add_argument("--out", required=True, help="provenance.json")
    s.add_argument("--html", default=None, help="the report's Provenance section (HTML)")
    s.set_defaults(fn=cmd_provenance)

    s = sub.add_parser(
        "headlines", help="headline numbers (dip, final pct, final error) with standard errors"
    )
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--out", required=True, help="headlines.csv")
    s.add_argument("--dip-windows", help="as for collect: experiment -> [lo, hi] steps")
    s.set_defaults(fn=cmd_headlines)

    s = sub.add_parser(
        "archive",
        help="bundle code (git), config, lock, provenance and a how-to-rerun into a .tar.gz",
    )
    s.add_argument("--out", required=True, help="the archive (.tar.gz)")
    s.add_argument("--repo", default=".", help="the git repository of the code")
    s.add_argument(
        "--include",
        nargs="*",
        help="result files to add under results/ (default: config_used.yaml, provenance.json, "
        "paper_comparison.parquet where present)",
    )
    s.set_defaults(fn=cmd_archive)

    s = sub.add_parser(
        "diff-reports",
        help="compare the headline numbers of two reports (zip or results folder) or one "
        "with the study's table (B = 'study')",
    )
    s.add_argument("a", help="report.zip or results folder")
    s.add_argument("b", help="report.zip, results folder, or 'study'")
    s.add_argument("--threshold", type=float, default=3.0, help="flag |difference| > this many SE")
    s.add_argument("--out", default=None, help="also write the table (.parquet or .csv)")
    s.set_defaults(fn=cmd_diff_reports)

    s = sub.add_parser("model-info", help="parameter counts of every model size")
    s.add_argument("--model", default=None)
    s.set_defaults(fn=cmd_model_info)

    s = sub.add_parser("validate-config", help="validate a config file against the schema")
    s.add_argument("config")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser(
        "config-docs", help="check (or --write) config/README.md's key tables against the schema"
    )
    s.add_argument("--write", action="store_true", help="regenerate the tables in place")
    s.set_defaults(fn=cmd_config_docs)
    return p


def main(argv: list[str] | None = None) -> None:
    from equipipe.errors import ActionableError, debug_requested, one_line

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        args.fn(args)
    except (ValueError, KeyError, FileNotFoundError, ActionableError) as e:
        if debug_requested(args.debug):
            raise
        # one line naming the file and what to do; --debug / EQUIPIPE_DEBUG=1: the traceback
        # the command's one-line error (like argparse's), not a log record: no time stamp
        print(f"equipipe {args.command}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
