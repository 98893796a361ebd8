"""Fixtures shared by several test modules (plus the loopback servers' plugins)."""

from __future__ import annotations

import contextlib

import pytest

pytest_plugins = ["tests.httpserver", "tests.upstreams.fixtures"]

# Real molecules (RDKit ETKDG + MMFF): phenol, a symmetric ring, and ibuprofen (33 atoms, so
# the 20-neighbour cap truncates).
MOLECULE_SMILES = ["c1ccccc1O", "Cc1c(C)c(C)c(C)c(C)c1C", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"]


@pytest.fixture(scope="session")
def molecules() -> list[dict]:
    """Two jittered conformers of each of ``MOLECULE_SMILES``, labelled by a smooth pair
    potential (an equivariant target): store-style examples ``pos, z, energy, forces``."""
    import numpy as np
    import torch

    from equipipe.data.embedded import embed_conformers

    rng = np.random.default_rng(0)
    out = []
    for i, smi in enumerate(MOLECULE_SMILES):
        mol = embed_conformers(smi, 1, seed=i)
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        for _ in range(2):
            pos = mol.GetConformer().GetPositions() + rng.normal(0, 0.05, (len(z), 3))
            x = torch.tensor(pos, requires_grad=True)
            d = torch.pdist(x)
            energy = (torch.exp(-d) - 0.5 * torch.exp(-d / 2)).sum()
            (grad,) = torch.autograd.grad(energy, x)
            out.append({"pos": pos, "z": z, "energy": energy.item(), "forces": -grad.numpy()})
    return out


class ForceFieldChecks:
    """The set-ups the force-field model tests share, on the ``molecules`` examples."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def batch(self, task, dtype=None, examples=None):
        """Fit ``task`` on the examples and collate them, floating tensors in ``dtype``
        (float64 by default)."""
        import torch

        dtype = dtype or torch.float64
        examples = self.examples if examples is None else examples
        task.fit(examples)
        batch = task.collate(examples)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}

    def assert_equivariant(self, model, batch, atol=1e-12):
        """Rotate the positions by a Haar rotation and compare: energies equal, forces
        rotated (float64 round-off). Returns the unrotated output for further checks."""
        import torch

        from equipipe.so3 import haar_rotations, rotate_vectors

        R = haar_rotations(1, torch.Generator().manual_seed(3), dtype=torch.float64)[0]
        with torch.no_grad():
            out, out_r = model(batch), model({**batch, "pos": rotate_vectors(batch["pos"], R)})
        n_molecules = batch["n_atoms"].shape[0]
        assert out["energy"].shape == (n_molecules,)
        assert out["forces"].shape == batch["pos"].shape
        assert not out["forces"].requires_grad  # evaluation under no_grad gives plain tensors
        scale = out["forces"].abs().max()
        assert scale > 1e-4  # not trivially zero
        torch.testing.assert_close(out_r["energy"], out["energy"], rtol=0, atol=atol)
        torch.testing.assert_close(
            out_r["forces"], rotate_vectors(out["forces"], R), rtol=0, atol=atol * scale
        )
        return out

    def assert_forces_are_minus_energy_gradient(self, model, batch, scale: float = 1.0):
        """Central differences (h = 1e-5) of the energy at three coordinates match the forces:
        F = -scale * dE/dx (``scale``: energy-to-force units of the model's outputs)."""
        import torch

        with torch.no_grad():
            forces = model(batch)["forces"]
        h = 1e-5
        for atom, axis in [(0, 0), (3, 2), (7, 1)]:
            plus, minus = dict(batch), dict(batch)
            plus["pos"], minus["pos"] = batch["pos"].clone(), batch["pos"].clone()
            plus["pos"][atom, axis] += h
            minus["pos"][atom, axis] -= h
            with torch.no_grad():
                de = model(plus)["energy"] - model(minus)["energy"]
            fd = -scale * float(de.sum()) / (2 * h)
            assert abs(fd - float(forces[atom, axis])) < 1e-6 * max(1.0, abs(fd)), (fd, forces)

    def assert_trains(self, task, steps: int = 30):
        """Adam at lr 1e-2 on the float32 batch lowers the task's loss by 20 % in ``steps``."""
        import numpy as np
        import torch

        batch = self.batch(task, torch.float32)
        torch.manual_seed(0)
        model = task.build_model("tiny")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(steps):
            loss = task.loss(task.predict(model, batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


@pytest.fixture(scope="session")
def ff(molecules) -> ForceFieldChecks:
    """Shared force-field set-ups: ``ff.batch(task, dtype)``, ``ff.assert_equivariant(model,
    batch)``, ``ff.assert_trains(task)``, ``ff.examples`` (the ``molecules``)."""
    return ForceFieldChecks(molecules)


def start_snakemake(wd, *args: str):
    """``tests.test_workflow.snakemake`` in ``wd`` without waiting: the Popen (text pipes)."""
    import os
    import subprocess

    from tests.test_workflow import BIN, SNAKEFILE

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}  # fmt: skip
    cmd = [str(BIN / "snakemake"), "-s", str(SNAKEFILE), "--directory", str(wd),
           "--configfile", str(wd / "config.yaml"), *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@contextlib.contextmanager
def _dags(cases: dict[str, dict], tmp_path_factory, target: str):
    import yaml

    wds, procs = {}, {}
    for case, cfg in cases.items():
        wd = tmp_path_factory.mktemp(f"dag-{case}")
        (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        wds[case] = wd
    try:
        for case, wd in wds.items():  # concurrently: each DAG is a chain of single-core jobs
            procs[case] = start_snakemake(wd, "--cores", "2", target)
        for case, p in procs.items():
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"{case} DAG failed:\n{out[-3000:]}\n{err[-6000:]}"
        yield wds
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="session")
def run_dags(tmp_path_factory):
    """``with run_dags({case: config}) as workdirs:`` runs one Snakemake DAG per config at once
    (each in its own temp dir, up to ``target``, default ``results/metrics_all.parquet``),
    fails naming the case whose DAG failed, and kills what still runs on the way out."""

    def run(cases: dict[str, dict], target: str = "results/metrics_all.parquet"):
        return _dags(cases, tmp_path_factory, target)

    return run


@pytest.fixture(scope="session")
def escaip_setup():
    """``escaip_setup(B=3, n_batches=2, dtype=float32, energy_mean=0.0, energy_std=1.0,
    hidden=12)``: a
    fitted-looking force-field task, a one-layer EScAIP-like model (eval mode, seeded) and
    ``n_batches`` random batches of B molecules with 4-6 atoms (seeded per batch)."""
    import torch

    from equipipe.models.escaip import build
    from equipipe.tasks.forcefield import ForceFieldTask

    def make(B=3, n_batches=2, dtype=torch.float32, energy_mean=0.0, energy_std=1.0, hidden=12):
        task = ForceFieldTask({"energy_reference": "none"})
        task.set_state({"energy_reference": "none", "element_energy": {},
                        "energy_mean": energy_mean, "energy_std": energy_std,
                        "force_std": 1.3})  # fmt: skip
        torch.manual_seed(0)
        model = build(
            "tiny", hidden=hidden, n_heads=2, n_rbf=8, max_neighbors=5, cutoff=5.0, n_layers=1
        )
        batches = []
        for s in range(n_batches):
            g = torch.Generator().manual_seed(s)
            n = torch.randint(4, 7, (B,), generator=g)
            N = int(n.sum())
            batches.append({
                "pos": 1.5 * torch.randn(N, 3, generator=g, dtype=dtype),
                "z": torch.randint(1, 9, (N,), generator=g),
                "batch": torch.arange(B).repeat_interleave(n), "n_atoms": n,
                "energy": torch.randn(B, generator=g, dtype=dtype),
                "forces": torch.randn(N, 3, generator=g, dtype=dtype),
            })  # fmt: skip
        return task, model.to(dtype).eval(), batches

    return make
