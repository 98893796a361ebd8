"""What produced a report: code, environment, machine, runs and data (``results/provenance.json``).

``gather_provenance(runs, datasets, lock, repo)`` returns one JSON-able dict:

* ``code``: git commit of ``repo`` and whether its tree was dirty (tracked changes or untracked,
  not-ignored files); in an unpacked ``equipipe archive`` (no git) the commit recorded in its
  ``ARCHIVE.json``;
* ``environment``: equipipe's version (``equipipe.__version__``), sha256 of the lock file, Python,
  torch, CUDA (``torch.version.cuda``; null for the CPU build), Snakemake and numpy versions;
* ``machine``: platform string, architecture, CPU model, host name, CUDA device names;
* ``runs``: per run (from its ``run.json``) experiment, seed, device, git commit, torch version;
  ``runs_commit_mismatch`` lists runs whose commit differs from ``code.commit``;
* ``datasets``: per dataset the configured source, the source's public facts (record ids, DOIs,
  URLs: the dataset module's ``SOURCES`` entry), the raw files (name, size, sha256), the store's
  meta (``meta.json``: n, n_quarantined, files, the release pins where the data module records
  them) and the quarantine counts by reason;
  ``gaps`` names what the store itself does not record and where the value came from instead.

``render_rst`` turns it into the report's "Provenance" section.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from equipipe import __version__

__all__ = ["file_sha256", "gather_provenance", "render_rst", "write_provenance"]

MAX_LISTED_FILES = 1000  # raw folders with more files are summarised (count, bytes, digest)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def code_info(repo: Path) -> dict[str, Any]:
    """Commit and dirty flag of the repository (or of the archive it was unpacked from)."""
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is not None:
        status = _git(repo, "status", "--porcelain") or ""
        return {
            "commit": commit.strip(),
            "dirty": bool(status.strip()),
            "changed": [ln[3:] for ln in status.splitlines()][:50],
            "from": "git",
        }
    marker = repo / "ARCHIVE.json"
    if marker.is_file():
        a = json.loads(marker.read_text())
        return {
            "commit": a.get("commit"),
            "dirty": a.get("dirty"),
            "changed": [],
            "from": "archive",
        }
    return {"commit": None, "dirty": None, "changed": [], "from": "unknown (no git, no archive)"}


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - an absent package is recorded as null
        return None


def environment_info(lock: Path | None) -> dict[str, Any]:
    import torch

    return {
        "equipipe": __version__,
        "lock": str(lock) if lock else None,
        "lock_sha256": file_sha256(lock) if lock and lock.is_file() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "snakemake": _version("snakemake"),
        "numpy": _version("numpy"),
        "e3nn": _version("e3nn"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "host": socket.gethostname(),
        "cuda_devices": gpus,
    }


def runs_info(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    out = []
    for d in run_dirs:
        info = json.loads((Path(d) / "run.json").read_text())
        out.append(
            {
                "experiment": info.get("experiment"),
                "seed": info.get("seed"),
                "run_dir": str(d),
                "device": info.get("device"),
                "git_commit": info.get("git_commit"),
                "torch": (info.get("versions") or {}).get("torch"),
                "steps": info.get("steps"),
                "train_seconds": info.get("train_seconds"),
            }
        )
    return sorted(out, key=lambda r: (str(r["experiment"]), int(r["seed"] or 0)))


def raw_files(raw: Path) -> dict[str, Any]:
    """Name, size and sha256 of every file under a raw-data folder (summarised when many)."""
    files = (
        sorted(p for p in raw.rglob("*") if p.is_file() and not p.name.startswith(".snakemake"))
        if raw.is_dir()
        else []
    )
    if raw.is_file():
        files, raw = [raw], raw.parent
    rows = [
        {"name": str(p.relative_to(raw)), "size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in files
    ]
    summary = {
        "folder": str(raw),
        "n_files": len(rows),
        "bytes": sum(r["size"] for r in rows),
        "digest": hashlib.sha256(
            "".join(f"{r['name']}\t{r['size']}\t{r['sha256']}\n" for r in rows).encode()
        ).hexdigest(),
    }
    if len(rows) <= MAX_LISTED_FILES:
        summary["files"] = rows
    return summary


def _source_facts(dataset: str, source: str) -> tuple[Any, str | None]:
    try:
        sources = importlib.import_module(f"equipipe.data.{dataset}").SOURCES
    except (ImportError, AttributeError):
        return None, f"equipipe.data.{dataset} has no SOURCES table"
    if source in sources:
        return sources[source], None
    if dataset == "pdb":  # its SOURCES is keyed remote / embedded, not by source name
        key = "embedded" if source == "embedded" else "remote"
        if key in sources:
            return sources[key], None
    return None, f"no SOURCES entry for source {source!r} in equipipe.data.{dataset}"


def dataset_info(dataset: str, source: str, store: Path, raw: Path) -> dict[str, Any]:
    import polars as pl

    meta = json.loads((store / "meta.json").read_text())
    gaps = []
    facts, gap = _source_facts(dataset, source)
    if gap:
        gaps.append(gap)
    landed = meta.get("download")  # download.json of the raw folder: url, size, sha256 per file
    if not landed and not any(k in meta for k in ("url", "urls", "record", "doi")):
        gaps.append(
            "the store's meta.json records no record id / URL: taken from the dataset "
            f"module's SOURCES[{source!r}]"
        )
    if not landed and not any(
        k in meta for k in ("release_pins", "sha256", "checksums", "file_checksums")
    ):
        gaps.append(
            "the store's meta.json records no file sizes / checksums: computed from the raw "
            f"folder {raw} when this provenance was written"
        )
    q = pl.read_parquet(store / "quarantine.parquet")
    reasons = (
        q.group_by("reason").len().sort(["len", "reason"], descending=[True, False]).rows()
        if q.height
        else []
    )
    return {
        "dataset": dataset,
        "source": source,
        "source_facts": facts,
        "raw": raw_files(raw),
        "store": {
            "folder": str(store),
            "n": meta.get("n"),
            "n_quarantined": meta.get("n_quarantined", q.height),
            "meta_source": meta.get("source"),
            "files": meta.get("files"),
            "release_pins": meta.get("release_pins"),
            "download": landed,
            "meta_sha256": file_sha256(store / "meta.json"),
            "index_sha256": file_sha256(store / "index.parquet"),
        },
        "quarantine": {"n": q.height, "by_reason": [{"reason": r, "n": n} for r, n in reasons]},
        "gaps": gaps,
    }


def gather_provenance(
    run_dirs: Sequence[Path],
    datasets: dict[str, dict[str, str]],
    lock: Path | None,
    repo: Path,
) -> dict[str, Any]:
    """The provenance dict; ``datasets`` maps name -> {"source", "store", "raw"} (paths)."""
    code = code_info(Path(repo))
    runs = runs_info([Path(d) for d in run_dirs])
    return {
        "code": code,
        "environment": environment_info(Path(lock) if lock else None),
        "machine": machine_info(),
        "runs": runs,
        "runs_commit_mismatch": [
            f"{r['experiment']}/seed{r['seed']}"
            for r in runs
            if code["commit"] and r["git_commit"] and r["git_commit"] != code["commit"]
        ],
        "datasets": {
            name: dataset_info(name, d["source"], Path(d["store"]), Path(d["raw"]))
            for name, d in sorted(datasets.items())
        },
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head = "+" + "+".join("=" * (w + 2) for w in widths) + "+"

    def cells(vals):
        return "|" + "|".join(f" {v:<{w}} " for v, w in zip(vals, widths)) + "|"

    out = [line, cells(headers), head]
    for r in rows:
        out += [cells(r), line]
    return "\n".join(out) + "\n"


def _cell(v: Any) -> str:
    s = "" if v is None else str(v)
    return s.replace("|", "/").replace("\n", " ")


def render_rst(p: dict[str, Any]) -> str:
    """The report's Provenance section (RST)."""
    code, env, mach = p["code"], p["environment"], p["machine"]
    dirty = {True: "yes (uncommitted changes)", False: "no", None: "unknown"}[code["dirty"]]
    out = ["Provenance\n==========\n\n"]
    out.append(
        _table(
            ["what", "value"],
            [
                ["equipipe", _cell(env.get("equipipe"))],  # null in records made before it was kept
                ["git commit", _cell(code["commit"])],
                ["tree dirty", dirty],
                ["lock sha256", _cell(env["lock_sha256"])],
                ["Python", _cell(env["python"])],
                ["torch", _cell(env["torch"])],
                ["CUDA", _cell(env["cuda"] or "none (CPU build)")],
                ["Snakemake", _cell(env["snakemake"])],
                ["platform", _cell(mach["platform"])],
                ["CPU", _cell(mach["cpu"])],
                ["CUDA devices", _cell(", ".join(mach["cuda_devices"]) or "none")],
            ],
        )
    )
    if p["runs_commit_mismatch"]:
        out.append(
            "\n**Runs trained at another commit:** " + ", ".join(p["runs_commit_mismatch"]) + "\n"
        )
    out.append("\nRuns\n----\n\n")
    out.append(
        _table(
            ["experiment", "seed", "device", "commit", "torch"],
            [
                [
                    _cell(r["experiment"]),
                    _cell(r["seed"]),
                    _cell(r["device"]),
                    _cell((r["git_commit"] or "")[:12]),
                    _cell(r["torch"]),
                ]
                for r in p["runs"]
            ]
            or [["", "", "", "", ""]],
        )
    )
    for name, d in p["datasets"].items():
        title = f"Dataset {name} (source {d['source']})"
        out.append(f"\n{title}\n" + "-" * len(title) + "\n\n")
        facts = d["source_facts"]
        if facts:
            out.append("Source: ``" + json.dumps(facts, sort_keys=True, default=str) + "``\n\n")
        raw = d["raw"]
        out.append(
            f"{raw['n_files']} raw file(s), {raw['bytes']:,} bytes, in ``{raw['folder']}``; "
            f"store: {d['store']['n']} examples, {d['quarantine']['n']} quarantined.\n\n"
        )
        if d["store"].get("release_pins"):
            pins = json.dumps(d["store"]["release_pins"], sort_keys=True, default=str)
            out.append(f"Release pins recorded in the store: ``{pins}``\n\n")
        if raw.get("files"):
            out.append(
                _table(
                    ["file", "bytes", "sha256"],
                    [[_cell(f["name"]), f"{f['size']:,}", f["sha256"]] for f in raw["files"]],
                )
            )
        if d["quarantine"]["by_reason"]:
            out.append("\n")
            out.append(
                _table(
                    ["quarantine reason", "records"],
                    [[_cell(q["reason"]), str(q["n"])] for q in d["quarantine"]["by_reason"]],
                )
            )
        for g in d["gaps"]:
            out.append(f"\n- gap: {g}\n")
    return "".join(out)


def write_provenance(
    out_json: Path,
    out_html: Path | None,
    run_dirs: Sequence[Path],
    datasets: dict[str, dict[str, str]],
    lock: Path | None,
    repo: Path,
) -> dict[str, Any]:
    """Write ``provenance.json`` (and the report's HTML section); return the dict."""
    p = gather_provenance(run_dirs, datasets, lock, repo)
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(p, indent=1, sort_keys=True, default=str) + "\n")
    if out_html is not None:
        from docutils.core import publish_string

        rst = render_rst(p)
        Path(out_html).with_suffix(".rst").write_text(rst)
        Path(out_html).write_bytes(publish_string(rst, writer_name="html"))
    return p
