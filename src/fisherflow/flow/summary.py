"""A statsmodels-like text table for :class:`fisherflow.flow.OnlineGLM`."""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

__all__ = ["format_summary"]


def format_summary(
    *,
    family: str,
    link: str,
    names: list[str],
    params: np.ndarray,
    bse: np.ndarray,
    alpha: float,
    nobs: float,
    df_resid: float,
    scale: float,
    llf: float | None,
    structure: str,
    forgetting: str,
    converged: bool | None,
    estimate: str = "",
    cov_type: str = "expected",
) -> str:
    """Format coefficients with std err, z, two-sided p-value and Wald interval.

    ``estimate`` says where the estimate comes from (one pass or a full-batch fit,
    and the rows behind the information); ``cov_type`` which information it uses.

    Returns:
        The table as one string.

    Example:
        >>> print(format_summary(family="gaussian", link="identity", names=["a"],
        ...       params=np.array([1.0]), bse=np.array([0.5]), alpha=0.05, nobs=10,
        ...       df_resid=9, scale=1.0, llf=None, structure="dense", forgetting="none",
        ...       converged=None).splitlines()[-2].split()[:4])
        ['a', '1.0000', '0.5000', '2.000']
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    z = float(sps.norm.isf(alpha / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        zval = params / bse
    pval = 2 * sps.norm.sf(np.abs(zval))
    lo, hi = params - z * bse, params + z * bse
    width = max([len(n) for n in names] + [8])
    lines = [
        "Fisher Flow online GLM results".center(width + 66),
        "=" * (width + 66),
        f"Family: {family:<14} Link: {link:<10} No. Observations: {nobs:<12g}",
        f"Structure: {structure:<11} Df Residuals: {df_resid:<12g} Scale: {scale:.6g}",
        f"Forgetting: {forgetting:<30} Log-Likelihood: "
        + (f"{llf:.6g}" if llf is not None else "n/a (one pass; call refine)"),
        f"Converged: {converged!s:<10} Covariance: {cov_type} information",
        f"Estimate: {estimate}",
        "-" * (width + 66),
        f"{'':<{width}} {'coef':>10} {'std err':>10} {'z':>9} {'P>|z|':>8} "
        f"{f'[{alpha / 2:g}':>11} {f'{1 - alpha / 2:g}]':>11}",
        "-" * (width + 66),
    ]
    for i, name in enumerate(names):
        lines.append(
            f"{name:<{width}} {params[i]:>10.4f} {bse[i]:>10.4f} {zval[i]:>9.3f} "
            f"{pval[i]:>8.3f} {lo[i]:>11.4f} {hi[i]:>11.4f}"
        )
    lines.append("=" * (width + 66))
    return "\n".join(lines)
