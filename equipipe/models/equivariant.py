"""An exactly SO(3)-equivariant force-field model (NequIP/MACE family) built on e3nn.

Beyond the paper: it exists to measure the *efficiency gap* (PAPER.md) — what an equivariant
model costs per step against the non-equivariant EScAIP-like model of the same size — and as
a control whose measured equivariance error must sit at float precision.

Read top to bottom:

1. Neighbours: :func:`radius_graph` — pairs (src -> dst) within one molecule at distance
   <= ``cutoff``, each atom keeping its ``max_neighbors`` nearest (ties at the k-th distance are
   all kept, so the neighbour set does not change when a rotation perturbs distances by
   rounding — a hard top-k would break equivariance on symmetric molecules).
2. Edge features: Bessel radial basis times a smooth polynomial envelope (zero value and
   derivative at the cutoff, so gradient forces are continuous) and real spherical harmonics
   Y^l(r̂_ij), l <= lmax (e3nn's l=1 basis is (x, y, z)).
3. :class:`Interaction` (NequIP convolution): Linear -> per-edge tensor product
   h_j ⊗ Y(r̂_ij) with "uvu" paths whose weights come from an MLP of the radial basis ->
   sum over neighbours / sqrt(avg_neighbors) -> Linear, plus a Linear self-connection ->
   e3nn ``Gate`` (SiLU on scalars, sigmoid gates on l > 0) -> residual when shapes agree.
4. Readout: per-atom scalars e_i; ``energy = mean_i e_i`` per molecule — the EScAIP-like
   model's convention (energy as the mean of per-atom scalars, in the task's normalised units).

Forces — two modes (``EquivariantConfig.forces``):

* ``"direct"`` (default): a per-atom ``1o`` vector read out of the equivariant features.
  Exactly equivariant by construction (no augmentation needed). Chosen as the default because
  the EScAIP-like model also predicts forces directly: the per-step cost ratio c then measures
  the price of equivariance alone, not equivariance *plus* a backward pass through the network
  (gradient forces need a double backward in training: ~3-4x the direct model's training step,
  measured at size tiny-lmax2 on 2 CPU cores).
* ``"gradient"`` (``model_overrides: {forces: gradient}``): conservative forces F = -dE/dx, exactly equivariant as the gradient of an
  invariant. In normalised units F_norm = -s dE_norm/dx, physical when s = σ_E / σ_F; s is one
  learned scalar (start it from the task's state with
  :meth:`EquivariantForceField.set_force_scale`; it starts at 1). The
  model calls ``pos.requires_grad_`` inside ``forward`` under a local ``torch.enable_grad()``,
  so it also works inside ``torch.no_grad()`` evaluation; the force graph is kept
  (``create_graph``) only when the caller has gradients enabled (training, gradient norms).

Batch contract (shared with ``escaip``): ``pos`` (N, 3), ``z`` (N,), ``batch`` (N,) example
index, ``n_atoms`` (B,); ``forward(batch) -> {"energy": (B,), "forces": (N, 3)}``. Works in
float32 and float64 (``model.double()`` with a float64 ``pos``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import Tensor, nn

from equipipe.models.registry import sized_config
from equipipe.so3 import rotate_per_example

Batch = dict[str, Tensor]


@dataclass
class EquivariantConfig:
    """Hyper-parameters. ``mul`` channels per irrep l = 0..lmax (parity (-1)^l)."""

    mul: int = 32
    lmax: int = 2
    layers: int = 3
    n_radial: int = 8
    radial_hidden: int = 64
    cutoff: float = 12.0  # Å, as the EScAIP-like model
    max_neighbors: int = 20
    n_elements: int = 119  # atomic numbers 0..118, as the EScAIP-like model
    avg_neighbors: float = 20.0  # message normaliser (the neighbour cap)
    forces: str = "direct"  # "direct" (1o readout) or "gradient" (-dE/dx)
    # Tensor-product kernel of the convolution: "e3nn" (o3.TensorProduct) or "cuequivariance"
    # (cuequivariance_torch.ChannelWiseTensorProduct: NVIDIA's CUDA kernels where the
    # cuequivariance-ops-torch package and a GPU are present, its PyTorch fallback elsewhere,
    # CPU included). The same "uvu" paths and parameter count; the paths' order and their
    # normalisation constants are cuequivariance's, so weights do not transfer between kernels.
    kernel: str = "e3nn"


KERNELS = ("e3nn", "cuequivariance")


# Sizes matched to the EScAIP-like model by parameter count (within 10 %, checked by
# tests/test_equivariant.py against equipipe.models.escaip), with the same number of layers.
SIZES: dict[str, EquivariantConfig] = {
    # tiny is lmax=1: on 2 CPU cores it costs about what escaip tiny does (the embedded default
    # runs on a laptop); lmax=2 at the same count costs ~3x. The paper-grid sizes are lmax=2.
    "tiny": EquivariantConfig(mul=96, lmax=1, layers=2),  # 0.22M (escaip tiny 0.20M)
    "1M": EquivariantConfig(mul=96, lmax=2, layers=4),  # 1.03M (1.07M)
    "4M": EquivariantConfig(mul=208, lmax=2, layers=4),  # 4.17M (4.20M)
    "6M": EquivariantConfig(mul=192, lmax=2, layers=6),  # 5.72M (5.94M)
}


def build(size: str, **overrides) -> EquivariantForceField:
    """The model of a named size (``tiny``, ``1M``, ``4M``, ``6M``); overrides replace fields."""
    cfg = sized_config("equivariant", EquivariantConfig(), SIZES, size, overrides)
    if torch.get_default_device().type == "meta":
        # e3nn computes constants (Wigner 3j symbols, activation moments) with real tensors
        # while it builds, which the meta device (parameter counting) cannot: build on the CPU.
        with torch.device("cpu"):
            return EquivariantForceField(cfg).to("meta")
    return EquivariantForceField(cfg)


# ----------------------------------------------------------------------------- graph


@torch.no_grad()
def radius_graph(
    pos: Tensor,
    batch: Tensor,
    n_atoms: Tensor,
    cutoff: float,
    max_neighbors: int,
    rel_tol: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Directed edges src -> dst between atoms of one molecule at distance <= ``cutoff``.

    Each destination atom keeps its ``max_neighbors`` nearest sources (as the EScAIP-like
    model's ``neighbor_list``), plus any source tied within ``rel_tol`` with the k-th nearest,
    so the set is rotation-stable. Distances go through a padded (B, L, L) table (L = largest
    molecule; atoms of a molecule contiguous, molecules in order), never N^2 across molecules.

    Args:
        pos: (N, 3) positions.  batch: (N,) molecule index.  n_atoms: (B,) atoms per molecule.

    Returns:
        (src, dst) int64 tensors (E,), global atom indices.
    """
    n, device = pos.shape[0], pos.device
    offsets = torch.cumsum(n_atoms, 0) - n_atoms
    local = torch.arange(n, device=device) - offsets[batch]
    width = int(n_atoms.max()) if n_atoms.numel() else 1
    padded = pos.new_zeros(n_atoms.shape[0], width, 3)
    padded[batch, local] = pos
    present = torch.zeros(n_atoms.shape[0], width, dtype=torch.bool, device=device)
    present[batch, local] = True
    d = torch.cdist(padded, padded, compute_mode="donot_use_mm_for_euclid_dist")  # (B, L, L)
    eye = torch.eye(width, dtype=torch.bool, device=device)
    ok = present[:, :, None] & present[:, None, :] & ~eye & (d <= cutoff)
    d = d.masked_fill(~ok, math.inf)
    if max_neighbors < width - 1:
        kth = d.topk(max_neighbors, dim=-1, largest=False).values[..., -1:]
        d = d.masked_fill(d > kth * (1 + rel_tol), math.inf)
    mol, i, j = torch.nonzero(torch.isfinite(d), as_tuple=True)
    return offsets[mol] + j, offsets[mol] + i


class RadialBasis(nn.Module):
    """Bessel basis sqrt(2/c) sin(nπr/c)/r, n = 1..n, times the polynomial envelope (p=6)."""

    def __init__(self, n: int, cutoff: float, p: int = 6) -> None:
        super().__init__()
        self.cutoff, self.p = cutoff, p
        self.register_buffer("freq", torch.arange(1, n + 1) * math.pi / cutoff)

    def forward(self, r: Tensor) -> Tensor:
        x = (r / self.cutoff).unsqueeze(-1)
        p = self.p
        env = (
            1
            - (p + 1) * (p + 2) / 2 * x**p
            + p * (p + 2) * x ** (p + 1)
            - p * (p + 1) / 2 * x ** (p + 2)
        )
        env = env * (x < 1)
        bessel = math.sqrt(2 / self.cutoff) * torch.sin(self.freq * r.unsqueeze(-1))
        return env * bessel / r.unsqueeze(-1)


# ----------------------------------------------------------------------------- blocks


_EINSUM = (torch.einsum, torch.functional.einsum)


def prune_dead_einsums(module: nn.Module) -> int:
    """Erase the unused einsums from the fx graphs e3nn generates for ``module``'s submodules.

    e3nn's TensorProduct codegen builds the outer product x1 ⊗ x2 of every input pair before it
    picks a specialised contraction that does not read it, and leaves the unused node for
    TorchScript to drop. Since torch 2.10 e3nn (0.6) runs the fx graphs eagerly (its
    ``jit_mode`` default "eager"), so the dead (E, mul, 1, 3, 3) products ran in every forward
    and training step: about half of this model's forward time on CPU. Only call_function
    einsum nodes without users are erased (pure; the graphs' in-place ``copy_`` nodes stay), so
    the outputs are bit-identical. Scripted modules (e3nn ``jit_mode`` "script") are skipped:
    TorchScript drops dead code itself.

    Returns:
        the number of nodes erased.
    """
    erased = 0
    for mod in module.modules():
        for name in getattr(mod, "__codegen__", ()):
            graph_module = getattr(mod, name)
            if not isinstance(graph_module, torch.fx.GraphModule):
                continue
            dead = [
                node
                for node in graph_module.graph.nodes
                if node.op == "call_function" and node.target in _EINSUM and not node.users
            ]
            for node in dead:
                graph_module.graph.erase_node(node)
            if dead:
                graph_module.recompile()
                erased += len(dead)
    return erased


def hidden_irreps(mul: int, lmax: int) -> o3.Irreps:
    """mul x 0e + mul x 1o + mul x 2e + ... (natural parity)."""
    return o3.Irreps([(mul, (ell, (-1) ** ell)) for ell in range(lmax + 1)])


def _cue_channelwise(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_mid: o3.Irreps):
    """The "uvu" tensor product as cuequivariance's ChannelWiseTensorProduct (e3nn's mul_ir
    layout), filtered to the output irreps the e3nn paths reach; returns it and its output
    irreps (cuequivariance orders the paths by output irrep)."""
    import cuequivariance as cue
    import cuequivariance_torch as cuet

    keep = [cue.O3.from_string(str(ir)) for ir in sorted({ir for _, ir in irreps_mid})]
    tp = cuet.ChannelWiseTensorProduct(
        cue.Irreps("O3", str(irreps_in)),
        cue.Irreps("O3", str(irreps_sh)),
        filter_irreps_out=keep,
        layout=cue.mul_ir,
        shared_weights=False,
        internal_weights=False,
    )
    return tp, o3.Irreps(str(tp.irreps_out))


class Interaction(nn.Module):
    """NequIP convolution + gated nonlinearity; shapes in the module docstring."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_hidden: o3.Irreps,
        cfg: EquivariantConfig,
    ) -> None:
        super().__init__()
        scalars = o3.Irreps([(m, ir) for m, ir in irreps_hidden if ir.l == 0])
        gated = o3.Irreps([(m, ir) for m, ir in irreps_hidden if ir.l > 0])
        self.gate = Gate(
            scalars, [nn.functional.silu], f"{gated.num_irreps}x0e", [torch.sigmoid], gated
        )
        irreps_target = self.gate.irreps_in
        # "uvu" paths: every input channel times every edge harmonic into each reachable
        # output irrep (l <= lmax); one radial weight per (edge, path, channel).
        mid, instructions = [], []
        for i, (m, ir_in) in enumerate(irreps_in):
            for j, (_, ir_sh) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in irreps_target:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((m, ir_out))
        irreps_mid = o3.Irreps(mid)
        self.linear_in = o3.Linear(irreps_in, irreps_in)
        if cfg.kernel == "cuequivariance":
            self.tp, irreps_mid = _cue_channelwise(irreps_in, irreps_sh, irreps_mid)
        else:
            self.tp = o3.TensorProduct(
                irreps_in,
                irreps_sh,
                irreps_mid,
                instructions,
                shared_weights=False,
                internal_weights=False,
            )
        self.radial = nn.Sequential(
            nn.Linear(cfg.n_radial, cfg.radial_hidden),
            nn.SiLU(),
            nn.Linear(cfg.radial_hidden, cfg.radial_hidden),
            nn.SiLU(),
            nn.Linear(cfg.radial_hidden, self.tp.weight_numel),
        )
        self.linear_out = o3.Linear(irreps_mid, irreps_target)
        self.self_connection = o3.Linear(irreps_in, irreps_target)
        self.residual = irreps_in == self.gate.irreps_out
        self.norm = 1 / math.sqrt(cfg.avg_neighbors)
        self.irreps_out = self.gate.irreps_out

    def forward(
        self,
        h: Tensor,
        sh: Tensor,
        radial: Tensor,
        src: Tensor,
        dst: Tensor,
        weights: Tensor | None = None,
    ) -> Tensor:
        """h (N, irreps_in), sh (E, irreps_sh), radial (E, n_radial) -> (N, irreps_out).

        ``weights`` (E, tp.weight_numel): ``self.radial(radial)`` computed by the caller (the
        shared rotated pass computes it once for K rotated copies); None computes it here.
        """
        if weights is None:
            weights = self.radial(radial)
        msg = self.tp(self.linear_in(h)[src], sh, weights)
        agg = torch.zeros(h.shape[0], msg.shape[1], dtype=msg.dtype, device=msg.device)
        agg = agg.index_add(0, dst, msg) * self.norm
        out = self.gate(self.linear_out(agg) + self.self_connection(h))
        return out + h if self.residual else out


def _hooked(module: nn.Module) -> bool:
    """True when a forward (pre-)hook is registered on the module or one of its submodules."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class EquivariantForceField(nn.Module):
    """Energy (B,) and forces (N, 3) from ``pos``/``z``/``batch``/``n_atoms``; exactly equivariant."""

    def __init__(self, cfg: EquivariantConfig) -> None:
        super().__init__()
        if cfg.forces not in ("direct", "gradient"):
            raise ValueError(f"forces={cfg.forces!r}; allowed: 'direct', 'gradient'")
        if cfg.kernel not in KERNELS:
            raise ValueError(f"kernel={cfg.kernel!r}; allowed: {', '.join(KERNELS)}")
        self.cfg = cfg
        self.irreps_sh = o3.Irreps.spherical_harmonics(cfg.lmax)
        irreps_hidden = hidden_irreps(cfg.mul, cfg.lmax)
        self.embed = nn.Embedding(cfg.n_elements, cfg.mul)
        self.radial_basis = RadialBasis(cfg.n_radial, cfg.cutoff)
        blocks, irreps = [], o3.Irreps(f"{cfg.mul}x0e")
        for _ in range(cfg.layers):
            blocks.append(Interaction(irreps, self.irreps_sh, irreps_hidden, cfg))
            irreps = blocks[-1].irreps_out
        self.blocks = nn.ModuleList(blocks)
        self.spectrum_layers = tuple(f"blocks.{i}" for i in range(cfg.layers))  # spectrum probe
        head = "1x0e + 1x1o" if cfg.forces == "direct" else "1x0e"
        self.head = o3.Linear(irreps, head)
        # Gradient mode: F_norm = -s dE_norm/dx, physical when s = σ_E / σ_F. The registry builds
        # the model before the task's normalisation reaches it, so s is one learned scalar
        # (its optimum is σ_E / σ_F); set_force_scale can start it there.
        if cfg.forces == "gradient":
            self.force_scale = nn.Parameter(torch.tensor(1.0))
        prune_dead_einsums(self)

    @property
    def autograd_in_forward(self) -> bool:
        """Gradient forces differentiate inside forward: evaluation must not use inference mode."""
        return self.cfg.forces == "gradient"

    @torch.no_grad()
    def set_force_scale(self, sigma_energy_over_sigma_force: float) -> None:
        """Gradient mode: start s (F_norm = -s dE_norm/dx) at σ_E / σ_F of the task's state."""
        if self.cfg.forces != "gradient":
            raise ValueError("set_force_scale applies to forces='gradient' only")
        self.force_scale.fill_(float(sigma_energy_over_sigma_force))

    def atom_outputs(self, pos: Tensor, z: Tensor, batch: Tensor, n_atoms: Tensor) -> Tensor:
        """Per-atom readout (N, 1) scalars [+ (N, 3) vector in direct mode] -> (N, 1 or 4)."""
        src, dst = radius_graph(pos, batch, n_atoms, self.cfg.cutoff, self.cfg.max_neighbors)
        vec = pos[src] - pos[dst]  # points from the centre atom dst to its neighbour src
        radial = self.radial_basis(vec.norm(dim=-1))
        h = self.embed(z).to(pos.dtype)
        return self._trunk(h, vec, radial, src, dst, [None] * len(self.blocks))

    def _trunk(
        self,
        h: Tensor,
        vec: Tensor,
        radial: Tensor,
        src: Tensor,
        dst: Tensor,
        weights: list[Tensor | None],
    ) -> Tensor:
        """Embedded atoms h (N, mul), edge vectors (E, 3), radial basis (E, n_radial) -> head."""
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        for block, w in zip(self.blocks, weights):
            h = block(h, sh, radial, src, dst, w)
        return self.head(h)

    # Modules run once per rotated copy in forward_rotated (the spectrum probe's hooks on them
    # see K copies); each block's radial MLP runs once per pass unless a hook watches it.
    per_copy_modules = ("blocks", "head")

    @property
    def forward_rotated(self):
        """The shared rotated pass (direct forces only; gradient forces need d/dx through the
        radial part of every copy, so they take K ordinary forwards): see ``_forward_rotated``."""
        return self._forward_rotated if self.cfg.forces == "direct" else None

    def _forward_rotated(
        self, batch: Batch, R: Tensor, plain: bool = True, batched: bool | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """The outputs for K rotated copies of the batch sharing their rotation-invariant work.

        The neighbour graph, the radial basis, each block's radial MLP (the tensor-product
        weights; with the graph about a third of a forward on the CPU) and the embedding depend
        on distances and atom types only, so they are computed once from the unrotated
        positions; every copy k then runs the spherical harmonics of its own rotated positions
        ``rotate_per_example(pos, R[k])`` (the ordinary rotated forward's input), the
        interaction blocks and the head.
        Equal to ``self(rotated batch)`` up to float rounding of the distances (and an edge
        exactly at the cutoff or a tie at the neighbour cap, which rounding could flip); the
        equivariance error stays at float precision, as the rotated spherical harmonics and
        tensor products still round differently per copy. A hook on a block's radial MLP makes
        it run per copy again, so hooks see K copies of every module they watch.

        Args:
            batch: the unrotated batch (module docstring). R: (K, B, 3, 3) rotation per copy
                and molecule. plain: also run the unrotated copy (the plain prediction).
            batched: run the copies as one disjoint graph (True) or one after another (False);
                None: batched on CUDA, one after another on the CPU (equivariance.py's "auto").

        Returns:
            ({"energy": (K, B), "forces": (K, N, 3)} of the rotated copies, in the ROTATED
            frames; {"energy": (B,), "forces": (N, 3)} = ``self(batch)`` or None without
            ``plain``).
        """
        pos, z, index, n_atoms = batch["pos"], batch["z"], batch["batch"], batch["n_atoms"]
        B = n_atoms.shape[0]
        src, dst = radius_graph(pos, index, n_atoms, self.cfg.cutoff, self.cfg.max_neighbors)
        vec = pos[src] - pos[dst]
        radial = self.radial_basis(vec.norm(dim=-1))
        h = self.embed(z).to(pos.dtype)
        weights = [None if _hooked(b.radial) else b.radial(radial) for b in self.blocks]

        vecs = [pos_k[src] - pos_k[dst] for pos_k in rotate_per_example(pos, R, index)]
        if plain:
            vecs.append(vec)
        if batched is None:
            batched = pos.is_cuda
        if batched:  # the copies as one graph of C disjoint copies (one pass: GPU)
            C, N, E = len(vecs), pos.shape[0], src.shape[0]
            shift = torch.arange(C, device=pos.device).repeat_interleave(E) * N
            src_c, dst_c = src.repeat(C) + shift, dst.repeat(C) + shift
            ws = [None if w is None else w.repeat(C, 1) for w in weights]
            out = self._trunk(
                h.repeat(C, 1), torch.cat(vecs), radial.repeat(C, 1), src_c, dst_c, ws
            )
            index_c = index.repeat(C) + torch.arange(C, device=pos.device).repeat_interleave(N) * B
            energy = self._mean_per_molecule(out[:, 0], index_c, n_atoms.repeat(C), C * B)
            energies, forces = list(energy.reshape(C, B)), list(out[:, 1:4].reshape(C, N, 3))
        else:  # copy after copy (CPU: as fast per copy, less memory)
            energies, forces = [], []
            for vec_k in vecs:
                out = self._trunk(h, vec_k, radial, src, dst, weights)
                energies.append(self._mean_per_molecule(out[:, 0], index, n_atoms, B))
                forces.append(out[:, 1:4])
        k = R.shape[0]
        rotated = {"energy": torch.stack(energies[:k]), "forces": torch.stack(forces[:k])}
        if not plain:
            return rotated, None
        return rotated, {"energy": energies[k], "forces": forces[k]}

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        z, index, n_atoms = batch["z"], batch["batch"], batch["n_atoms"]
        B = n_atoms.shape[0]
        if self.cfg.forces == "direct":
            out = self.atom_outputs(batch["pos"], z, index, n_atoms)
            return {
                "energy": self._mean_per_molecule(out[:, 0], index, n_atoms, B),
                "forces": out[:, 1:4],
            }
        keep_graph = torch.is_grad_enabled()  # training / gradient norms need d(forces)/dθ
        with torch.enable_grad():
            pos = batch["pos"]
            if not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            out = self.atom_outputs(pos, z, index, n_atoms)
            energy = self._mean_per_molecule(out[:, 0], index, n_atoms, B)
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=keep_graph)
        forces = -self.force_scale.to(grad.dtype) * grad
        if not keep_graph:
            energy, forces = energy.detach(), forces.detach()
        return {"energy": energy, "forces": forces}

    @staticmethod
    def _mean_per_molecule(e: Tensor, index: Tensor, n_atoms: Tensor, B: int) -> Tensor:
        total = torch.zeros(B, dtype=e.dtype, device=e.device).index_add(0, index, e)
        return total / n_atoms.to(e.dtype).clamp(min=1)
