"""Proteína-like model: sizes, masking, the decoder head, the pair path."""

from __future__ import annotations

import pytest
import torch

from equipipe.models import proteina
from equipipe.models.registry import SIZES, build_model, param_count, size_label
from equipipe.so3 import haar_rotations


def _inputs(B=3, L=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 3, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L - 7 :] = False
    x = x * mask[..., None]
    t = torch.rand(B, generator=g)
    brk = torch.zeros(B, L, dtype=torch.bool)
    brk[0, 5] = True
    return x, t, mask, brk


def test_parameter_counts_match_labels():
    assert SIZES["proteina"] == proteina.SIZES == ("tiny", "60M", "400M")
    counts = {}
    for size in proteina.SIZES:
        with torch.device("meta"):  # no memory allocated, even for 400M
            counts[size] = param_count(build_model("proteina", size))
    for size in ("60M", "400M"):
        assert abs(counts[size] - size_label(size)) <= 0.1 * size_label(size), counts
    assert 100_000 <= counts["tiny"] <= 300_000
    with torch.device("meta"):
        big = proteina.build("400M")
    assert len(big.pair_updates) == 4 and len(big.blocks) == 18  # updates before 0, 5, 10, 15
    assert big.decoder.linear.in_features == 1024


def test_build_errors_name_allowed_values():
    with pytest.raises(ValueError, match="allowed"):
        proteina.build("7M")
    with pytest.raises(ValueError, match="override 'width' is unknown"):
        proteina.build("tiny", width=3)
    with pytest.raises(ValueError, match="divisible"):
        proteina.build("tiny", n_heads=5)


@pytest.mark.parametrize(("tri_every", "self_cond"), [(0, True), (1, True), (0, False)])
def test_padding_does_not_change_real_residues(tri_every, self_cond):
    torch.manual_seed(0)
    model = proteina.build("tiny", tri_every=tri_every, tri_dim=8).eval()
    x, t, mask, brk = _inputs()
    sc = torch.randn_like(x) * mask[..., None] if self_cond else None
    with torch.no_grad():
        v = model(x, t, mask, x_sc=sc, chain_break=brk)
        # the same chains padded by 9 more slots (filled with garbage)
        pad = lambda a, fill: torch.cat([a, fill], dim=1)  # noqa: E731
        xp = pad(x, torch.randn(3, 9, 3) * 5)
        mp = pad(mask, torch.zeros(3, 9, dtype=torch.bool))
        vp = model(
            xp,
            t,
            mp,
            x_sc=None if sc is None else pad(sc, torch.randn(3, 9, 3)),
            chain_break=pad(brk, torch.ones(3, 9, dtype=torch.bool)),
        )
    assert v.shape == (3, 24, 3)
    assert torch.equal(v[~mask], torch.zeros_like(v[~mask]))
    assert torch.equal(vp[:, 24:], torch.zeros_like(vp[:, 24:]))
    torch.testing.assert_close(vp[:, :24][mask], v[mask], atol=2e-5, rtol=1e-4)


def test_self_conditioning_off_equals_zero_input():
    model = proteina.build("tiny").eval()
    x, t, mask, brk = _inputs(seed=1)
    with torch.no_grad():
        a = model(x, t, mask, chain_break=brk)
        b = model(x, t, mask, x_sc=torch.zeros_like(x), chain_break=brk)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_pair_table_equals_the_explicit_pair_with_gradients():
    """Without self-conditioning the attention biases come from a table of the pair's distinct
    values (``pair_biases``); x_sc = 0 takes the explicit (B, L, L, p) pair path: same values
    and the same parameter gradients."""
    torch.manual_seed(5)
    model = proteina.build("tiny")
    x, t, mask, brk = _inputs(seed=5)
    grads = []
    for sc in (None, torch.zeros_like(x)):
        model.zero_grad()
        v = model(x, t, mask, x_sc=sc, chain_break=brk)
        (v**2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[1].keys() - grads[0].keys() == {"embed_sc.weight"}  # x_sc = 0 multiplies it
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_pair_features_are_invariant_and_model_is_not_equivariant():
    x, t, mask, _ = _inputs(seed=2)
    R = haar_rotations(1, torch.Generator().manual_seed(3))[0]
    xr = x @ R.T
    assert torch.equal(
        proteina.distance_bins(x, 64, 0.1, 3.0), proteina.distance_bins(xr, 64, 0.1, 3.0)
    )
    model = build_model("proteina", "tiny").eval()
    with torch.no_grad():
        v = model(x, t, mask)
        v_rot_back = model(xr, t, mask) @ R
    # raw-coordinate embeddings and the decoder break equivariance at initialisation
    assert (v - v_rot_back).abs().max() > 1e-3


def test_decoder_head_and_gradients():
    model = proteina.build("tiny")
    assert isinstance(
        model.decoder.linear, torch.nn.Linear
    ) and model.decoder.linear.weight.shape == (3, 64)
    x, t, mask, brk = _inputs(seed=4)
    v = model(x, t, mask, x_sc=x, chain_break=brk)
    (v**2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.decoder.linear.weight.grad.abs().sum() > 0
    assert param_count(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("copies", [None, 3])
def test_biased_attention_equals_sdpa_values_and_gradients(copies):
    """The written-out attention (the autograd path) equals SDPA with the same additive mask:
    forward, the gradients of q, k, v and the bias over two backward passes of one forward
    (as the gradient-norm pass runs them), and its forward-mode derivative (``torch.func``,
    the landscape analysis' Jacobians) equals the formula's; with ``copies``
    the bias is shared by leading copies of q, k, v (broadcast; its gradient summed)."""
    from torch.nn import functional as F

    from equipipe.models.attention import biased_attention

    g = torch.Generator().manual_seed(0)
    B, H, L, dh = 2, 3, 11, 4
    lead = (B, H) if copies is None else (copies, B, H)
    q, k, v = (torch.randn(*lead, L, dh, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 7:] = False  # padded keys; every query still sees real keys
    bias = torch.randn(B, H, L, L, generator=g, dtype=torch.float64)
    bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    inputs = [a.requires_grad_() for a in (q, k, v, bias)]
    cot = [torch.randn(*lead, L, dh, generator=g, dtype=torch.float64) for _ in range(2)]

    def run(fn):
        out = fn(*inputs)
        grads = [torch.autograd.grad(out, inputs, c, retain_graph=True) for c in cot]
        return out, grads

    def sdpa(q, k, v, b):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=b)

    out, grads = run(biased_attention)
    ref, ref_grads = run(sdpa)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for gs, rs in zip(grads, ref_grads):
        for a, r in zip(gs, rs):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grads[0][3]).all() and (grads[0][3][1, ..., 7:] == 0).all()
    tangents = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in inputs]
    tangents[3] = tangents[3].masked_fill(~mask[:, None, None, :], 0.0)
    primals = [a.detach() for a in inputs]
    _, jvp = torch.func.jvp(biased_attention, tuple(primals), tuple(tangents))

    def formula(q, k, v, b):  # SDPA has no forward-mode derivative on its fused CPU path
        return torch.softmax(q @ k.transpose(-1, -2) / dh**0.5 + b, dim=-1) @ v

    torch.testing.assert_close(formula(*primals), ref.detach(), rtol=1e-12, atol=1e-12)
    _, jvp_ref = torch.func.jvp(formula, tuple(primals), tuple(tangents))
    torch.testing.assert_close(jvp, jvp_ref, rtol=1e-10, atol=1e-12)
    stacked = torch.stack([primals[0], 2 * primals[0]])  # vmap over q (its loop rule)
    batched = torch.func.vmap(lambda a: biased_attention(a, *primals[1:]))(stacked)
    torch.testing.assert_close(batched[0], ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batched[1], formula(stacked[1], *primals[1:]))
    with torch.inference_mode():  # without autograd
        torch.testing.assert_close(biased_attention(*primals), ref.detach(), rtol=1e-12, atol=1e-12)


def test_attention_autograd_path_equals_fused_kernel_in_the_model():
    """The model's two attention paths (written out with autograd, SDPA's fused kernel
    without) give the same velocities, in the plain and the shared K-copy forward."""
    torch.manual_seed(0)
    model = build_model("proteina", "tiny").eval()
    x, t, mask, brk = _inputs()
    R = haar_rotations(2 * 3, torch.Generator().manual_seed(1)).reshape(2, 3, 3, 3)
    with_grad = model(x, t, mask, chain_break=brk)
    rot_grad, plain = model.forward_rotated(x, t, mask, R, brk, plain=True)
    assert with_grad.requires_grad and rot_grad.requires_grad and not plain.requires_grad
    with torch.inference_mode():
        fused = model(x, t, mask, chain_break=brk)
        rot_fused = model.forward_rotated(x, t, mask, R, brk)
    assert torch.equal(plain, fused)
    torch.testing.assert_close(with_grad, fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rot_grad, rot_fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bins", [32, 64, 128])
def test_uniform_bucketize_equals_bucketize(bins):
    """The arithmetic binning equals torch.bucketize exactly, at the edges, one float on
    either side of them, outside the range and on random distances."""
    lo, hi = 0.1, 3.0
    edges = torch.linspace(lo, hi, bins - 1)
    d = torch.cat([
        edges, edges.nextafter(torch.tensor(9.0)), edges.nextafter(torch.tensor(-9.0)),
        torch.rand(50_000, generator=torch.Generator().manual_seed(bins)) * 3.5,
        torch.tensor([0.0, lo / 2, hi * 2, 1e9, float("inf"), float("nan")]),
    ])  # fmt: skip
    got = proteina.uniform_bucketize(d, edges, lo, (hi - lo) / (bins - 2))
    assert torch.equal(got, torch.bucketize(d, edges))
    x = torch.randn(2, 40, 3) * 1.2
    assert torch.equal(
        proteina.distance_bins(x, bins, lo, hi), torch.bucketize(torch.cdist(x, x), edges)
    )


def test_forward_mode_jacobian_of_the_decoder_through_the_model():
    """torch.func's vmapped jvp with respect to decoder.linear.weight (the landscape analysis'
    Jacobian) runs through the plain and the shared K-copy forward and matches central
    differences (torch.func hides requires_grad: the attention path follows grad mode)."""
    torch.manual_seed(0)
    model = build_model("proteina", "tiny").eval()
    x, t, mask, brk = _inputs(B=2, L=12)
    R = haar_rotations(4, torch.Generator().manual_seed(1)).reshape(2, 2, 3, 3)
    w0 = model.decoder.linear.weight.detach().clone()

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self):
            return self.m(x, t, mask, chain_break=brk), self.m.forward_rotated(x, t, mask, R, brk)

    both = Both()

    def outputs(w):
        return torch.func.functional_call(both, {"m.decoder.linear.weight": w}, ())

    tangents = torch.eye(w0.numel())[:3].reshape(3, *w0.shape)
    cols = torch.func.vmap(lambda d: torch.func.jvp(outputs, (w0,), (d,))[1])(tangents)
    for i in range(2):
        fd = (outputs(w0 + 1e-2 * tangents[2])[i] - outputs(w0 - 1e-2 * tangents[2])[i]) / 2e-2
        torch.testing.assert_close(cols[i][2], fd, rtol=1e-3, atol=1e-4)
