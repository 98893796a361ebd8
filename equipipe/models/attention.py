"""Attention with an additive bias, written out for autograd on CPU.

``biased_attention(q, k, v, bias)`` equals ``F.scaled_dot_product_attention(q, k, v,
attn_mask=bias)`` (default scale 1/sqrt(dh)) up to float rounding, in value and in its gradients
with respect to q, k, v and the bias. Why it exists: with autograd, SDPA on CPU takes its math
path, which checks every row for all -inf ("safe softmax": ``all``, ``isneginf``, ``where``
over the (*lead, L, L) scores), differentiates the softmax through ``_softmax_backward_data``
and allocates a fresh probability buffer. Here the backward is written out, dP = dO V^T,
dS = P (dP - rowsum(dO * O)), in place on one buffer, with contiguous GEMM operands; the
softmax runs in place on the scores; the probabilities are saved once for any number of
backward passes (the gradient-norm pass differentiates the same forward twice). Measured
(torch 2.13, one core, the tiny model's shapes): the gradient-norm view ~0.9x, the training
step ~0.8x together with the pair-bias changes in ``proteina``.

The bias may be shared by leading copies of q: ``bias`` (*lead_b, L, L) with q (*extra,
*lead_b, L, dh) (e.g. the K rotated copies of a batch share one pair bias); its gradient is
then summed over the extra dims. Every query row must see at least one finite bias entry (a
row of -inf gives NaN here, zeros in SDPA's safe softmax).

Forward-mode (``jvp``) and ``vmap`` (a loop) are supported, so ``torch.func`` transforms of a
model that uses it work (the landscape analysis' vmapped Jacobians).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat(x: Tensor) -> Tensor:
    """(*lead, L, n) -> (N, L, n), a view where possible."""
    return x.reshape(-1, *x.shape[-2:])


def _probabilities(q: Tensor, k: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(dh) + bias) over the keys: (*lead, L, L)."""
    scale = q.shape[-1] ** -0.5
    kt = _flat(k).transpose(1, 2).contiguous()  # (N, dh, L): the fast GEMM layout
    s = torch.bmm(_flat(q) * scale, kt).view(*q.shape[:-1], k.shape[-2])
    s += bias  # broadcast over the extra leading dims
    # in place: no second (*lead, L, L) buffer (fresh large buffers cost page faults on CPU)
    return torch.ops.aten._softmax.out(s, -1, False, out=s)


def _sum_to(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum the extra leading dims of x (*extra, *shape) away."""
    extra = x.dim() - len(shape)
    return x.sum(tuple(range(extra))) if extra else x


class _BiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        p = _probabilities(q, k, bias)
        o = torch.bmm(_flat(p), _flat(v)).view(*q.shape[:-1], v.shape[-1])
        return o, p

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, bias = inputs
        o, p = output
        ctx.save_for_backward(q, k, v, p, o)
        ctx.save_for_forward(q, k, v, p, o)
        ctx.bias_shape = bias.shape
        ctx.mark_non_differentiable(p)
        ctx.set_materialize_grads(False)  # no (*lead, L, L) zero gradient for p per backward

    @staticmethod
    def backward(ctx, do: Tensor, _dp: Tensor | None) -> tuple[Tensor | None, ...]:
        if do is None:  # the output was not used
            return None, None, None, None
        q, k, v, p, o = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        do3, p3 = _flat(do), _flat(p)
        vt = _flat(v).transpose(1, 2).contiguous()
        delta = (do * o).sum(-1, keepdim=True)  # rowsum(dP * P) = rowsum(dO * O)
        ds = torch.bmm(do3, vt).sub_(_flat(delta)).mul_(p3)  # (N, L, L)
        dq = dk = dv = db = None
        if ctx.needs_input_grad[0]:
            dq = torch.bmm(ds, _flat(k)).mul_(scale).view(q.shape)
        if ctx.needs_input_grad[1]:
            dk = torch.bmm(ds.transpose(1, 2), _flat(q)).mul_(scale).view(k.shape)
        if ctx.needs_input_grad[2]:
            dv = torch.bmm(p3.transpose(1, 2), do3).view(v.shape)
        if ctx.needs_input_grad[3]:
            db = _sum_to(ds.view(p.shape), ctx.bias_shape)
        return dq, dk, dv, db

    @staticmethod
    def jvp(ctx, dq, dk, dv, dbias) -> tuple[Tensor, None]:
        q, k, v, p, o = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        ds = torch.zeros_like(p)
        if dq is not None:
            ds = ds + (dq * scale) @ k.transpose(-1, -2)
        if dk is not None:
            ds = ds + (q * scale) @ dk.transpose(-1, -2)
        if dbias is not None:
            ds = ds + dbias
        dp = p * (ds - (p * ds).sum(-1, keepdim=True))
        do = dp @ v
        if dv is not None:
            do = do + p @ dv
        return do, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, bias) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
        """A loop over the vmapped dim (the in-place softmax has no batching rule); no hot
        path vmaps the attention's inputs (the landscape vmaps tangents, see ``jvp``)."""
        args = [
            a.movedim(d, 0) if d is not None else a.expand(info.batch_size, *a.shape)
            for a, d in zip((q, k, v, bias), in_dims)
        ]
        outs = [_BiasedAttention.apply(*row) for row in zip(*(a.unbind(0) for a in args))]
        return (torch.stack([o for o, _ in outs]), torch.stack([p for _, p in outs])), (0, 0)


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(dh) + bias) v, differentiable in q, k, v and bias.

    Args:
        q, k: (*extra, *lead_b, L, dh). v: (*extra, *lead_b, L, dv).
        bias: (*lead_b, L, L), additive (-inf masks a key), shared by the ``extra`` copies.

    Returns:
        (*extra, *lead_b, L, dv), equal to ``F.scaled_dot_product_attention(q, k, v,
        attn_mask=bias)`` up to float rounding (gradients too).
    """
    if (
        bias.shape[-2:] != (q.shape[-2], k.shape[-2])
        or bias.shape[:-2] != q.shape[q.dim() - bias.dim() : -2]
    ):
        raise ValueError(
            f"bias {tuple(bias.shape)} does not match q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    return _BiasedAttention.apply(q, k, v, bias)[0]
