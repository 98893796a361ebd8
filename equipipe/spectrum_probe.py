"""Spectrum of the equivariance error and of hidden features during evaluation (no extra passes).

``SpectrumProbe`` is what the training loop uses at an evaluation whose spectrum is due:

* ``recording(model)``: a context manager that puts forward hooks on the named modules
  (``layers``) while ``equivariance.decompose`` runs its K rotated forward passes, so hidden
  features are recorded for the SAME rotations as the outputs;
* ``observe(split, t, view)`` after each ``decompose(..., record=probe.record)``: the outputs'
  canonicalised predictions z and the rotations R come from the record, the features from the
  hooks; both are turned into ``equipipe.spectrum.Spectrum`` objects and summed over batches;
* ``rows()``: the metric rows (dicts of ``Trainer._row`` keyword arguments).

Rows written (long metrics table; ``ell`` is the irrep label: "0".."ℓmax" for SO(3), A1..T2 for
the octahedral evaluation; ``layer`` a module name):

* ``spectrum_power`` (field, ell): per-element power of the canonicalised prediction in that
  irrep, in the field's squared unit. ell "0" / "A1" is the twirled prediction's squared norm;
  the others sum (with ``spectrum_remainder``) to the unbiased equivariance error ``equiv_unbiased``
  of the same evaluation; ``spectrum_power_se`` its standard error over examples;
* ``spectrum_remainder`` (field): power above ℓmax (SO(3) only) and ``spectrum_remainder_se``;
* ``layer_share`` (layer, ell; ``t`` null: pooled over the evaluation's flow times, each
  (example, t) an independent unit with its own K rotations, which a per-t split is too noisy
  for): share of the layer output's power (of g ↦ h(g x), not
  canonicalised; grid feature maps ARE canonicalised, see ``canonical_grid_features``) in that
  ℓ, ``layer_share_se`` its standard error over examples; ``layer_share_remainder`` (layer): the
  share above ℓmax, ``layer_share_remainder_se`` its standard error.

Noise: with K = 10 rotations an example has 45 rotation pairs, and the estimate of P_ℓ carries
cross-talk from the other ℓ of order (2ℓ+1) / sqrt(45 · examples) of the power there (zero in
expectation, the same at every evaluation because the evaluation rotations are fixed). The
standard errors say which values are resolved; the figures mark the rest.

Which entries group into one example: a value whose leading size is the number of examples B
is per example (energies, padded (B, L, ...) tokens); otherwise it must be per atom of a ragged
batch, grouped by the batch's ``batch`` (N,) index (the force-field batch contract).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from equipipe.models import interface
from equipipe.so3 import rotate_grid
from equipipe.spectrum import Spectrum, spectrum
from equipipe.tasks.base import Batch, Task

SPECTRUM_METRICS = (
    "spectrum_power",
    "spectrum_power_se",
    "spectrum_remainder",
    "spectrum_remainder_se",
    "layer_share",
    "layer_share_se",
    "layer_share_remainder",
    "layer_share_remainder_se",
)


def probe_layers(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Module names to probe: ``names`` if given, else the model's ``spectrum_layers`` (or none).

    Raises ValueError naming the model's modules when a name does not exist.
    """
    wanted = list(names) if names is not None else list(interface.spectrum_layers(model))
    modules = dict(model.named_modules())
    missing = [n for n in wanted if n not in modules]
    if missing:
        some = [n for n in modules if n][:40]
        raise ValueError(f"spectrum_layers {missing} are not modules of the model; some are {some}")
    return wanted


def example_index(view: Batch, leading: int, n_examples: int) -> Tensor | None:
    """None when ``leading`` == B (per-example values), else the ragged batch's ``batch`` index."""
    if leading == n_examples:
        return None
    index = view.get("batch")
    if index is not None and index.shape[0] == leading:
        return index
    raise ValueError(
        f"cannot group {leading} entries into {n_examples} examples: neither per example nor "
        "per atom of the batch's 'batch' index"
    )


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


class SpectrumProbe:
    """Accumulates output and hidden-feature spectra over the batches of one evaluation."""

    def __init__(self, task: Task, lmax: int, layers: list[str]):
        self.task, self.lmax, self.layers = task, int(lmax), list(layers)
        self.record: dict[str, Any] = {}
        self._features: dict[str, list[Tensor]] = {}
        self.outputs: dict[tuple[str, float | None, str], Spectrum] = {}
        self.hidden: dict[tuple[str, float | None, str], Spectrum] = {}

    @contextmanager
    def recording(self, model: nn.Module):
        """Record the named modules' outputs of every forward pass inside the block."""
        self.record = {"layers": list(self.layers)}  # canonical_predictions reads the names
        self._features = {n: [] for n in self.layers}
        modules = dict(model.named_modules())
        handles = []
        for name in self.layers:

            def hook(_mod, _inp, out, name=name):
                t = _first_tensor(out)
                if t is not None:
                    self._features[name].append(t.detach())

            handles.append(modules[name].register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _add(table: dict, key, s: Spectrum) -> None:
        table[key] = table[key] + s if key in table else s

    def observe(self, split: str, t: float | None, view: Batch, exhaustive: bool) -> None:
        """Turn the last ``decompose`` record (and recorded features) into spectra."""
        z, R, masks = self.record["z"], self.record["R"], self.record.get("masks") or {}
        B = self.task.num_examples(view)
        K = R.shape[0]
        for f, zf in z.items():
            if f not in self.task.fields:
                continue
            idx = example_index(view, zf.shape[1], B)
            s = spectrum(zf, R, self.lmax, idx, masks.get(f), exhaustive)
            self._add(self.outputs, (split, t, f), s)
        mask = masks.get(self.task.primary_field)
        out = z.get(self.task.primary_field)
        for name, outs in self._features.items():
            if not outs:
                continue
            h = torch.cat(outs, 0)
            h = h.reshape(K, -1, *h.shape[1:])
            hm = mask
            if h.dim() == 6:  # (K, B, C, D, H, W) feature maps of a grid model
                h, hm = canonical_grid_features(h, R, out, mask, name)
            idx = example_index(view, h.shape[1], B)
            s = spectrum(h, R, self.lmax, idx, hm if idx is None else None, exhaustive)
            self._add(self.hidden, (split, None, name), s)  # pooled over flow times
        self._features = {n: [] for n in self.layers}

    def rows(self, units: dict[str, str]) -> list[dict[str, Any]]:
        """Metric rows (keyword arguments of ``Trainer._row``) of everything observed."""
        rows: list[dict[str, Any]] = []
        for (split, t, f), s in self.outputs.items():
            pe, n, unit = s.per_element(), s.n_elements, units.get(f)
            for lab in s.labels:
                rows.append(dict(split=split, metric="spectrum_power", value=pe[lab], field=f,
                                 t=t, n=n, unit=unit, ell=lab))  # fmt: skip
                rows.append(dict(split=split, metric="spectrum_power_se", field=f, t=t, n=n,
                                 value=s.standard_error(lab), unit=unit, ell=lab))  # fmt: skip
            if not s.exhaustive:
                rows.append(dict(split=split, metric="spectrum_remainder", value=pe["remainder"],
                                 field=f, t=t, n=n, unit=unit))  # fmt: skip
                rows.append(dict(split=split, metric="spectrum_remainder_se", field=f, t=t, n=n,
                                 value=s.standard_error("remainder"), unit=unit))  # fmt: skip
        for (split, t, layer), s in self.hidden.items():
            sh = s.shares()
            for lab in s.labels:
                rows.append(dict(split=split, metric="layer_share", value=sh[lab], t=t,
                                 n=s.n_elements, unit="fraction", ell=lab, layer=layer))  # fmt: skip
                rows.append(dict(split=split, metric="layer_share_se", t=t, n=s.n_elements,
                                 value=s.share_standard_error(lab), unit="fraction", ell=lab,
                                 layer=layer))  # fmt: skip
            if not s.exhaustive:
                rows.append(dict(split=split, metric="layer_share_remainder", t=t, unit="fraction",
                                 value=sh["remainder"], n=s.n_elements, layer=layer))  # fmt: skip
                rows.append(dict(split=split, metric="layer_share_remainder_se", t=t, n=s.n_elements,
                                 value=s.share_standard_error("remainder"), unit="fraction",
                                 layer=layer))  # fmt: skip
        return rows


def canonical_grid_features(
    h: Tensor, R: Tensor, out: Tensor | None, mask: Tensor | None, name: str
) -> tuple[Tensor, Tensor | None]:
    """g^-1 · h(g x) for full-resolution feature maps h (K, B, C, D, H, W) of a grid model.

    A grid feature map has a group action (voxel permutation / resampling), so its ℓ content is
    read after canonicalising it like the output; then the trivial irrep (A1 or ℓ = 0) is its
    equivariant part. Only maps with the output's spatial shape are accepted: coarse U-Net
    levels sit half a voxel off the grid centre, where the voxel permutations are not rotations.
    The element mask (inscribed ball of the Haar evaluation) is applied to every channel.
    """
    if out is None or tuple(h.shape[-3:]) != tuple(out.shape[-3:]):
        raise ValueError(
            f"spectrum layer {name!r} has maps {tuple(h.shape[-3:])}, not the output's full "
            f"resolution {tuple(out.shape[-3:]) if out is not None else None}: probe only "
            "full-resolution maps (coarse levels are off-centre, their permutations not rotations)"
        )
    Rt = R.to(device=h.device, dtype=h.dtype).transpose(-1, -2)
    canon = torch.stack([rotate_grid(h[k], Rt[k], mode="bilinear") for k in range(h.shape[0])])
    if mask is None:
        return canon, None
    m = mask.to(torch.bool)
    m = m.any(1, keepdim=True) if m.dim() == 5 else m
    return canon, m.expand(h.shape[1:])


def spectrum_due(step: int, steps: list[int], every: int) -> bool:
    """Whether the evaluation at ``step`` (one of the sorted ``steps``) computes the spectrum.

    Every ``every``-th evaluation counting from step 0, and always the last; never when
    ``every`` is 0. Depends on the step only, so a resumed run logs the same evaluations.
    """
    if every <= 0 or step not in steps:
        return False
    return steps.index(step) % every == 0 or step == steps[-1]
