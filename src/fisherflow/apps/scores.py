"""Saliencies of weights for pruning: what removing each one is expected to cost.

- ``"magnitude"``: ``|θ_q|``.
- ``"obd"``: ``½ F_qq θ_q²`` (LeCun, Denker & Solla, 1990, "Optimal Brain Damage"),
  with the Fisher's own diagonal (exact in every structure).
- ``"obs"``: ``θ_q² / (2 [(F + λI)⁻¹]_qq)`` (Hassibi & Stork, 1993) over the units of
  :mod:`fisherflow.apps.obs`.
- ``"sparsegpt"``: OBS's saliency on a K-FAC Fisher, compensated column by column
  with one Cholesky per layer (:mod:`fisherflow.apps.sparsegpt`; approximate).
- ``"wanda"``: ``|θ_q| · ‖x_j‖`` with ``x_j`` the input feature the weight multiplies
  (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"). The norms come from ``activations`` (``{weight name: (n_in,) tensor}``,
  e.g. the root mean square of each input feature over calibration tokens), or else
  from a K-FAC Fisher: ``sqrt(diag A)``, the root mean square of the layer's inputs
  over the data the Fisher was estimated on (the same ranking within a layer as
  Wanda's ``‖X_j‖₂``, which is ``√N`` times it).

By default the pruned parameters are the weights of ``nn.Linear``, ``nn.Conv1d/2d/3d``
and Hugging Face ``Conv1D`` modules; biases, norms, embeddings (and the output layer
when it is tied to the embedding, since a tied weight is listed once, under the
embedding) are not pruned. ``params`` names any other set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from fisherflow.apps.masks import from_rows, to_rows
from fisherflow.apps.obs import RowUnit, Unit, obs_units
from fisherflow.estimation.handlers import _hf_conv1d
from fisherflow.matrices import KFAC, FisherMatrix
from fisherflow.matrices.validate import all_finite, check_damping

__all__ = ["METHODS", "check_fisher", "row_saliency", "saliency", "weight_matrices"]

#: Saliency methods and whether each needs a Fisher.
METHODS = {"magnitude": False, "obd": True, "obs": True, "sparsegpt": True, "wanda": False}


def weight_matrices(model: nn.Module) -> dict[str, bool]:
    """``{name: input_major}`` of the weights of Linear, Conv and HF ``Conv1D`` modules.

    Example:
        >>> weight_matrices(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        {'0.weight': False, '2.weight': False}
    """
    owner = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for mod_name, module in model.named_modules():
        is_conv1d = _hf_conv1d(module)
        if not (is_conv1d or isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in owner:
            name = owner[id(weight)]
            if name == (f"{mod_name}.weight" if mod_name else "weight"):
                out[name] = is_conv1d
    return out


def _input_major(model: nn.Module) -> dict[str, bool]:
    majors = weight_matrices(model)
    return {n: majors.get(n, False) for n, _ in model.named_parameters()}


def check_fisher(model: nn.Module, fisher: object) -> FisherMatrix:
    """Check that ``fisher`` is a Fisher over parameters of ``model`` with their shapes.

    Raises:
        TypeError: If ``fisher`` is not a :class:`~fisherflow.matrices.FisherMatrix`.
        ValueError: If its layout names a parameter the model lacks or a wrong shape.
    """
    if not isinstance(fisher, FisherMatrix):
        raise TypeError(f"fisher must be a FisherMatrix, got {type(fisher).__name__}")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    unknown = [n for n in fisher.layout.names if n not in shapes]
    wrong = [
        f"{n}: {fisher.layout.shape(n)} vs {shapes[n]}"
        for n in fisher.layout.names
        if n in shapes and fisher.layout.shape(n) != shapes[n]
    ]
    if unknown or wrong:
        raise ValueError(
            "fisher: its layout does not match the model's parameters; "
            f"not in the model: {unknown[:5]}, shape differs (fisher vs model): {wrong[:5]}"
        )
    return fisher


def _targets(
    model: nn.Module, fisher: FisherMatrix | None, params: Iterable[str] | None, method: str
) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        targets = list(weight_matrices(model))
        if not targets:
            raise ValueError("params: the model has no Linear/Conv/Conv1D weight; name params")
    else:
        if isinstance(params, str):
            raise TypeError(f"params must be an iterable of names, got the string {params!r}")
        targets = list(dict.fromkeys(params))
        unknown = [n for n in targets if n not in named]
        if unknown or not targets:
            raise ValueError(f"params must name parameters of the model; unknown: {unknown}")
    if fisher is not None and METHODS[method]:
        missing = [n for n in targets if n not in fisher.layout]
        if missing:
            raise ValueError(
                f"fisher: method {method!r} needs the Fisher of every pruned parameter; "
                f"its layout lacks {missing[:5]} (pass params= to prune fewer)"
            )
    for n in targets:
        if not all_finite(named[n].detach()):
            raise ValueError(f"parameter {n!r} contains NaN or Inf")
    return targets


def _wanda_norms(
    name: str, fisher: FisherMatrix | None, activations: Mapping[str, Tensor] | None
) -> Tensor:
    if activations is not None and name in activations:
        return activations[name]
    if isinstance(fisher, KFAC):
        for g, spec in fisher.kron_groups.items():
            if spec.weight == name:
                a = fisher.A[g]
                d = a if a.dim() == 1 else a.diagonal()
                return d[: d.numel() - (spec.bias is not None)].clamp_min(0).sqrt()
    raise ValueError(
        f"activations: method 'wanda' needs the input norms of {name!r}: pass "
        "activations={name: (n_in,) tensor} or a K-FAC fisher (its input factor)"
    )


def row_saliency(
    model: nn.Module,
    fisher: FisherMatrix | None,
    method: str,
    targets: list[str],
    damping: float,
    rel_damping: float,
    activations: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], list[Unit]]:
    """Saliencies as float64 row views, and the OBS units (empty for other methods)."""
    named = dict(model.named_parameters())
    majors = _input_major(model)
    rows = {n: to_rows(named[n].detach(), majors[n]).to(torch.float64) for n in targets}
    if method == "magnitude":
        return {n: r.abs() for n, r in rows.items()}, []
    if method == "wanda":
        out = {}
        for n, r in rows.items():
            norms = _wanda_norms(n, fisher, activations).detach().to(r)
            if norms.shape != (r.shape[1],) or not all_finite(norms) or bool((norms < 0).any()):
                raise ValueError(
                    f"activations[{n!r}] must be a finite (n_in,) = ({r.shape[1]},) tensor "
                    f">= 0, got shape {tuple(norms.shape)}"
                )
            out[n] = r.abs() * norms[None, :]
        return out, []
    assert fisher is not None
    if method == "obd":
        diag = fisher.layout.unflatten(fisher.diagonal())
        return {
            n: 0.5 * to_rows(diag[n], majors[n]).to(r) * r.square() for n, r in rows.items()
        }, []
    params = {n: named[n] for n in fisher.layout.names}
    if method == "sparsegpt" and (not isinstance(fisher, KFAC) or damping != 0.0):
        raise ValueError(
            "method 'sparsegpt' needs a K-FAC Fisher and damping=0 (use rel_damping), got "
            f"structure {fisher.structure!r} and damping={damping}"
        )
    units = obs_units(fisher, params, targets, majors, damping, rel_damping)
    for unit in units:
        if method == "sparsegpt" and isinstance(unit, RowUnit):
            unit.sequential = True
    scores = {}
    for unit in units:
        for n, inv in unit.inverse_diagonal().items():
            scores[n] = rows[n].square() / (2.0 * inv.to(rows[n]))
    return {n: scores[n] for n in targets}, units


def saliency(
    model: nn.Module,
    fisher: FisherMatrix | None = None,
    method: str = "obd",
    *,
    params: Iterable[str] | None = None,
    damping: float = 0.0,
    rel_damping: float = 0.0,
    activations: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The saliency of every weight to prune (lower = cheaper to remove).

    Args:
        model: The model whose parameters are scored.
        fisher: Its Fisher (any structure, layout a subset of the model's parameters);
            needed by ``"obd"`` and ``"obs"``, optional for ``"wanda"`` (K-FAC input
            norms), unused by ``"magnitude"``.
        method: ``"magnitude"``, ``"obd"``, ``"obs"``, ``"sparsegpt"`` or ``"wanda"``
            (module docstring).
        params: Names of the parameters to score (default: the weight matrices).
        damping: λ >= 0 added to F's diagonal for ``"obs"``.
        rel_damping: λ relative to the mean diagonal of each OBS unit (>= 0).
        activations: ``{weight name: (n_in,) input norms}`` for ``"wanda"``.

    Returns:
        ``{name: float64 tensor of the parameter's shape}``.

    Raises:
        ValueError: For an unknown method, a missing Fisher, a layout that does not
            match the model, unknown ``params``, NaN weights, bad damping, or a
            singular OBS block without damping.
        TypeError: If ``fisher`` is not a Fisher matrix.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> model = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[2.0, -1.0]]))
        >>> F = Diagonal(torch.tensor([1.0, 4.0]), ParamLayout.from_model(model))
        >>> saliency(model, F, "obd")["weight"].tolist()  # ½ F_qq θ_q²
        [[2.0, 2.0]]
    """
    method, fisher = check_method(model, fisher, method)
    lam, rel = check_damping(damping), check_damping(rel_damping, "rel_damping")
    targets = _targets(model, fisher, params, method)
    scores, _ = row_saliency(model, fisher, method, targets, lam, rel, activations)
    majors = _input_major(model)
    named = dict(model.named_parameters())
    return {n: from_rows(s, tuple(named[n].shape), majors[n]) for n, s in scores.items()}


def check_method(
    model: nn.Module, fisher: object, method: object
) -> tuple[str, FisherMatrix | None]:
    """Validate ``method`` and, when given or needed, ``fisher``.

    Raises:
        ValueError: For an unknown method, or no Fisher for a method that needs one.
        TypeError: If ``model`` is not a module or ``fisher`` not a Fisher matrix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    assert isinstance(method, str)
    if fisher is None:
        if METHODS[method]:
            raise ValueError(f"fisher: method {method!r} needs a Fisher matrix, got None")
        return method, None
    return method, check_fisher(model, fisher)
