"""Sequence-identity clusters for PDB chains (what the splits group by).

Upstream (Proteína) clusters at 50 % sequence identity with MMseqs2::

    mmseqs easy-cluster in.fasta out tmp --min-seq-id 0.5 -c 0.8 --cov-mode 1

:func:`cluster_sequences` runs exactly that when the ``mmseqs`` binary is on ``PATH`` and
otherwise falls back to a small built-in clustering with the same acceptance rule:

- identical sequences always share a cluster (exact de-duplication first);
- the remaining sequences are taken longest first (ties by id); each joins the first existing
  representative that passes, else it founds a new cluster (greedy incremental, as CD-HIT);
- candidates come from a 3-mer prefilter (representatives sharing the most 3-mers first);
- a candidate passes when a local Smith-Waterman alignment (BLOSUM62, gap open -11 / extend
  -1, Biopython's ``PairwiseAligner``) has identity >= ``min_seq_id`` (identical columns over
  alignment columns, MMseqs2's default ``--seq-id-mode 0``) and covers >= ``coverage`` of the
  member sequence (``--cov-mode 1``: coverage of the target, the sequence being added).

The built-in method is quadratic in the worst case: it is meant for the embedded set and
tests (hundreds to a few thousand chains). For the real PDB (~10^5 chains) install MMseqs2
(Debian/Ubuntu package ``mmseqs2``, or conda ``bioconda::mmseqs2``).

The result maps every id to its cluster's representative id; that string is the store's
``key``, so the generic split (grouping by ``key``) never puts a cluster in two splits.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

KMER = 3
MAX_CANDIDATES = 40  # alignments tried per sequence (best 3-mer hits first)
BUILTIN_WARN_ABOVE = 20_000  # unique sequences; beyond this the built-in method gets slow

__all__ = [
    "write_fasta",
    "cluster_sequences",
    "cluster_builtin",
    "cluster_mmseqs",
    "mmseqs_available",
    "alignment_stats",
]


def mmseqs_available() -> bool:
    """True when an ``mmseqs`` executable is on ``PATH``."""
    return shutil.which("mmseqs") is not None


def cluster_sequences(
    sequences: Mapping[str, str],
    min_seq_id: float = 0.5,
    coverage: float = 0.8,
    method: str = "auto",
    threads: int = 1,
) -> dict[str, str]:
    """Cluster sequences; return ``id -> representative id``.

    Args:
        sequences: id -> one-letter amino-acid sequence (ids without whitespace).
        min_seq_id: minimum sequence identity of a member to its representative.
        coverage: minimum fraction of the member covered by the alignment.
        method: "auto" (MMseqs2 if on PATH, else built-in), "mmseqs" or "builtin".
        threads: threads for MMseqs2.
    """
    if method not in ("auto", "mmseqs", "builtin"):
        raise ValueError(f"clustering method {method!r} is unknown; allowed: auto, mmseqs, builtin")
    if not sequences:
        return {}
    if method == "mmseqs" or (method == "auto" and mmseqs_available()):
        if not mmseqs_available():
            raise FileNotFoundError(
                "clustering method 'mmseqs' needs the mmseqs binary on PATH (apt install mmseqs2 "
                "or conda install -c bioconda mmseqs2), or set the method to 'builtin'/'auto'"
            )
        return cluster_mmseqs(sequences, min_seq_id, coverage, threads)
    return cluster_builtin(sequences, min_seq_id, coverage)


def _unique(sequences: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Exact de-duplication: (first id -> sequence) over unique sequences, id -> first id."""
    first_of: dict[str, str] = {}
    to_first: dict[str, str] = {}
    for id_ in sorted(sequences):
        seq = sequences[id_]
        first = first_of.setdefault(seq, id_)
        to_first[id_] = first
    return {first: seq for seq, first in first_of.items()}, to_first


# --------------------------------------------------------------------------------------------
# MMseqs2


def cluster_mmseqs(
    sequences: Mapping[str, str], min_seq_id: float = 0.5, coverage: float = 0.8, threads: int = 1
) -> dict[str, str]:
    """``mmseqs easy-cluster --min-seq-id <id> -c <cov> --cov-mode 1`` on the unique sequences."""
    unique, to_first = _unique(sequences)
    for id_ in unique:
        if any(c.isspace() for c in id_):
            raise ValueError(f"sequence id {id_!r} contains whitespace (FASTA headers cannot)")
    with tempfile.TemporaryDirectory(prefix="equipipe-mmseqs-") as tmp:
        tmp_path = Path(tmp)
        fasta = tmp_path / "in.fasta"
        write_fasta(unique, fasta)
        cmd = [
            "mmseqs", "easy-cluster", str(fasta), str(tmp_path / "out"), str(tmp_path / "work"),
            "--min-seq-id", str(min_seq_id), "-c", str(coverage), "--cov-mode", "1",
            "--threads", str(threads), "-v", "1",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"mmseqs easy-cluster failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
            )
        rep_of: dict[str, str] = {}
        for line in (tmp_path / "out_cluster.tsv").read_text().splitlines():
            if line.strip():
                rep, member = line.split("\t")[:2]
                rep_of[member] = rep
    missing = set(unique) - set(rep_of)
    if missing:
        raise RuntimeError(
            f"mmseqs left {len(missing)} sequences unclustered, e.g. {sorted(missing)[:3]}"
        )
    return {id_: rep_of[first] for id_, first in to_first.items()}


# --------------------------------------------------------------------------------------------
# built-in fallback


def _aligner():
    from Bio import Align
    from Bio.Align import substitution_matrices

    aligner = Align.PairwiseAligner()
    aligner.mode = "local"
    aligner.substitution_matrix = substitution_matrices.load("BLOSUM62")
    aligner.open_gap_score = -11
    aligner.extend_gap_score = -1
    return aligner


def alignment_stats(rep: str, member: str, aligner=None) -> tuple[float, float]:
    """(identity, member coverage) of the best local alignment of ``member`` to ``rep``.

    identity = identical columns / alignment columns (gaps included);
    coverage = member residues spanned by the alignment / len(member).
    """
    aligner = aligner or _aligner()
    try:
        aln = aligner.align(rep, member)[0]
    except (IndexError, ValueError):
        return 0.0, 0.0
    blocks = aln.aligned  # (2, n_blocks, 2): [start, end) in rep and in member
    a_blocks, b_blocks = blocks[0], blocks[1]
    if len(a_blocks) == 0:
        return 0.0, 0.0
    ident = 0
    cols = 0
    for (a0, a1), (b0, b1) in zip(a_blocks, b_blocks):
        cols += int(a1 - a0)
        ident += sum(x == y for x, y in zip(rep[a0:a1], member[b0:b1]))
    for i in range(1, len(a_blocks)):  # gap columns between consecutive blocks
        cols += int(a_blocks[i][0] - a_blocks[i - 1][1]) + int(b_blocks[i][0] - b_blocks[i - 1][1])
    span = int(b_blocks[-1][1] - b_blocks[0][0])
    return ident / max(cols, 1), span / max(len(member), 1)


def _kmers(seq: str) -> set[str]:
    return {seq[i : i + KMER] for i in range(len(seq) - KMER + 1)}


def cluster_builtin(
    sequences: Mapping[str, str], min_seq_id: float = 0.5, coverage: float = 0.8
) -> dict[str, str]:
    """Greedy incremental clustering (see the module docstring); deterministic."""
    unique, to_first = _unique(sequences)
    if len(unique) > BUILTIN_WARN_ABOVE:
        log.warning(
            "built-in clustering of %d unique sequences will be slow; install MMseqs2 "
            "(apt install mmseqs2) for real PDB-sized sets",
            len(unique),
        )
    aligner = _aligner()
    order = sorted(unique, key=lambda i: (-len(unique[i]), i))
    reps: list[str] = []
    postings: dict[str, list[int]] = defaultdict(list)  # 3-mer -> representative indices
    rep_of_first: dict[str, str] = {}
    for id_ in order:
        seq = unique[id_]
        kmers = _kmers(seq)
        hits: Counter[int] = Counter()
        for km in kmers:
            for r in postings.get(km, ()):
                hits[r] += 1
        chosen = None
        for r, _ in sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CANDIDATES]:
            rep_seq = unique[reps[r]]
            # Coverage of the member needs the representative to be at least that long.
            if len(rep_seq) < coverage * len(seq):
                continue
            ident, cov = alignment_stats(rep_seq, seq, aligner)
            if ident >= min_seq_id and cov >= coverage:
                chosen = reps[r]
                break
        if chosen is None:
            reps.append(id_)
            for km in kmers:
                postings[km].append(len(reps) - 1)
            chosen = id_
        rep_of_first[id_] = chosen
    return {id_: rep_of_first[first] for id_, first in to_first.items()}


def write_fasta(sequences: Mapping[str, str], path: str | os.PathLike) -> None:
    """Write ``id -> sequence`` as FASTA (one line per sequence)."""
    with open(path, "w") as f:
        for id_, seq in sequences.items():
            f.write(f">{id_}\n{seq}\n")
