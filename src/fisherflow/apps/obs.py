"""Optimal Brain Surgeon on a Fisher of any structure: saliencies and joint compensation.

The loss near the trained weights θ₀ is modelled by the quadratic
``½ (θ − θ₀)ᵀ H (θ − θ₀)`` with ``H = F + λI`` (Hassibi & Stork, 1993, "Second order
derivatives for network pruning: Optimal Brain Surgeon"). The saliency of a single
weight q is ``θ_q² / (2 [H⁻¹]_qq)``; once the pruned set Q is chosen, the kept weights
K of each *unit* move to the exact minimiser of the quadratic model with ``θ_Q = 0``:

    θ_K = θ₀_K + H_KK⁻¹ H_KQ θ₀_Q        (one solve on the kept support)

which for a quadratic loss (least squares with its exact Fisher) is the refit on the
kept support. The unit over which H couples weights follows the Fisher's structure:

- ``"dense"``: the whole layout (every parameter the Fisher covers moves);
- ``"block"``: each block (a layer's weight and bias together);
- ``"kfac"``: each **output row** of a layer with its bias entry, under the row block
  ``G_rr A + λI`` of ``G ⊗ A + λI`` (the row-wise model of OBS for layers and of
  SparseGPT, whose H is the input factor A). This is exact for ``diag(G) ⊗ A`` — for
  ``G ⊗ A`` itself whenever G is diagonal (e.g. a Gaussian likelihood, whose output
  Fisher is a multiple of the identity) — and drops the coupling between the rows
  of one layer otherwise. Parameters in K-FAC's diagonal "rest" are units of one;
- ``"diagonal"``: each weight alone (saliency ``½ (F_qq + λ) θ_q²``, no compensation);
- any other structure (EKFAC, low-rank): each group of :meth:`FisherMatrix.groups`
  made dense (``F.block(g).to_dense()``), or the whole layout when it has no groups.

Damping: ``λ = damping + rel_damping × mean(diag of the unit's block)`` (per K-FAC
row: ``rel_damping · G_rr · mean(diag A)``, SparseGPT's ``percdamp`` on A). A unit
whose ``H`` is singular raises and asks for damping.

Costs per K-FAC layer (n inputs, n_out rows, |Q_r| pruned in row r): with
``damping=0`` (``rel_damping`` only) every row's H is ``G_rr B`` with one
``B = A + rel·mean(diag A) I``, so one inverse of B (O(n³)) and, per row, a Cholesky
of size min(|Q_r|, |K_r|) on the pruned set Q_r or the kept set K_r
(Σ_r min(|Q_r|, |K_r|)³/3; rows batched, see :mod:`fisherflow.apps._row_solve`); with an
absolute ``damping`` each row has its own H: an n-sized solve per row (n_out·n³/3).
Dense and block units cost one Cholesky of their (kept) block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from typing_extensions import override

from fisherflow.apps._row_solve import row_solves
from fisherflow.apps.masks import from_rows, to_rows
from fisherflow.apps.sparsegpt import sequential_compensation
from fisherflow.matrices import KFAC, Block, FisherMatrix, ParamLayout, eigh

__all__ = ["DenseUnit", "DiagUnit", "RowUnit", "Unit", "obs_units"]

#: Entries of the batched row systems solved at once (rows × n_cols²), bounding memory.
_ROW_BATCH = 2**23


def _singular(where: str) -> ValueError:
    return ValueError(
        f"the Fisher of {where} is singular on the weights OBS keeps; "
        "pass damping > 0 or rel_damping > 0"
    )


def _cholesky(matrix: Tensor, where: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info != 0).any()):
        raise _singular(where)
    return chol


class Unit:
    """Weights coupled by H: a unit's inverse diagonal and its compensated weights."""

    #: Pruned parameters of the unit.
    targets: list[str]

    def inverse_diagonal(self) -> dict[str, Tensor]:
        """``{target: [H⁻¹]_qq}`` as row views."""
        raise NotImplementedError

    def compensate(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The new value of every parameter of the unit (pruned entries exactly zero)."""
        raise NotImplementedError


class DenseUnit(Unit):
    """Parameters coupled by one dense block ``H`` (dense or block Fisher)."""

    def __init__(
        self,
        layout: ParamLayout,
        matrix: Tensor,
        params: Mapping[str, Tensor],
        targets: list[str],
        input_major: Mapping[str, bool],
        damping: float,
        rel_damping: float,
    ) -> None:
        self.layout, self.targets, self.input_major = layout, targets, input_major
        h = matrix.detach().to(torch.float64)
        lam = damping + rel_damping * float(h.diagonal().mean()) if h.numel() else damping
        self.H = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        self.theta = layout.flatten({n: params[n].detach().to(h) for n in layout.names})
        self.where = f"the block {list(layout.names)}"

    @override
    def inverse_diagonal(self) -> dict[str, Tensor]:
        inv = torch.cholesky_inverse(_cholesky(self.H, self.where)).diagonal()
        parts = self.layout.unflatten(inv)
        return {n: to_rows(parts[n], self.input_major[n]) for n in self.targets}

    @override
    def compensate(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        kept = torch.ones(self.layout.size, dtype=torch.bool, device=self.H.device)
        for n in self.targets:
            shape = self.layout.shape(n)
            kept[self.layout.slice(n)] = from_rows(keep[n], shape, self.input_major[n]).reshape(-1)
        pruned = ~kept
        rhs = (self.H @ (self.theta * pruned))[kept]
        h_kk = self.H[kept][:, kept]
        new = torch.zeros_like(self.theta)
        if rhs.numel():
            delta = torch.cholesky_solve(rhs[:, None], _cholesky(h_kk, self.where))[:, 0]
            new[kept] = self.theta[kept] + delta
        return self.layout.unflatten(new)


class DiagUnit(Unit):
    """One parameter under a diagonal H: OBD's saliency, no compensation."""

    def __init__(self, name: str, diag: Tensor, param: Tensor, input_major: bool, damping: float,
                 rel_damping: float) -> None:  # fmt: skip
        self.targets, self.name, self.input_major = [name], name, input_major
        d = diag.detach().to(torch.float64).reshape(param.shape)
        lam = damping + rel_damping * float(d.mean()) if d.numel() else damping
        self.h = d + lam
        self.theta = param.detach().to(d)

    @override
    def inverse_diagonal(self) -> dict[str, Tensor]:
        return {self.name: to_rows(1.0 / self.h, self.input_major)}

    @override
    def compensate(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        mask = from_rows(keep[self.name], tuple(self.theta.shape), self.input_major)
        return {self.name: self.theta * mask}


class RowUnit(Unit):
    """A K-FAC layer's output rows, each under ``G_rr A + λ_r I`` (bias as last column).

    ``sequential = True`` swaps the joint row solves for the column-by-column sweep of
    :mod:`fisherflow.apps.sparsegpt` (approximate; needs ``damping == 0``).
    """

    sequential = False

    def __init__(
        self,
        weight: str,
        bias: str | None,
        a: Tensor,
        g_diag: Tensor,
        params: Mapping[str, Tensor],
        input_major: bool,
        damping: float,
        rel_damping: float,
    ) -> None:
        self.targets, self.weight, self.bias, self.input_major = [weight], weight, bias, input_major
        w = params[weight].detach()
        self.shape = tuple(w.shape)
        rows = to_rows(w, input_major).to(torch.float64)
        if bias is not None:
            rows = torch.cat([rows, params[bias].detach().to(rows)[:, None]], dim=1)
        self.x = rows
        a = a.detach().to(rows)
        self.A = a if a.dim() == 2 else torch.diag(a)
        self.g = g_diag.detach().to(rows)
        self.rel = rel_damping * float(self.A.diagonal().mean()) if self.A.numel() else 0.0
        self.lam = damping + self.rel * self.g
        self.shared = damping == 0.0
        self.where = f"layer {weight!r}"

    def _b(self) -> Tensor:
        """``B = A + rel·mean(diag A) I``, every row's H up to its scale ``G_rr``."""
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        return self.A + self.rel * eye

    def _b_inverse(self) -> Tensor:
        """``B⁻¹`` (cached; the shared case)."""
        if "_b_inv" not in self.__dict__:
            chol = _cholesky(self._b(), self.where)
            self.__dict__["_b_inv"] = torch.cholesky_inverse(chol)
        b_inv: Tensor = self.__dict__["_b_inv"]
        return b_inv

    @override
    def inverse_diagonal(self) -> dict[str, Tensor]:
        n_in = self.x.shape[1] - (self.bias is not None)
        if self.shared:  # H_r = G_rr B: [H_r⁻¹]_qq = [B⁻¹]_qq / G_rr
            if not bool((self.g > 0).all()):
                raise _singular(self.where)
            inv = self._b_inverse().diagonal()[None, :] / self.g[:, None]
            return {self.weight: inv[:, :n_in]}
        vals, vecs = eigh(self.A)
        spectrum = self.g[:, None] * vals.clamp_min(0)[None, :] + self.lam[:, None]
        top = float(spectrum.abs().max()) if spectrum.numel() else 0.0
        if not bool((spectrum > spectrum.shape[1] * torch.finfo(spectrum.dtype).eps * top).all()):
            raise _singular(self.where)
        inv = (1.0 / spectrum) @ (vecs * vecs).T  # [(g_r A + λ_r I)⁻¹]_qq per row r
        return {self.weight: inv[:, :n_in]}

    @override
    def compensate(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        mask = keep[self.weight]
        if self.bias is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if self.sequential:
            if not self.shared:
                raise ValueError(
                    "damping: the sequential OBS sweep needs damping=0 (use rel_damping)"
                )
            new = sequential_compensation(self.x, mask, self._b_inverse())
        else:
            new = self._shared(mask) if self.shared else self._kept_support(mask)
        n_in = new.shape[1] - (self.bias is not None)
        out = {self.weight: from_rows(new[:, :n_in], self.shape, self.input_major)}
        if self.bias is not None:
            out[self.bias] = new[:, -1]
        return out

    def _shared(self, mask: Tensor) -> Tensor:
        """Every row's H is ``G_rr B`` with one ``B = A + rel·mean(diag A) I``.

        The scale ``G_rr`` cancels, and each row solves on the smaller of its pruned set
        Q and kept set K (both forms give the same minimiser):

        - ``|Q| <= |K|``: ``δ = −B⁻¹[:, Q] (B⁻¹[Q, Q])⁻¹ θ_Q`` (Hassibi & Stork's form,
          one inverse of B per layer);
        - ``|K| < |Q|``: ``θ_K = θ₀_K + B_KK⁻¹ B_KQ θ₀_Q`` (the refit on the support).

        Under N:M and per-row scope every row has the same ``|Q|``, so the row systems
        are batched without padding (:func:`fisherflow.apps._row_solve.row_solves`).
        """
        n_out, n_cols = self.x.shape
        pruned = ~mask
        n_pruned = pruned.sum(1)
        new = self.x * mask
        if n_out == 0 or int(n_pruned.max()) == 0:
            return new
        q = pruned.to(self.x.dtype)
        if int(n_pruned.max()) <= int((n_cols - n_pruned).max()):
            width = int(n_pruned.max())
            b_inv = self._b_inverse()
            # each row's pruned indices first (stable: in column order)
            idx = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :width]
            z = row_solves(b_inv, idx, n_pruned, self.x.gather(1, idx))
            if z is None:
                raise _singular(self.where)
            spread = torch.zeros_like(self.x).scatter_add_(1, idx, z)
            return (self.x - spread @ b_inv) * mask  # −B⁻¹[:, Q] z, B⁻¹ symmetric
        n_kept = n_cols - n_pruned
        width = int(n_kept.max())
        b = self._b()
        idx = torch.argsort(pruned.to(torch.int8), dim=1, stable=True)[:, :width]
        rhs = ((self.x * q) @ b).gather(1, idx)  # (B θ₀_Q)_K, B symmetric
        y = row_solves(b, idx, n_kept, rhs)
        if y is None:
            raise _singular(self.where)
        spread = torch.zeros_like(self.x).scatter_add_(1, idx, y)
        return (self.x + spread) * mask

    def _kept_support(self, mask: Tensor) -> Tensor:
        """Per row, ``θ_K += H_KK⁻¹ H_KQ θ_Q`` with ``H = G_rr A + λ_r I`` (any damping)."""
        n_out, n_cols = self.x.shape
        new = torch.empty_like(self.x)
        eye = torch.eye(n_cols, dtype=self.x.dtype, device=self.x.device)
        step = max(1, _ROW_BATCH // max(1, n_cols * n_cols))
        for start in range(0, n_out, step):
            rows = slice(start, min(start + step, n_out))
            m = mask[rows].to(self.x.dtype)
            q = 1.0 - m
            h = self.g[rows, None, None] * self.A + self.lam[rows, None, None] * eye
            rhs = m * (h @ (self.x[rows] * q)[:, :, None])[:, :, 0]
            system = h * (m[:, :, None] * m[:, None, :]) + torch.diag_embed(q)
            delta = torch.cholesky_solve(rhs[:, :, None], _cholesky(system, self.where))
            new[rows] = (self.x[rows] + delta[:, :, 0]) * m
        return new


UnitBuilder = Callable[
    [FisherMatrix, Mapping[str, Tensor], list[str], Mapping[str, bool], float, float], list[Unit]
]


def _diagonal_units(F, params, targets, input_major, lam, rel):  # type: ignore[no-untyped-def]
    diag = F.layout.unflatten(F.diagonal())
    return [DiagUnit(n, diag[n], params[n], input_major[n], lam, rel) for n in targets]


def _dense_units(F, params, targets, input_major, lam, rel):  # type: ignore[no-untyped-def]
    return [DenseUnit(F.layout, F.to_dense(), params, targets, input_major, lam, rel)]


def _block_units(F, params, targets, input_major, lam, rel):  # type: ignore[no-untyped-def]
    assert isinstance(F, Block)
    units: list[Unit] = []
    for g, names in F.groups().items():
        mine = [n for n in targets if n in names]
        if mine:
            sub = F.layout.subset(names)
            units.append(DenseUnit(sub, F.blocks[g], params, mine, input_major, lam, rel))
    return units


def _group_units(F, params, targets, input_major, lam, rel):  # type: ignore[no-untyped-def]
    groups = F.groups() or {"all": list(F.layout.names)}
    units: list[Unit] = []
    for g, names in groups.items():
        mine = [n for n in targets if n in names]
        if mine:
            sub = F.block(g) if g in F.groups() else F
            dense = sub.to_dense()
            units.append(DenseUnit(sub.layout, dense, params, mine, input_major, lam, rel))
    rest = [n for n in targets if not any(n in names for names in groups.values())]
    return units + _diagonal_units(F, params, rest, input_major, lam, rel)


def _kfac_units(F, params, targets, input_major, lam, rel):  # type: ignore[no-untyped-def]
    assert isinstance(F, KFAC)
    by_weight = {s.weight: g for g, s in F.kron_groups.items()}
    by_bias = {s.bias: g for g, s in F.kron_groups.items() if s.bias}
    units: list[Unit] = []
    rest = []
    for n in targets:
        if n in by_bias:
            raise ValueError(
                f"params: OBS on a K-FAC Fisher prunes layer weights, and {n!r} is the bias "
                f"of layer {by_bias[n]!r}; leave it out or use a block Fisher"
            )
        if n not in by_weight:
            rest.append(n)
            continue
        g = by_weight[n]
        spec, G = F.kron_groups[g], F.G[g]
        g_diag = G if G.dim() == 1 else G.diagonal()
        units.append(RowUnit(n, spec.bias, F.A[g], g_diag, params, spec.input_major, lam, rel))
    return units + _diagonal_units(F, params, rest, input_major, lam, rel)


#: How each structure's OBS units are built; others use :func:`_group_units`.
UNIT_BUILDERS: dict[str, UnitBuilder] = {
    "diagonal": _diagonal_units,
    "dense": _dense_units,
    "block": _block_units,
    "kfac": _kfac_units,
}


def obs_units(
    F: FisherMatrix,
    params: Mapping[str, Tensor],
    targets: list[str],
    input_major: Mapping[str, bool],
    damping: float,
    rel_damping: float,
) -> list[Unit]:
    """The OBS units of ``F`` that hold the ``targets`` (see the module docstring).

    Args:
        F: The Fisher (its layout already checked against ``params``).
        params: ``{name: tensor}`` of every parameter of ``F``'s layout.
        targets: Names of the parameters being pruned.
        input_major: ``{name: stored (n_in, n_out)}`` for every parameter.
        damping: Absolute λ >= 0.
        rel_damping: λ relative to the mean diagonal of each unit's block.

    Returns:
        Units covering every target exactly once.
    """
    builder = UNIT_BUILDERS.get(F.structure, _group_units)
    units = builder(F, params, targets, input_major, damping, rel_damping)
    covered = [n for u in units for n in u.targets]
    assert sorted(covered) == sorted(targets)
    return units
