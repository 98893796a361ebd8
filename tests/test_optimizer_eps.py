"""AdamW with eps 0 (VoxMol's setting) never turns a parameter without gradient into NaN.

Found by the miniature paper grid: GEOM's miniature data has no F or S atoms, so the first
convolution's weights on those channels get an exactly zero gradient; with eps 0 Adam divided
0 by 0 and training stopped with a non-finite loss at step 1 (the real GEOM batch of 64 often
lacks Br the same way).
"""

from __future__ import annotations

import torch

from equipipe.train import TrainConfig, adam_eps, make_optimizer


def test_eps_zero_leaves_parameters_without_gradient_unchanged_and_others_exact():
    torch.manual_seed(0)
    used, unused = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    ref = torch.nn.Parameter(used.detach().clone())
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, eps=0.0, weight_decay=0.0, betas=(0.99, 0.999))
    opt = make_optimizer([used, unused], cfg)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, eps=0.0, weight_decay=0.0, betas=(0.99, 0.999))
    before = unused.detach().clone()
    for _ in range(3):
        opt.zero_grad(), ref_opt.zero_grad()
        (used**2).sum().backward()
        (ref**2).sum().backward()
        unused.grad = torch.zeros_like(unused)  # a channel no atom of the batch touches
        opt.step(), ref_opt.step()
    assert torch.isfinite(unused).all() and torch.equal(unused.detach(), before)
    assert torch.equal(used.detach(), ref.detach())  # where gradients exist: eps 0, exactly
    assert adam_eps(1e-8) == 1e-8 and 0 < adam_eps(0.0) < 1e-37
