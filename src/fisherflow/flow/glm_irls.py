"""Full-batch Fisher scoring (IRLS) by streaming passes, with step-halving.

Each pass accumulates the score and information of every batch at fixed
coefficients (:func:`accumulate_pass`), sums them across ranks when a process group
is given (:func:`all_reduce_pass`), and takes one penalised scoring step
(:func:`irls`). A step that makes a mean invalid on some batch (an overflowing or
out-of-range mean) or lowers the log-likelihood is halved, as R's ``glm.fit`` does.
At convergence the coefficients are the (penalised) MLE of the data and the
information is that of a full-batch fit (McCullagh & Nelder 1989, §2.5; Green 1984,
*Iteratively reweighted least squares*; Marschner 2011 on step-halving).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fisherflow.distributed import all_reduce_sum
from fisherflow.flow.families import Family, glm_score_information
from fisherflow.flow.glm_input import DTYPE, GLMBatch, output_kind, unpack_batch
from fisherflow.flow.glm_newton import MAX_HALVINGS, pinv_solve_dense

__all__ = ["IRLSFit", "accumulate_pass", "all_reduce_pass", "irls", "start_pass"]

#: ``read(X, y, row_options, names) -> GLMBatch``: validates one batch.
Reader = Callable[[Any, Any, dict[str, Any], "list[str] | None"], GLMBatch]

_SUMS = ("U", "J", "Jo", "Up", "Jp", "yy", "xy")
_COUNTS = ("ll", "llf", "n", "dev", "pearson", "rows", "correct", "correct_p", "invalid")


def correct_side(y: Tensor, eta: Tensor, active: Tensor) -> int:
    """Observations strictly on the correct side of ``η = 0``."""
    return int((((y == 1) & (eta > 0)) | ((y == 0) & (eta < 0)))[active].sum())


def _read_all(batches: Iterable[Any], names: list[str] | None, read: Reader) -> Iterable[Any]:
    for batch in batches:
        X, y, rows = unpack_batch(batch)
        yield read(X, y, rows, names), X


def start_pass(
    family: Family, batches: Iterable[Any], read: Reader, penalty: float, group: Any = None
) -> tuple[Tensor, list[str], str, Tensor]:
    """Coefficients from one IRLS step off the data (no valid start needed), by streaming.

    Each batch contributes ``XᵀW₀X`` and ``XᵀW₀z₀`` at the data's start mean (see
    :func:`fisherflow.flow.glm_newton.data_start`), summed over ranks with ``group``.

    Returns:
        ``(β₀, column names, output kind, weighted mean of y)``.

    Raises:
        ValueError: On a malformed batch or no observations at all.
    """
    H: Any = 0.0
    g: Any = 0.0
    names: list[str] | None = None
    kind = None
    sums = torch.zeros(2, dtype=DTYPE)
    for batch in batches:
        X, y, rows = unpack_batch(batch)
        b = read(X, y, rows, names)
        names = names or b.names
        kind = kind or output_kind(X)
        mu0 = family.start_mean(b.y, b.w)
        eta0 = family.link.link(mu0)
        dmu = family.link.deriv(eta0)
        z = eta0 + (b.y - mu0) / dmu - (b.offset if b.offset is not None else 0.0)
        W = b.w * dmu**2 / family.variance(mu0)
        H = H + (b.X * W[:, None]).T @ b.X
        g = g + b.X.T @ (W * z)
        sums = sums + torch.stack([(b.w * b.y).sum(), b.w.sum()])
    if names is None or kind is None:
        raise ValueError("refine got no observations (empty data)")
    p = len(names)
    if group is not None:  # every rank must start from the same coefficients
        H = all_reduce_sum(torch.as_tensor(H, dtype=DTYPE), group)
        g = all_reduce_sum(torch.as_tensor(g, dtype=DTYPE), group)
        sums = all_reduce_sum(sums, group)
    beta = pinv_solve_dense(H + penalty * torch.eye(p, dtype=DTYPE), g)
    return beta, names, kind, sums[0] / sums[1].clamp_min(1e-300)


def _constant_mean(family: Family, names: list[str], ybar: Tensor) -> Tensor | None:
    """``g(ȳ)`` on the ``"const"`` column, 0 elsewhere (a valid mean for every family)."""
    if "const" not in names:
        return None
    beta = torch.zeros(len(names), dtype=DTYPE)
    mu = family.start_mean(ybar.reshape(1), torch.ones(1, dtype=DTYPE))
    beta[names.index("const")] = family.link.link(mu)[0]
    return beta


def accumulate_pass(
    family: Family,
    batches: Iterable[Any],
    beta: Tensor,
    names: list[str],
    read: Reader,
    probe: Tensor | None = None,
    *,
    observed: bool = False,
    phi: float = 1.0,
) -> dict[str, Any]:
    """Score, information, log-likelihood and residual sums of one pass at ``beta``.

    ``ll`` is the log-likelihood at unit dispersion (the objective), ``llf`` at
    dispersion ``phi``; ``dev`` the deviance and ``pearson`` the Pearson ``χ²``;
    ``invalid`` counts batches where ``beta`` gives no valid mean (their statistics
    are left out). With ``probe``, the score and information there too.

    Raises:
        ValueError: On a malformed batch or no observations at all.
    """
    acc: dict[str, Any] = dict.fromkeys(_SUMS, 0.0) | dict.fromkeys(_COUNTS, 0.0)
    acc.update(binary=True, kind=None, correct_p=-1)
    for b, X in _read_all(batches, names, read):
        acc["kind"] = acc["kind"] or output_kind(X)
        U, J, ll, eta = glm_score_information(family, b.X, b.y, b.w, beta, b.offset)
        if not family.valid(eta) or not bool(torch.isfinite(J).all() & torch.isfinite(ll)):
            acc["invalid"] += 1
            continue
        mu = family.mean(eta)
        if observed:
            acc["Jo"] = (
                acc["Jo"]
                + glm_score_information(family, b.X, b.y, b.w, beta, b.offset, observed=True)[1]
            )
        acc["U"], acc["J"], acc["ll"] = acc["U"] + U, acc["J"] + J, acc["ll"] + float(ll)
        acc["llf"] += float((b.freq * family.loglik(b.y, mu, phi, b.var_weights)).sum())
        acc["dev"] += float((b.w * family.deviance(b.y, mu)).sum())
        acc["pearson"] += float((b.w * (b.y - mu) ** 2 / family.variance(mu)).sum())
        acc["n"] += float(b.freq.sum())
        if family.has_scale:
            yo = b.y if b.offset is None else b.y - b.offset
            acc["yy"] = acc["yy"] + (b.w * yo * yo).sum()
            acc["xy"] = acc["xy"] + b.X.T @ (b.w * yo)
        active = b.w > 0
        acc["rows"] += int(active.sum())
        acc["binary"] = acc["binary"] and bool(((b.y == 0) | (b.y == 1))[active].all())
        acc["correct"] += correct_side(b.y, eta, active)
        if probe is not None:
            Up, Jp, _, eta_p = glm_score_information(family, b.X, b.y, b.w, probe, b.offset)
            acc["Up"], acc["Jp"] = acc["Up"] + Up, acc["Jp"] + Jp
            acc["correct_p"] = max(acc["correct_p"], 0) + correct_side(b.y, eta_p, active)
    if acc["rows"] == 0 and acc["invalid"] == 0:
        raise ValueError("refine got no observations (empty data)")
    return acc


def all_reduce_pass(acc: dict[str, Any], group: Any) -> dict[str, Any]:
    """Sum one pass's statistics over ranks (``binary`` holds when it holds on every rank)."""
    out = dict(acc)
    for key in _SUMS:
        out[key] = all_reduce_sum(torch.as_tensor(acc[key], dtype=DTYPE), group)
    counts = [acc[k] for k in _COUNTS]
    sums = all_reduce_sum(torch.tensor([*counts, float(not acc["binary"])], dtype=DTYPE), group)
    for i, k in enumerate(_COUNTS):
        out[k] = float(sums[i])
    out["rows"], out["correct"] = int(out["rows"]), int(out["correct"])
    out["binary"] = float(sums[-1]) == 0
    out["correct_p"] = int(out["correct_p"]) if acc["correct_p"] >= 0 else -1
    return out


@dataclass
class IRLSFit:
    """Result of :func:`irls`.

    Attributes:
        beta: Coefficients after the last step.
        information: Penalised information ``J + λI`` at ``beta`` (observed when asked).
        stats: The last pass's statistics (``n``, ``llf``, ``dev``, ``pearson``, ``kind``...).
        names: Column names.
        converged: Whether a step met the tolerance.
        n_iter: Passes run (step-halvings included).
        separated: Whether a binary outcome was perfectly separated.
    """

    beta: Tensor
    information: Tensor
    stats: dict[str, Any]
    names: list[str]
    converged: bool
    n_iter: int
    separated: bool


def _pass(
    family: Family, passes: Callable[[], Iterable[Any]], beta: Tensor, names: list[str],
    read: Reader, probe: Tensor | None, group: Any, observed: bool, phi: float,
) -> dict[str, Any]:  # fmt: skip
    acc = accumulate_pass(family, passes(), beta, names, read, probe, observed=observed, phi=phi)
    return all_reduce_pass(acc, group) if group is not None else acc


def _ml_phi(family: Family, acc: dict[str, Any]) -> float:
    """R's dispersion for ``logLik``: ``deviance / n`` (gaussian, gamma, inverse gaussian)."""
    if not family.ml_scale_llf or acc["n"] <= 0 or acc["dev"] <= 0:
        return 1.0
    return acc["dev"] / acc["n"]


#: Passes the unpenalised probe of :func:`irls` may take in all (R's ``glm.control``
#: ``maxit``) before separation is ruled out.
PROBE_PASSES = 25


def _probe_separates(
    family: Family, passes: Callable[[], Iterable[Any]], probe: Tensor, names: list[str],
    read: Reader, group: Any, max_passes: int,
) -> bool:  # fmt: skip
    """Whether unpenalised Fisher scoring from ``probe`` comes to classify every row.

    Run when the penalised fit converged before its probe settled (a start near the
    penalised estimate, e.g. a one-pass estimate, converges in a pass or two): on
    completely separated data the unpenalised iterates diverge along a separating
    direction and soon classify every outcome correctly (Albert & Anderson 1984,
    *On the existence of maximum likelihood estimates in logistic regression models*);
    otherwise they converge to the unpenalised MLE, and the probe stops there.
    """
    for _ in range(max(max_passes, 0)):
        acc = _pass(family, passes, probe, names, read, None, group, False, 1.0)
        if acc["invalid"] or not acc["binary"]:
            return False
        if acc["rows"] > 0 and acc["correct"] == acc["rows"]:
            return True
        step = pinv_solve_dense(acc["J"], acc["U"])
        if not bool(torch.isfinite(step).all()):
            return False
        probe = probe + step
        if bool((step.abs() <= 1e-8 * (1 + probe.abs())).all()):
            return False
    return False


def irls(
    family: Family,
    passes: Callable[[], Iterable[Any]],
    beta: Tensor | None,
    names: list[str] | None,
    read: Reader,
    *,
    penalty: float,
    n_iter: int,
    tol: float,
    group: Any = None,
    observed: bool = False,
) -> IRLSFit:
    """Penalised Fisher scoring with step-halving, by streaming passes.

    Starts from ``beta`` when it gives a valid mean on every batch, otherwise (and
    for a fresh model) from one IRLS step off the data. With a penalty the fit stays
    finite on separated data; an unpenalised probe iterate run alongside reveals the
    separation (it classifies everything). After the last step one more pass gives
    the information, deviance, Pearson ``χ²`` and R's log-likelihood at the estimate.

    Raises:
        ValueError: On invalid batches, or if no coefficients with a valid mean on
            every batch can be found.
    """
    if beta is None or names is None:
        beta, names, _, _ = start_pass(family, passes(), read, penalty, group)
    p = beta.shape[0]
    eye = torch.eye(p, dtype=DTYPE)
    probe = beta.clone() if family.binary and penalty > 0 else None
    acc = _pass(family, passes, beta, names, read, probe, group, observed, 1.0)
    if acc["invalid"]:  # the current estimate overflows on these data: start afresh
        beta, _, _, ybar = start_pass(family, passes(), read, penalty, group)
        acc = _pass(family, passes, beta, names, read, probe, group, observed, 1.0)
        constant = _constant_mean(family, names, ybar) if acc["invalid"] else None
        if constant is not None:
            beta = constant
            acc = _pass(family, passes, beta, names, read, probe, group, observed, 1.0)
        if acc["invalid"]:
            raise ValueError(
                f"no valid starting coefficients: the {family.name} mean with link "
                f"{family.link.name!r} is out of range on {int(acc['invalid'])} batch(es)"
            )
    converged = separated = False
    prev_beta, prev_obj, prev_acc = beta, -math.inf, acc
    halvings, it = 0, 1
    while True:
        obj = acc["ll"] - 0.5 * penalty * float(beta @ beta) if not acc["invalid"] else -math.inf
        if obj < prev_obj - 1e-12 * (abs(prev_obj) + 1):
            if halvings >= MAX_HALVINGS or it >= n_iter:
                beta, acc = prev_beta, prev_acc
                break
            beta, halvings = (prev_beta + beta) / 2, halvings + 1
        else:
            halvings = 0
            separated = separated or (
                family.binary
                and acc["binary"]
                and (acc["correct"] == acc["rows"] or acc["correct_p"] == acc["rows"])
            )
            if probe is not None:
                p_step = pinv_solve_dense(acc["Jp"], acc["Up"])
                probe = probe + p_step if torch.isfinite(p_step).all() else probe
            step = pinv_solve_dense(acc["J"] + penalty * eye, acc["U"] - penalty * beta)
            if not torch.isfinite(step).all():
                raise FloatingPointError(
                    "Fisher scoring produced a non-finite step; model unchanged"
                )
            prev_beta, prev_obj, prev_acc = beta, obj, acc
            beta = beta + step
            if bool((step.abs() <= tol * (1 + prev_beta.abs())).all()):
                converged = True
            if converged or it >= n_iter:
                break
        it += 1
        acc = _pass(family, passes, beta, names, read, probe, group, observed, 1.0)
    if probe is not None and not separated:
        separated = _probe_separates(family, passes, probe, names, read, group, PROBE_PASSES - it)
    final = _pass(family, passes, beta, names, read, None, group, observed, _ml_phi(family, acc))
    if final["invalid"]:  # pragma: no cover - a converged step keeps the mean valid
        beta, final = prev_beta, prev_acc
    J = (final["Jo"] if observed else final["J"]) + penalty * eye
    final["kind"] = acc["kind"]
    return IRLSFit(beta, J, final, names, converged, it, separated)
