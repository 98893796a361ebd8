"""A compact Proteína-like flow-matching transformer over C-alpha tokens.

Read top to bottom (nanoGPT style): config, features, blocks, pair updates, model, sizes.
Shapes: B chains, L residues (padded), d token width, p pair width, H heads. Coordinates are
in nm, as in the store and the task.

What the network sees and where equivariance can break:

- tokens: a raw-coordinate ``Linear(3 -> d)`` of the noisy chain ``x_t`` and another of the
  self-conditioning estimate ``x_sc`` (zeros when off), plus a sinusoidal residue index and
  the chain-break flag. The two coordinate embeddings are NOT rotation invariant;
- pairs: one-hot binned distances of ``x_t`` and of ``x_sc`` (0.1-3 nm) and the relative
  sequence separation (clipped to +-63): all rotation invariant; they bias the attention;
- conditioning: the flow time t through adaLN (scale/shift) and sigmoid output gates;
- optional pair updates every ``tri_every`` layers: outer sum of projected tokens, triangle
  multiplicative updates (outgoing and incoming) and a pair transition;
- output: ``decoder`` = LayerNorm + ``Linear(d -> 3)`` (``model.decoder.linear``, the head the
  landscape analysis perturbs), read as the velocity v(x_t, t) in nm per unit time.

So the only non-equivariant parts are the coordinate embeddings and the decoder (DESIGN.md).
Sizes: ``60M`` (d 512, 10 layers, 8 heads, pair 256, no pair updates), ``400M`` (d 1024,
18 layers, 16 heads, pair 512, triangle updates every 5 layers: before layers 0, 5, 10, 15),
``tiny`` (d 64, 2 layers: ~0.2M parameters for CPU runs). Bin counts, distance range,
conditioning widths and the triangle width 196 follow the upstream Proteína configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equipipe.models.attention import biased_attention
from equipipe.models.registry import sized_config


@dataclass(frozen=True)
class ProteinaConfig:
    dim: int = 512  # d, token width
    n_layers: int = 10
    n_heads: int = 8
    pair_dim: int = 256  # p
    cond_dim: int = 512  # width of the time-conditioning vector (adaLN input)
    t_emb_dim: int = 256  # sinusoidal features of t
    idx_emb_dim: int = 128  # sinusoidal features of the residue index
    xt_dist_bins: int = 64  # one-hot bins of |x_t,i - x_t,j|
    sc_dist_bins: int = 128  # one-hot bins of |x_sc,i - x_sc,j|
    dist_min: float = 0.1  # nm, first bin edge
    dist_max: float = 3.0  # nm, last bin edge
    seq_sep_bins: int = 127  # relative separation i - j clipped to +-(bins // 2)
    ffn_mult: int = 4  # SwiGLU hidden width = ffn_mult * d
    tri_every: int = 0  # pair update (with triangle multiplication) every n layers; 0: none
    tri_dim: int = 196  # hidden width of the triangle multiplicative updates
    pair_ffn_mult: int = 4  # pair transition width = pair_ffn_mult * p
    qk_norm: bool = True  # LayerNorm on queries and keys (stabilises large models)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.seq_sep_bins < 5 or self.seq_sep_bins % 2 == 0:
            raise ValueError(f"seq_sep_bins={self.seq_sep_bins} must be odd and >= 5")


# --------------------------------------------------------------------------------------------
# features


def sinusoidal(x: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sin/cos features of a scalar per entry: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half
    )
    angles = x.float()[..., None] * freqs
    out = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(out, (0, dim - 2 * half))


def distance_bins(x: Tensor, bins: int, lo: float, hi: float) -> Tensor:
    """Bin index of every pairwise distance: (B, L, 3) -> (B, L, L) long in [0, bins).

    Edges are ``linspace(lo, hi, bins - 1)``: below ``lo`` is bin 0, beyond ``hi`` the last.
    An embedding lookup of this index equals a Linear map of the one-hot bins (cheaper).
    """
    d = torch.cdist(x.float(), x.float())
    edges = torch.linspace(lo, hi, bins - 1, device=x.device)
    return uniform_bucketize(d, edges, lo, (hi - lo) / (bins - 2))


def uniform_bucketize(d: Tensor, edges: Tensor, lo: float, step: float) -> Tensor:
    """``torch.bucketize(d, edges)`` (the number of edges < d) for evenly spaced edges
    ``edges[i] ~ lo + i * step``, exactly: the arithmetic guess ceil((d - lo) / step) is off by
    at most one near an edge (rounding) and is corrected against the edges themselves. Measured
    ~0.6x the binary search on CPU for the model's (B, L, L) distances. d: float, any shape."""
    n = edges.numel()
    i = ((d - lo) / step).ceil_().clamp_(0, n).nan_to_num_(n).long()  # NaN: last, as bucketize
    inf = torch.full((1,), float("inf"), device=d.device, dtype=edges.dtype)
    ext = torch.cat([-inf, edges, inf])  # ext[j] = edges[j - 1]
    i -= (ext.take(i) >= d).long()  # edges[i - 1] is not below d: one bin lower
    i += (ext.take(i + 1) < d).long()  # edges[i] is below d: one bin higher
    return i


def separation_bins(n: int, bins: int, device) -> Tensor:
    """Bin index of the sequence separation j - i clipped to +-(bins // 2): (L, L) long."""
    idx = torch.arange(n, device=device)
    half = bins // 2
    return (idx[None, :] - idx[:, None]).clamp(-half, half) + half


# --------------------------------------------------------------------------------------------
# blocks


class AdaLN(nn.Module):
    """LayerNorm without affine, then scale and shift predicted from the conditioning."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.to_scale_shift = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.to_scale_shift(cond)[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class OutputGate(nn.Module):
    """sigmoid(W c + b) per channel; b = -2 so residual branches start small (adaLN-Zero-like)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, -2.0)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return x * torch.sigmoid(self.linear(cond))[:, None]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim, bias=False)
        self.proj_out = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # the two halves of proj_in as two GEMMs (the same map as proj_in(x).chunk(2)): with
        # autograd, no concatenation of their gradients (a (B, L, 2 * mult * d) copy) per backward
        w_a, w_b = self.proj_in.weight.chunk(2, dim=0)
        a, b = F.linear(x, w_a), F.linear(x, w_b)
        if torch.is_grad_enabled():
            return self.proj_out(F.silu(a) * b)
        return self.proj_out(F.silu(a).mul_(b))  # the same values, one buffer fewer


class PairBiasedAttention(nn.Module):
    """Multi-head self-attention with a per-head bias read from the pair representation."""

    def __init__(self, cfg: ProteinaConfig):
        super().__init__()
        self.h = cfg.n_heads
        self.dh = cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = nn.LayerNorm(self.dh) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.dh) if cfg.qk_norm else nn.Identity()
        # Reads the pair after a shared affine-free LayerNorm: a per-layer affine LayerNorm
        # followed by this Linear is the same family of maps (the affine folds into W, b).
        self.pair_to_bias = nn.Linear(cfg.pair_dim, cfg.n_heads)

    def bias(self, pair_normed: Tensor, key_mask: Tensor) -> Tensor:
        """Attention bias (B, H, L, L) from the pair; padded keys -inf."""
        bias = self.pair_to_bias(pair_normed).permute(0, 3, 1, 2)  # (B, H, L, L)
        # Padded keys get -inf; every query still sees >= 1 real residue, so no row is all -inf.
        return bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))

    def bias_from_table(self, table_normed: Tensor, index: Tensor, key_mask: Tensor) -> Tensor:
        """``self.bias`` of a pair that takes few distinct values, read from their table.

        Args:
            table_normed: (B, N, p) the normalised pair vector of each of N feature combinations.
            index: (B, L, L) long, the combination of each pair entry.
            key_mask: (B, L) bool.

        Returns:
            (B, H, L, L), the same as ``self.bias`` of the gathered pair: the Linear runs on the
            N table rows instead of the L^2 entries. Padded keys read an appended -inf entry
            (no masked copy of the (B, H, L, L) bias).
        """
        B, L, _ = index.shape
        table = self.pair_to_bias(table_normed).transpose(1, 2)  # (B, H, N)
        n = table.shape[-1]
        table = F.pad(table, (0, 1), value=float("-inf"))  # entry n: a padded key
        index = torch.where(key_mask[:, None, :], index, n)
        flat = index.reshape(B, 1, L * L).expand(B, self.h, L * L)
        return torch.gather(table, 2, flat).view(B, self.h, L, L)

    def forward(
        self, x: Tensor, pair_normed: Tensor | None, key_mask: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        """``bias``: a precomputed ``self.bias(...)`` (then ``pair_normed`` is not read). A bias
        of B' < B chains is shared by the B // B' copies of x (copy-major: row k * B' + b reads
        bias b). Measured on CPU: with autograd, ``biased_attention`` (written-out backward;
        SDPA's math path is slower) with the bias broadcast over the copies; without, SDPA's
        fused kernel (faster than the written-out form), called once per copy with the shared
        bias (4-D only; a repeated bias is a fresh K-fold buffer, measured slower)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = (self.bias(pair_normed, key_mask) if bias is None else bias).to(q.dtype)
        if torch.is_grad_enabled():  # (not requires_grad: torch.func's wrapped tensors hide it)
            if bias.shape[0] != B:
                q, k, v = (a.unflatten(0, (-1, bias.shape[0])) for a in (q, k, v))
            out = biased_attention(q, k, v, bias).reshape(B, self.h, L, -1)
        elif bias.shape[0] != B:  # one fused call per copy: no K-fold (B, H, L, L) bias copy
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(*qkv, attn_mask=bias)
                    for qkv in zip(*(a.unflatten(0, (-1, bias.shape[0])) for a in (q, k, v)))
                ]
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    """adaLN pre-norm transformer block: pair-biased attention, then a SwiGLU transition."""

    def __init__(self, cfg: ProteinaConfig):
        super().__init__()
        self.norm_attn = AdaLN(cfg.dim, cfg.cond_dim)
        self.attn = PairBiasedAttention(cfg)
        self.gate_attn = OutputGate(cfg.dim, cfg.cond_dim)
        self.norm_ffn = AdaLN(cfg.dim, cfg.cond_dim)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_mult)
        self.gate_ffn = OutputGate(cfg.dim, cfg.cond_dim)

    def forward(
        self,
        x: Tensor,
        pair_normed: Tensor | None,
        cond: Tensor,
        mask: Tensor,
        bias: Tensor | None = None,
    ) -> Tensor:
        x = x + self.gate_attn(self.attn(self.norm_attn(x, cond), pair_normed, mask, bias), cond)
        if torch.is_grad_enabled():
            x = x + self.gate_ffn(self.ffn(self.norm_ffn(x, cond)), cond)
            return x * mask[..., None]
        # without autograd: the same arithmetic in place on this block's own buffer
        x += self.gate_ffn(self.ffn(self.norm_ffn(x, cond)), cond)
        return x.mul_(mask[..., None])


class TriangleMultiplication(nn.Module):
    """AF2-style triangle multiplicative update, ``outgoing`` (sum_k a_ik b_jk) or incoming."""

    def __init__(self, pair_dim: int, hidden: int, outgoing: bool):
        super().__init__()
        self.outgoing = outgoing
        self.norm_in = nn.LayerNorm(pair_dim)
        self.proj = nn.Linear(pair_dim, 2 * hidden)
        self.gate = nn.Linear(pair_dim, 2 * hidden)
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, pair_dim)
        self.gate_out = nn.Linear(pair_dim, pair_dim)

    def forward(self, z: Tensor, pair_mask: Tensor) -> Tensor:
        z = self.norm_in(z)
        ab = self.proj(z) * torch.sigmoid(self.gate(z)) * pair_mask[..., None]
        a, b = ab.chunk(2, dim=-1)
        if self.outgoing:
            x = torch.einsum("bikc,bjkc->bijc", a, b)
        else:
            x = torch.einsum("bkic,bkjc->bijc", a, b)
        return self.proj_out(self.norm_out(x)) * torch.sigmoid(self.gate_out(z))


class PairUpdate(nn.Module):
    """Tokens -> pair (outer sum), triangle updates out and in, pair transition."""

    def __init__(self, cfg: ProteinaConfig):
        super().__init__()
        self.seq_norm = nn.LayerNorm(cfg.dim)
        self.seq_to_pair = nn.Linear(cfg.dim, 2 * cfg.pair_dim, bias=False)
        self.tri_out = TriangleMultiplication(cfg.pair_dim, cfg.tri_dim, outgoing=True)
        self.tri_in = TriangleMultiplication(cfg.pair_dim, cfg.tri_dim, outgoing=False)
        self.transition_norm = nn.LayerNorm(cfg.pair_dim)
        self.transition = SwiGLU(cfg.pair_dim, cfg.pair_ffn_mult)

    def forward(self, x: Tensor, pair: Tensor, pair_mask: Tensor) -> Tensor:
        u, v = self.seq_to_pair(self.seq_norm(x)).chunk(2, dim=-1)
        pair = pair + u[:, :, None] + v[:, None, :]
        pair = pair + self.tri_out(pair, pair_mask)
        pair = pair + self.tri_in(pair, pair_mask)
        pair = pair + self.transition(self.transition_norm(pair))
        return pair * pair_mask[..., None]


class Decoder(nn.Module):
    """LayerNorm + Linear(d -> 3): the non-equivariant coordinate head (``decoder.linear``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


# --------------------------------------------------------------------------------------------
# model


class Proteina(nn.Module):
    def __init__(self, cfg: ProteinaConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.pair_dim
        # conditioning on t
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.t_emb_dim, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim)
        )
        # tokens
        self.embed_xt = nn.Linear(3, d)  # raw coordinates: not rotation invariant
        self.embed_sc = nn.Linear(3, d)  # raw self-conditioning coordinates: idem
        self.embed_idx = nn.Linear(cfg.idx_emb_dim, d)
        self.embed_break = nn.Linear(1, d, bias=False)
        # pairs (invariant features): a lookup per binned feature = Linear of the one-hot bins
        self.pair_xt = nn.Embedding(cfg.xt_dist_bins, p)
        self.pair_sc = nn.Embedding(cfg.sc_dist_bins, p)
        self.pair_sep = nn.Embedding(cfg.seq_sep_bins, p)
        self.pair_time = nn.Linear(cfg.cond_dim, p)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        n_updates = len(range(0, cfg.n_layers, cfg.tri_every)) if cfg.tri_every else 0
        self.pair_updates = nn.ModuleList(PairUpdate(cfg) for _ in range(n_updates))
        self.decoder = Decoder(d)
        # modules forward_rotated runs once per rotated copy (the spectrum probe may hook them)
        self.per_copy_modules = ("embed_xt", "blocks", "decoder")
        # hidden features probed by equipipe.spectrum_probe (eval.spectrum_layers overrides):
        # the raw-coordinate token embedding, every trunk block, the decoder's (velocity) output
        self.spectrum_layers = (
            "embed_xt",
            *(f"blocks.{i}" for i in range(cfg.n_layers)),
            "decoder",
        )

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        mask: Tensor,
        x_sc: Tensor | None = None,
        chain_break: Tensor | None = None,
    ) -> Tensor:
        """Velocity (B, L, 3) in nm per unit time; zero at padding.

        Args:
            x_t: (B, L, 3) noisy coordinates, nm. t: (B,) flow time in [0, 1].
            mask: (B, L) bool, real residues. x_sc: (B, L, 3) self-conditioning x1 estimate
            (None = zeros). chain_break: (B, L) bool.
        """
        cfg = self.cfg
        B, L, _ = x_t.shape
        maskf = mask.to(x_t.dtype)
        breaks = torch.zeros_like(maskf) if chain_break is None else chain_break.to(x_t.dtype)
        cond = self.time_mlp(sinusoidal(t * 1000.0, cfg.t_emb_dim).to(x_t.dtype))

        idx = sinusoidal(torch.arange(L, device=x_t.device).expand(B, L), cfg.idx_emb_dim).to(
            x_t.dtype
        )
        x = self.embed_xt(x_t) + self.embed_idx(idx) + self.embed_break(breaks[..., None])
        if x_sc is None:  # self-conditioning off: x_sc = 0, every distance in bin 0 (cheap path)
            x = x + self.embed_sc.bias
        else:
            x = x + self.embed_sc(x_sc)
        x = x * maskf[..., None]
        if x_sc is None and not cfg.tri_every:
            # the pair takes few distinct values: the attention biases come from their table
            for block, bias in zip(self.blocks, self.pair_biases(x_t, cond, mask)):
                x = block(x, None, cond, mask, bias)
            return self.decoder(x) * maskf[..., None]
        pair = self.pair_xt(distance_bins(x_t, cfg.xt_dist_bins, cfg.dist_min, cfg.dist_max))
        pair = pair + self.pair_sep(separation_bins(L, cfg.seq_sep_bins, x_t.device))
        pair = pair + self.pair_time(cond)[:, None, None]
        if x_sc is None:
            pair = pair + self.pair_sc.weight[0]
        else:
            pair = pair + self.pair_sc(
                distance_bins(x_sc, cfg.sc_dist_bins, cfg.dist_min, cfg.dist_max)
            )
        # Pair entries of padded residues only meet padded queries or -inf-masked keys, so the
        # pair is masked only where it is summed over (triangle updates).
        pair_mask = maskf[:, :, None] * maskf[:, None, :]
        pair_normed = F.layer_norm(pair, (cfg.pair_dim,))

        updates = iter(self.pair_updates)
        for i, block in enumerate(self.blocks):
            if cfg.tri_every and i % cfg.tri_every == 0:
                pair = next(updates)(x, pair, pair_mask)
                pair_normed = F.layer_norm(pair, (cfg.pair_dim,))
            x = block(x, pair_normed, cond, mask)
        return self.decoder(x) * maskf[..., None]

    def pair_biases(self, x_t: Tensor, cond: Tensor, mask: Tensor) -> list[Tensor]:
        """Every block's attention bias (B, H, L, L) without self-conditioning or pair updates.

        The pair is then LayerNorm(pair_xt[distance bin] + pair_sep[separation bin] + pair_time
        (cond) + pair_sc[0]): per chain it takes at most xt_dist_bins x seq_sep_bins distinct
        values. Their table (B, bins_xt * bins_sep, p) is normalised and projected once per block,
        then gathered: the same values as building the (B, L, L, p) pair (same sums in the same
        order; the Linear may round differently), at the cost of a (B, H, L, L) gather.
        """
        cfg = self.cfg
        B, L, _ = x_t.shape
        ns = cfg.seq_sep_bins
        table = self.pair_xt.weight[:, None, :] + self.pair_sep.weight[None, :, :]  # (Dx, Ds, p)
        table = table[None] + self.pair_time(cond)[:, None, None] + self.pair_sc.weight[0]
        table_normed = F.layer_norm(table.reshape(B, -1, cfg.pair_dim), (cfg.pair_dim,))
        dist = distance_bins(x_t, cfg.xt_dist_bins, cfg.dist_min, cfg.dist_max)
        index = dist * ns + separation_bins(L, ns, x_t.device)
        return [b.attn.bias_from_table(table_normed, index, mask) for b in self.blocks]

    def forward_rotated(
        self,
        x_t: Tensor,
        t: Tensor,
        mask: Tensor,
        R: Tensor,
        chain_break: Tensor | None = None,
        plain: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocities of K rotated copies of the chains, sharing the invariant pair stack.

        Without self-conditioning and pair updates (``tri_every`` 0) the pair representation
        depends on x_t only through its distances, so it (and every block's attention bias)
        is the same for every rotated copy: it is built once from the unrotated x_t and only the
        token stream runs K times (one batched pass). Equal to ``self(R_k x_t, t, mask)`` up to
        float rounding of the rotated distances (a distance within rounding of a bin edge could
        fall in the other bin).

        Args:
            x_t: (B, L, 3) unrotated noisy coordinates. t: (B,). mask: (B, L) bool.
            R: (K, B, 3, 3) rotation per copy and chain. chain_break: (B, L) bool or None.

            plain: also return ``self(x_t, t, mask, chain_break=chain_break)`` (B, L, 3),
                computed from the same attention biases and token terms (the same arithmetic
                as ``forward``, so equal to it) without autograd (``torch.inference_mode``).

        Returns:
            (K * B, L, 3) velocities of the rotated copies (copy-major: row k * B + b), in
            the rotated frames, zero at padding; with ``plain``, (that, plain velocity).
        """
        cfg = self.cfg
        if cfg.tri_every:
            raise ValueError("forward_rotated needs a pair stack without pair updates")
        K = R.shape[0]
        B, L, _ = x_t.shape
        maskf = mask.to(x_t.dtype)
        cond = self.time_mlp(sinusoidal(t * 1000.0, cfg.t_emb_dim).to(x_t.dtype))
        biases = self.pair_biases(x_t, cond, mask)
        xr = torch.einsum("kbij,blj->kbli", R.to(x_t), x_t).reshape(K * B, L, 3)
        breaks = torch.zeros_like(maskf) if chain_break is None else chain_break.to(x_t.dtype)
        idx = sinusoidal(torch.arange(L, device=x_t.device).expand(B, L), cfg.idx_emb_dim)
        idx_term = self.embed_idx(idx.to(x_t.dtype))
        break_term = self.embed_break(breaks[..., None])
        x = self.embed_xt(xr) + idx_term.repeat(K, 1, 1) + break_term.repeat(K, 1, 1)
        x = (x + self.embed_sc.bias) * maskf.repeat(K, 1)[..., None]
        condk, maskk = cond.repeat(K, 1), mask.repeat(K, 1)
        for block, bias in zip(self.blocks, biases):
            x = block(x, None, condk, maskk, bias)  # bias (B, H, L, L), shared by the K copies
        v = self.decoder(x) * maskk[..., None].to(x.dtype)
        if not plain:
            return v
        with torch.inference_mode():  # forward's token stream on the same biases and terms
            x = self.embed_xt(x_t) + idx_term.detach() + break_term.detach()
            x = (x + self.embed_sc.bias) * maskf[..., None]
            for block, bias in zip(self.blocks, biases):
                x = block(x, None, cond.detach(), mask, bias.detach())
            return v, self.decoder(x) * maskf[..., None]


# --------------------------------------------------------------------------------------------
# sizes


SIZE_CONFIGS: dict[str, ProteinaConfig] = {
    "tiny": ProteinaConfig(
        dim=64, n_layers=2, n_heads=4, pair_dim=16, cond_dim=64, t_emb_dim=32, idx_emb_dim=32,
        xt_dist_bins=32, sc_dist_bins=32, seq_sep_bins=31, ffn_mult=4,
    ),
    "60M": ProteinaConfig(),
    "400M": ProteinaConfig(dim=1024, n_layers=18, n_heads=16, pair_dim=512, tri_every=5),
}  # fmt: skip
SIZES: tuple[str, ...] = tuple(SIZE_CONFIGS)


def config_for(size: str, **overrides) -> ProteinaConfig:
    """The config of a named size with field overrides (errors name the allowed values)."""
    return sized_config("proteina", ProteinaConfig(), SIZE_CONFIGS, size, overrides)


def build(size: str, **overrides) -> Proteina:
    """Registry entry point: ``build("60M")``, ``build("tiny", tri_every=1)``."""
    return Proteina(config_for(size, **overrides))
