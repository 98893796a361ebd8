"""A compact EScAIP-like force field: invariant attention over neighbours, direct force head.

Read top to bottom (nanoGPT style): config, neighbour list, geometry features, blocks, heads,
model, sizes. Shapes in comments use N atoms, B molecules, K neighbour slots, H hidden.

The backbone sees only invariants of the geometry (distances, cosines between bond
directions, atom types), so every node and edge feature is rotation invariant. The only
non-equivariant part is the direct force head (PAPER.md):

    F_i = m_i * sum_j c_ij (elementwise) rhat_ij,    c_ij = W h_ij,  W = force_head.linear.weight

with invariant edge features h_ij (E, H), an invariant per-atom magnitude m_i and W (3, H)
Xavier-uniform initialised as upstream. The head is exactly equivariant iff the three rows of W
are equal. ``force_head_features`` returns h, rhat, m so the closed forms can be evaluated.

Batches: ``pos`` (N, 3), ``z`` (N,), ``batch`` (N,) molecule index with atoms of a molecule
contiguous and molecules in order (what ``collate`` and ``repeat`` produce), ``n_atoms`` (B,).
Outputs are in the task's normalised units: ``energy`` (B,) and ``forces`` (N, 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equipipe.models.registry import sized_config

MAGNITUDES = ("softplus", "linear")
EMBED_INITS = ("normal", "uniform")
# Named forms of the model (``form``); ``magnitude``, ``embed_init`` and ``embed_std`` left at
# None take the form's value.
#   upstream: as EScAIP upstream has it (ASK-Berkeley/EScAIP) — a signed linear force magnitude
#     m_i and atom-type embeddings uniform in ±0.001. F = m_i sum_j (W h_ij) rhat_ij is then
#     unchanged under (m, W) -> (-m, -W): the sign symmetry that plausibly shapes the study's
#     early ~20 % plateau. The paper grid (config/paper.yaml) uses this form.
#   cpu: the embedded, CPU-scale form — m_i through a softplus (>= 0) and embeddings N(0, 0.1²).
#     Why: at a few hundred steps with batch 8, the signed m_i flipped sign back and forth while
#     W h_ij did not yet correlate with the forces (1M size: mean m -1.1, +1.3, -1.0 at steps 20,
#     30, 50), reversing what W learned each time (1M: val force MAE 0.94 vs 0.37 eV/A with the
#     softplus after 300 steps); and with ±0.001 (or std 1) type vectors the tiny model had not
#     started to learn forces after 200 steps, with std 0.1 it had. Both are fixes for a short
#     CPU budget, not upstream's model; config/paper.yaml's ablation compares the two forms.
FORMS: dict[str, dict] = {
    "upstream": {"magnitude": "linear", "embed_init": "uniform", "embed_std": 1e-3},
    "cpu": {"magnitude": "softplus", "embed_init": "normal", "embed_std": 0.1},
}


@dataclass(frozen=True)
class EScAIPConfig:
    hidden: int = 128  # H, width of node and edge features
    n_layers: int = 6  # attention blocks
    n_heads: int = 8  # attention heads (hidden % n_heads == 0)
    cutoff: float = 12.0  # neighbour radius, Angstrom
    max_neighbors: int = 20  # K, nearest neighbours kept per atom
    n_elements: int = 119  # atomic numbers 0..118
    # Gaussian distance basis on [0, cutoff], width = spacing (0.047 A at 12 A; upstream uses 600
    # on the same range). Fine enough that the few-hundredths-of-an-A bond-length changes which
    # carry the force move the features (with 32, 0.39 A, the tiny model did not learn forces).
    n_rbf: int = 256
    n_legendre: int = 8  # Legendre orders 0..n_legendre-1 of neighbour-pair cosines
    ffn_mult: int = 8  # block feed-forward width = ffn_mult * H
    readout_mult: int = 3  # per-block readout feed-forward width (0: LayerNorm only)
    head_mult: int = 4  # output-head feed-forward width
    energy_gain: float = 0.1  # Xavier gain of the energy head's last layer (small start)
    form: str = "cpu"  # "upstream" | "cpu" (FORMS): sets the three fields below when they are None
    # atom-type embedding init scale: the std ("normal") or the half-width ("uniform")
    embed_std: float | None = None
    embed_init: str | None = None  # "normal" | "uniform"
    magnitude: str | None = None  # force magnitude m_i: "softplus" (>= 0) | "linear" (signed)

    def __post_init__(self) -> None:
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by n_heads={self.n_heads}")
        if self.form not in FORMS:
            raise ValueError(f"form={self.form!r} is unknown; allowed: {', '.join(FORMS)}")
        for key, allowed in (("magnitude", MAGNITUDES), ("embed_init", EMBED_INITS)):
            if self.get(key) not in allowed:
                raise ValueError(
                    f"{key}={self.get(key)!r} is unknown; allowed: {', '.join(allowed)}"
                )

    def get(self, key: str):
        """A field of the form (``magnitude``, ``embed_init``, ``embed_std``): the value set, or
        the form's when it is None."""
        value = getattr(self, key)
        return FORMS[self.form][key] if value is None else value


# --------------------------------------------------------------------------------------------
# Neighbour list and invariant geometry


def neighbor_list(
    pos: Tensor, batch: Tensor, n_atoms: Tensor, cutoff: float, max_neighbors: int
) -> tuple[Tensor, Tensor]:
    """Per atom, the ``max_neighbors`` nearest other atoms of the same molecule within ``cutoff``.

    Vectorised through a padded (B, L, L) distance table (L = largest molecule), so memory is
    B * L^2, never N^2 across molecules. Returns ``idx`` (N, K) global neighbour indices (padding
    slots point at the atom itself) and ``mask`` (N, K) bool, K = min(max_neighbors, L - 1),
    slots sorted by distance. Only distances enter the choice: invariant under rotation
    (up to exact ties at the K-th place).
    """
    n, device = pos.shape[0], pos.device
    n_mol = n_atoms.shape[0]
    offsets = torch.cumsum(n_atoms, 0) - n_atoms
    local = torch.arange(n, device=device) - offsets[batch]  # position inside its molecule
    width = int(n_atoms.max()) if n_mol else 1
    padded = pos.new_zeros(n_mol, width, 3)
    padded[batch, local] = pos
    present = torch.zeros(n_mol, width, dtype=torch.bool, device=device)
    present[batch, local] = True
    dist = (padded[:, :, None, :] - padded[:, None, :, :]).norm(dim=-1)  # (B, L, L)
    eye = torch.eye(width, dtype=torch.bool, device=device)
    ok = present[:, :, None] & present[:, None, :] & ~eye & (dist <= cutoff)
    dist = dist.masked_fill(~ok, math.inf)
    k = max(1, min(max_neighbors, width - 1))
    d_k, j_k = dist.topk(k, dim=-1, largest=False)  # (B, L, k), nearest first
    d_k, j_k = d_k[batch, local], j_k[batch, local]  # (N, k)
    mask = torch.isfinite(d_k)
    self_idx = torch.arange(n, device=device)[:, None]
    idx = torch.where(mask, offsets[batch][:, None] + j_k, self_idx)
    return idx, mask


def gaussian_basis(arg: Tensor) -> Tensor:
    """exp(arg) for arg <= 0, with values below 1.65 x the smallest normal float set to 0.

    Most entries of a narrow Gaussian basis (width 0.047 A over 12 A) have arguments far below
    log(smallest normal float) (-87.3 in float32), where torch's CPU exp takes a slow path
    (measured: 190 ms instead of 2 ms for one batch's 1.6M entries, ~10 % of a training step).
    Their values are below 2e-38 (float32) or subnormal or 0 anyway; here they are exactly 0.
    """
    lo = math.log(torch.finfo(arg.dtype).tiny) + 0.5
    return torch.where(arg >= lo, torch.exp(arg.clamp_min(lo)), 0.0)


def legendre(x: Tensor, n: int) -> Tensor:
    """P_0..P_{n-1}(x) stacked on a new last axis (Bonnet's recursion)."""
    ps = [torch.ones_like(x), x]
    for ell in range(1, n - 1):
        ps.append(((2 * ell + 1) * x * ps[ell] - ell * ps[ell - 1]) / (ell + 1))
    return torch.stack(ps[:n], dim=-1)


class Geometry:
    """Invariant descriptors of each atom's neighbourhood, plus the unit bond directions.

    Attributes: idx, mask (N, K); rhat (N, K, 3) unit vectors i->j (0 on padding);
    rbf (N, K, n_rbf) Gaussian distance basis times a cosine envelope; angular (N, K, K, n_leg)
    Legendre polynomials of cos(angle j-i-k); edge_ang (N, K, n_leg) envelope-weighted mean over
    k of the Legendre terms (bond-orientational moments seen from bond ij); node_boo (N, n_leg)
    the atom's bond-orientational order parameters (Steinhardt-like q_l^2 up to constants).
    """

    def __init__(self, batch: dict[str, Tensor], cfg: EScAIPConfig, centres: Tensor):
        pos = batch["pos"]
        self.idx, self.mask = neighbor_list(
            pos, batch["batch"], batch["n_atoms"], cfg.cutoff, cfg.max_neighbors
        )
        maskf = self.mask.to(pos.dtype)
        vec = pos[self.idx] - pos[:, None, :]  # (N, K, 3)
        dist = torch.where(self.mask, vec.norm(dim=-1), torch.full_like(maskf, cfg.cutoff))
        self.rhat = vec / dist.clamp_min(1e-9)[..., None] * maskf[..., None]
        envelope = 0.5 * (torch.cos(math.pi * dist / cfg.cutoff) + 1.0) * maskf  # (N, K)
        spacing = cfg.cutoff / (cfg.n_rbf - 1)
        self.rbf = gaussian_basis(-0.5 * ((dist[..., None] - centres) / spacing) ** 2)
        self.rbf = self.rbf * envelope[..., None]
        cosines = self.rhat @ self.rhat.transpose(1, 2)  # (N, K, K)
        self.angular = legendre(cosines, cfg.n_legendre)  # (N, K, K, n_leg)
        weight_sum = envelope.sum(1).clamp_min(1e-6)  # (N,)
        self.edge_ang = (
            torch.einsum("nkjl,nk->njl", self.angular, envelope) / weight_sum[:, None, None]
        )
        self.node_boo = torch.einsum("njl,nj->nl", self.edge_ang, envelope) / weight_sum[:, None]
        # Attention may only look at real neighbours; an atom without any keeps slot 0 open so
        # the softmax stays finite (its outputs are masked away anyway).
        keys = self.mask.clone()
        keys[:, 0] |= ~self.mask.any(1)
        self.key_bias = torch.zeros_like(maskf).masked_fill(~keys, -math.inf)[:, None, None, :]

    def mean_over_neighbors(self, x: Tensor) -> Tensor:
        """Masked mean over the K axis of (N, K, C) -> (N, C)."""
        m = self.mask.to(x.dtype)[..., None]
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# Building blocks


class FeedForward(nn.Module):
    """Linear(H -> mult*H), GELU, Linear(mult*H -> H)."""

    def __init__(self, hidden: int, mult: int):
        super().__init__()
        self.up = nn.Linear(hidden, mult * hidden)
        self.down = nn.Linear(mult * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class NeighborAttention(nn.Module):
    """Multi-head self-attention among the K neighbour slots of each atom.

    Messages mix the edge state with the centre's and the neighbour's node states; the
    attention logits get a per-head bias from the Legendre terms of the cosine between the two
    neighbours' bond directions (geometry-aware, invariant).
    """

    def __init__(self, cfg: EScAIPConfig):
        super().__init__()
        h = cfg.hidden
        self.n_heads = cfg.n_heads
        # message = W_e edge + W_c node_i + W_n node_j: one Linear(3H -> H) on the concatenation,
        # split so the node terms are computed once per atom instead of once per edge.
        self.message_edge = nn.Linear(h, h)
        self.message_centre = nn.Linear(h, h, bias=False)
        self.message_neighbor = nn.Linear(h, h, bias=False)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.angle_bias = nn.Linear(cfg.n_legendre, cfg.n_heads, bias=False)

    def forward(self, node: Tensor, edge: Tensor, geo: Geometry) -> Tensor:
        n, k, h = edge.shape
        msg = self.message_edge(edge) + self.message_centre(node)[:, None, :]
        msg = F.gelu(msg + self.message_neighbor(node)[geo.idx])
        q, kk, v = self.qkv(msg).view(n, k, 3, self.n_heads, h // self.n_heads).unbind(2)
        q, kk, v = (t.transpose(1, 2) for t in (q, kk, v))  # (N, heads, K, d)
        bias = self.angle_bias(geo.angular).permute(0, 3, 1, 2) + geo.key_bias  # (N, heads, K, K)
        out = F.scaled_dot_product_attention(q, kk, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(n, k, h))


class Block(nn.Module):
    """Pre-LayerNorm block on (node, edge) states: neighbour attention, then feed-forwards."""

    def __init__(self, cfg: EScAIPConfig):
        super().__init__()
        h = cfg.hidden
        self.ln_node, self.ln_edge = nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn = NeighborAttention(cfg)
        self.ln_node_ffn, self.ln_edge_ffn = nn.LayerNorm(h), nn.LayerNorm(h)
        self.ffn_node, self.ffn_edge = FeedForward(h, cfg.ffn_mult), FeedForward(h, cfg.ffn_mult)

    def forward(self, node: Tensor, edge: Tensor, geo: Geometry) -> tuple[Tensor, Tensor]:
        edge_out = self.attn(self.ln_node(node), self.ln_edge(edge), geo)
        node = node + geo.mean_over_neighbors(edge_out)
        edge = edge + edge_out
        node = node + self.ffn_node(self.ln_node_ffn(node))
        edge = edge + self.ffn_edge(self.ln_edge_ffn(edge))
        return node, edge


class Readout(nn.Module):
    """Per-block readout of node and edge states (x + FFN(LN(x)), or LN(x) when mult=0)."""

    def __init__(self, hidden: int, mult: int):
        super().__init__()
        self.ln_node, self.ln_edge = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ffn_node = FeedForward(hidden, mult) if mult else None
        self.ffn_edge = FeedForward(hidden, mult) if mult else None

    def forward(self, node: Tensor, edge: Tensor) -> tuple[Tensor, Tensor]:
        if self.ffn_node is None:
            return self.ln_node(node), self.ln_edge(edge)
        return node + self.ffn_node(self.ln_node(node)), edge + self.ffn_edge(self.ln_edge(edge))


class ForceHead(nn.Module):
    """Direct, NON-equivariant force head: F_i = m_i * sum_j (W h_ij) * rhat_ij.

    ``ffn`` maps the invariant edge state to h_ij; ``linear`` is W (3, H), no bias, Xavier-uniform
    (head deviation ~0.0102 at H=128); ``magnitude`` gives the invariant per-atom m_i: signed
    and linear (``"linear"``, upstream; F is unchanged under (m, W) -> (-m, -W)) or through a
    softplus (``"softplus"``, the CPU-scale form, which removes that symmetry; why: FORMS).
    """

    def __init__(self, hidden: int, mult: int, magnitude: str = "softplus"):
        super().__init__()
        self.ffn = FeedForward(hidden, mult)
        self.linear = nn.Linear(hidden, 3, bias=False)
        nn.init.xavier_uniform_(self.linear.weight)  # upstream; PyTorch's default is ~6x smaller
        self.magnitude = nn.Sequential(FeedForward(hidden, mult), nn.Linear(hidden, 1))
        self.magnitude_kind = magnitude

    def magnitudes(self, node: Tensor) -> Tensor:
        """Per-atom m_i (N,)."""
        m = self.magnitude(node).squeeze(-1)
        return F.softplus(m) if self.magnitude_kind == "softplus" else m

    def forward(self, node: Tensor, edge: Tensor, geo: Geometry) -> Tensor:
        c = self.linear(self.ffn(edge))  # (N, K, 3); rhat is 0 on padding
        return self.magnitudes(node)[:, None] * (c * geo.rhat).sum(1)


# --------------------------------------------------------------------------------------------
# The model


class EScAIP(nn.Module):
    # The spectrum probe records no hidden layer: the backbone sees only invariants, so every
    # node and edge feature is exactly ℓ = 0 by construction (the figures say so).
    spectrum_layers: tuple[str, ...] = ()

    def __init__(self, cfg: EScAIPConfig):
        super().__init__()
        self.cfg = cfg
        h, n_leg = cfg.hidden, cfg.n_legendre
        self.register_buffer(
            "rbf_centres", torch.linspace(0.0, cfg.cutoff, cfg.n_rbf), persistent=False
        )
        self.embed_centre = nn.Embedding(cfg.n_elements, h)
        self.embed_neighbor = nn.Embedding(cfg.n_elements, h)
        self.edge_geometry = nn.Linear(cfg.n_rbf + n_leg, h)
        self.node_geometry = nn.Linear(n_leg, h, bias=False)
        self.ln_in = nn.LayerNorm(h)
        self.ffn_in = FeedForward(h, 1)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.readouts = nn.ModuleList(Readout(h, cfg.readout_mult) for _ in range(cfg.n_layers + 1))
        n_cat = (cfg.n_layers + 1) * h
        self.ln_cat_node, self.ln_cat_edge = nn.LayerNorm(n_cat), nn.LayerNorm(n_cat)
        self.proj_node, self.proj_edge = nn.Linear(n_cat, h), nn.Linear(n_cat, h)
        self.ln_out_node, self.ln_out_edge = nn.LayerNorm(h), nn.LayerNorm(h)
        self.energy_head = nn.Sequential(FeedForward(h, cfg.head_mult), nn.Linear(h, 1))
        self.force_head = ForceHead(h, cfg.head_mult, cfg.get("magnitude"))
        self._init_weights()

    def _init_weights(self) -> None:
        # Upstream: Xavier-uniform linear weights, zero biases; small gain on the energy output.
        # Atom-type embeddings start small (the form's: uniform ±0.001 upstream, N(0, 0.1²) in
        # the CPU-scale form) so the distance basis, not the N(0, 1) type vectors of PyTorch's
        # default, dominates the first edge states.
        scale = float(self.cfg.get("embed_std"))
        for emb in (self.embed_centre, self.embed_neighbor):
            if self.cfg.get("embed_init") == "uniform":
                nn.init.uniform_(emb.weight, -scale, scale)
            else:
                nn.init.normal_(emb.weight, std=scale)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.energy_head[-1].weight, gain=self.cfg.energy_gain)

    def trunk(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Geometry]:
        """Invariant node (N, H) and edge (N, K, H) features and the geometry they came from."""
        pos = batch["pos"]
        # Geometry in full precision even under bf16 autocast (cosines, Legendre terms).
        with torch.autocast(device_type=pos.device.type, enabled=False):
            geo = Geometry(batch, self.cfg, self.rbf_centres.to(pos.dtype))
        z = batch["z"]
        # Input edge state: a linear map of [type_i, type_j, distance basis, angular moments of
        # the bond, order parameters of atom i], written as a sum of per-part terms.
        centre = self.embed_centre(z) + self.node_geometry(geo.node_boo)  # (N, H)
        edge = self.edge_geometry(torch.cat([geo.rbf, geo.edge_ang], dim=-1))
        edge = edge + centre[:, None, :] + self.embed_neighbor(z)[geo.idx]
        edge = edge + self.ffn_in(self.ln_in(edge))
        node = geo.mean_over_neighbors(edge)
        reads = [self.readouts[0](node, edge)]
        for block, readout in zip(self.blocks, self.readouts[1:]):
            node, edge = block(node, edge, geo)
            reads.append(readout(node, edge))
        node = torch.cat([r[0] for r in reads], dim=-1)
        edge = torch.cat([r[1] for r in reads], dim=-1)
        node = self.ln_out_node(F.gelu(self.proj_node(self.ln_cat_node(node))))
        edge = self.ln_out_edge(F.gelu(self.proj_edge(self.ln_cat_edge(edge))))
        return node, edge, geo

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        node, edge, geo = self.trunk(batch)
        per_atom = self.energy_head(node).squeeze(-1).to(batch["pos"].dtype)  # (N,), fp32 sum
        n_mol = batch["n_atoms"].shape[0]
        energy = per_atom.new_zeros(n_mol).index_add_(0, batch["batch"], per_atom)
        energy = energy / batch["n_atoms"].to(per_atom.dtype)
        return {"energy": energy, "forces": self.force_head(node, edge, geo)}

    def forward_rotated(
        self, batch: dict[str, Tensor], R: Tensor, plain: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """The outputs for K rotated copies of the batch from ONE trunk pass, and the plain output.

        The trunk sees only invariants of the geometry (distances, cosines, types), so its node
        and edge states are the same for every rotated copy; only the head's bond directions
        turn: F_i(R x) = m_i * sum_j (W h_ij) * (R rhat_ij). So copy k costs one head
        evaluation instead of a forward pass. Equal to ``self(rotated batch)`` up to float
        rounding of the trunk's inputs (and exact ties at the K-th neighbour, which a rotated
        copy could break the other way).

        Args:
            batch: the unrotated batch (module docstring). R: (K, B, 3, 3) rotation per copy and
                molecule. plain: also return the unrotated output.

        Returns:
            ({"energy": (K, B), "forces": (K, N, 3)} of the rotated copies, in the ROTATED
            frames; {"energy": (B,), "forces": (N, 3)} = ``self(batch)``, None without ``plain``).
        """
        node, edge, geo = self.trunk(batch)
        per_atom = self.energy_head(node).squeeze(-1).to(batch["pos"].dtype)
        n_mol = batch["n_atoms"].shape[0]
        energy = per_atom.new_zeros(n_mol).index_add_(0, batch["batch"], per_atom)
        energy = energy / batch["n_atoms"].to(per_atom.dtype)
        head = self.force_head
        c = head.linear(head.ffn(edge))  # (N, K_nb, 3), shared by every copy
        m = head.magnitudes(node)  # (N,)
        Ra = R.to(geo.rhat)[:, batch["batch"]]  # (K, N, 3, 3)
        turned = torch.einsum("knij,nsj->knsi", Ra, geo.rhat)  # (K, N, K_nb, 3)
        forces = m[None, :, None] * (c[None] * turned).sum(2)  # (K, N, 3)
        k = R.shape[0]
        rotated = {"energy": energy[None].expand(k, n_mol), "forces": forces}
        if not plain:
            return rotated, None
        unrotated = m[:, None] * (c * geo.rhat).sum(1)  # exactly the forward's head
        return rotated, {"energy": energy, "forces": unrotated}

    def force_head_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the force head sees, flattened over the E real edges.

        Returns h (E, H) invariant edge features entering W, rhat (E, 3) unit bond directions,
        m (N,) per-atom magnitudes, edge_atom (E,) index of atom i, edge_neighbor (E,) index of
        atom j, weight (3, H) = W, and forces (N, 3) = the model's forces, so that
        forces[i] = m[i] * sum_{e: edge_atom[e] = i} (W h[e]) * rhat[e].
        """
        node, edge, geo = self.trunk(batch)
        mask = geo.mask
        n, k = mask.shape
        head = self.force_head
        return {
            "h": head.ffn(edge)[mask],
            "rhat": geo.rhat[mask],
            "m": head.magnitudes(node),
            "edge_atom": torch.arange(n, device=mask.device)[:, None].expand(n, k)[mask],
            "edge_neighbor": geo.idx[mask],
            "weight": head.linear.weight,
            "forces": head(node, edge, geo),
        }


# --------------------------------------------------------------------------------------------
# Sizes (parameter counts within 10 % of the label; checked in tests/test_escaip.py)

SIZE_CONFIGS: dict[str, dict] = {
    "tiny": dict(hidden=64, n_layers=2, n_heads=4, ffn_mult=2, readout_mult=0, head_mult=1),
    "1M": dict(hidden=64, n_layers=4, n_heads=4),
    "4M": dict(hidden=128, n_layers=4, n_heads=8),
    "6M": dict(hidden=128, n_layers=6, n_heads=8, cutoff=12.0, max_neighbors=20),
}
SIZES: tuple[str, ...] = tuple(SIZE_CONFIGS)


def config_for(size: str, **overrides) -> EScAIPConfig:
    """The config of a named size with field overrides (errors name the allowed values)."""
    return sized_config("escaip", EScAIPConfig(), SIZE_CONFIGS, size, overrides)


def build(size: str, **overrides) -> EScAIP:
    """Registry entry point: ``build("6M", cutoff=6.0)``."""
    return EScAIP(config_for(size, **overrides))
