"""``fisherflow stats``: plots of classical Fisher information.

Writes into ``--out``:

* ``fisher_information.png`` — Fisher information across the parameter range
  for Bernoulli (1/(p(1−p))), Poisson (1/λ) and Normal (1/σ², 2/σ²);
* ``fisher_rao_geodesic.png`` — a numerical Fisher–Rao geodesic of the normal
  family in the (μ, σ) half-plane, with the closed-form distance annotated;
* ``jeffreys_prior.png`` — the Bernoulli Jeffreys prior (Beta(½, ½)) and the
  improper Poisson one (∝ λ^{-1/2});
* ``stats.md`` — a short Markdown report listing them.

Files are written atomically (temporary file, then ``os.replace``).
matplotlib and torch are imported inside the functions (see :mod:`fisherflow.cli`);
matplotlib is used through its object API with the Agg canvas (no global pyplot
state, no backend switch).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from fisherflow.cli.args import HelpFormatter, positive_int

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``stats`` subcommand to an argparse ``subparsers`` object.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.

    Returns:
        The ``stats`` sub-parser (its ``func`` default is :func:`run`).
    """
    parser = subparsers.add_parser(
        "stats",
        help="plot classical Fisher information, a Fisher–Rao geodesic and a Jeffreys prior",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("fisherflow-stats"), help="output directory (created)"
    )
    parser.add_argument(
        "--points", type=positive_int, default=64, help="segments of the numerical geodesic (≥ 2)"
    )
    parser.set_defaults(func=run)
    return parser


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _atomic_write_bytes(path, buf.getvalue())


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_information(path: Path) -> dict[str, float]:
    import torch
    from torch.distributions import Bernoulli, Normal, Poisson

    from fisherflow.stats import fisher_information

    d = torch.float64
    fig = _new_figure(11, 3.4)
    axes = fig.subplots(1, 3)
    p = torch.linspace(0.02, 0.98, 200, dtype=d)
    fb = fisher_information(Bernoulli, probs=p)[:, 0, 0]
    axes[0].plot(p, fb)
    axes[0].set(title="Bernoulli: 1/(p(1−p))", xlabel="p", ylabel="F(p)", yscale="log")
    lam = torch.linspace(0.2, 20, 200, dtype=d)
    fp = fisher_information(Poisson, rate=lam)[:, 0, 0]
    axes[1].plot(lam, fp)
    axes[1].set(title="Poisson: 1/λ", xlabel="λ", ylabel="F(λ)", yscale="log")
    s = torch.linspace(0.2, 3, 200, dtype=d)
    fn = fisher_information(Normal, loc=torch.zeros((), dtype=d), scale=s)
    axes[2].plot(s, fn[:, 0, 0], label="F_μμ = 1/σ²")
    axes[2].plot(s, fn[:, 1, 1], label="F_σσ = 2/σ²")
    axes[2].set(title="Normal (μ, σ)", xlabel="σ", ylabel="F", yscale="log")
    axes[2].legend()
    _save(fig, path)
    return {"bernoulli_p0.3": float(fisher_information(Bernoulli, probs=0.3))}


def _plot_geodesic(path: Path, points: int) -> dict[str, float]:
    import torch
    from torch.distributions import Normal

    from fisherflow.stats import fisher_rao_distance, fisher_rao_geodesic

    d = torch.float64
    p = Normal(torch.tensor(-2.0, dtype=d), torch.tensor(0.6, dtype=d))
    q = Normal(torch.tensor(2.0, dtype=d), torch.tensor(1.2, dtype=d))
    closed = float(fisher_rao_distance(p, q))
    geo = fisher_rao_geodesic(p, q, num_points=points)
    fig = _new_figure(6.4, 4.2)
    ax = fig.subplots()
    ax.plot(geo.path[:, 0], geo.path[:, 1], "o-", ms=2.5, label="numerical geodesic")
    ax.plot([-2.0, 2.0], [0.6, 1.2], "--", color="grey", label="straight line")
    ax.scatter([-2.0, 2.0], [0.6, 1.2], color="black", zorder=3)
    ax.set(xlabel="μ", ylabel="σ", title="Fisher–Rao geodesic, normal family", ylim=(0, None))
    ax.annotate(
        f"closed form d = {closed:.6f}\nnumerical d = {float(geo.distance):.6f}",
        xy=(0.03, 0.97),
        xycoords="axes fraction",
        va="top",
    )
    ax.legend(loc="lower right")
    _save(fig, path)
    return {"closed_form": closed, "numerical": float(geo.distance)}


def _plot_jeffreys(path: Path) -> dict[str, float]:
    import torch
    from torch.distributions import Bernoulli, Beta, Poisson

    from fisherflow.stats import jeffreys_prior

    d = torch.float64
    bern = jeffreys_prior(Bernoulli)
    pois = jeffreys_prior(Poisson)
    fig = _new_figure(9, 3.4)
    axes = fig.subplots(1, 2)
    p = torch.linspace(0.005, 0.995, 300, dtype=d)
    axes[0].plot(p, bern.log_prob(p, normalized=True).exp(), label="Jeffreys (numerical)")
    half = torch.tensor(0.5, dtype=d)
    axes[0].plot(p, Beta(half, half).log_prob(p).exp(), "--", label="Beta(½, ½)")
    axes[0].set(title=f"Bernoulli: proper={bern.proper}", xlabel="p", ylabel="density")
    axes[0].legend()
    lam = torch.linspace(0.05, 10, 300, dtype=d)
    axes[1].plot(lam, pois.log_prob(lam).exp())
    axes[1].set(
        title=f"Poisson: ∝ λ^(-1/2), proper={pois.proper}",
        xlabel="λ",
        ylabel="unnormalised density",
    )
    _save(fig, path)
    norm = bern.log_normalizer
    return {"bernoulli_normaliser": math.exp(norm) if norm is not None else math.nan}


def run(args: argparse.Namespace) -> int:
    """Write the plots and ``stats.md`` into ``args.out``.

    Args:
        args: parsed arguments with ``out`` (directory) and ``points``.

    Returns:
        Process exit status 0.

    Raises:
        ValueError: If ``points`` < 2 (``fisherflow`` prints it as one line, exit 2).
    """
    out = Path(args.out)
    points = int(getattr(args, "points", 64))
    if points < 2:
        raise ValueError(f"--points must be an integer >= 2, got {points}")
    out.mkdir(parents=True, exist_ok=True)
    info = _plot_information(out / "fisher_information.png")
    geo = _plot_geodesic(out / "fisher_rao_geodesic.png", points)
    jef = _plot_jeffreys(out / "jeffreys_prior.png")
    md = "\n".join(
        [
            "# fisherflow stats",
            "",
            "| plot | what it shows |",
            "|---|---|",
            "| [fisher_information.png](fisher_information.png) | Fisher information of "
            f"Bernoulli, Poisson, Normal across the parameter range (Bernoulli p = 0.3: "
            f"{info['bernoulli_p0.3']:.4f} = 1/(p(1−p))) |",
            "| [fisher_rao_geodesic.png](fisher_rao_geodesic.png) | Fisher–Rao geodesic from "
            f"N(−2, 0.6²) to N(2, 1.2²): closed form {geo['closed_form']:.6f}, numerical "
            f"{geo['numerical']:.6f} |",
            "| [jeffreys_prior.png](jeffreys_prior.png) | Jeffreys priors: Bernoulli (proper, "
            f"normaliser {jef['bernoulli_normaliser']:.6f} ≈ π → Beta(½, ½)); Poisson "
            "(improper, ∝ λ^(-1/2)) |",
            "",
        ]
    )
    _atomic_write_bytes(out / "stats.md", md.encode("utf-8"))
    print(f"fisherflow stats: wrote 3 plots and stats.md to {out}")
    return 0
