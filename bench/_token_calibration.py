"""Held-out selection of (T, τ) and its test-split report, for bench_token_intervals.py."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

import fisherflow as ff


def _q(t: Tensor, q: float) -> float:
    return float(t.double().quantile(q))


def select(
    la: ff.Laplace, val: Tensor, t_grid: Tensor, tau_grid: Tensor
) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """Both searches on the validation rows; Markdown lines and the settings found."""
    start = time.perf_counter()
    evid = ff.llm.optimize_temperature(la, val, grid=t_grid, prior_precision="marglik")
    t_evid = time.perf_counter() - start
    start = time.perf_counter()
    joint = ff.llm.optimize_temperature(la, val, grid=t_grid, prior_precision=tau_grid)
    t_joint = time.perf_counter() - start
    lines = [
        "| T | τ (evidence at T) | validation NLL |",
        "|---|---|---|",
    ]
    for i, t in enumerate(t_grid.tolist()):
        lines.append(
            f"| {t:g} | {float(evid.prior_precisions[i, 0]):.3g} | {float(evid.scores[i, 0]):.4f} |"
        )
    head = " | ".join(f"τ = {v:g}" for v in tau_grid.tolist())
    lines += [
        "",
        "Joint grid, validation NLL (nats per token):",
        "",
        f"| T | {head} |",
        "|---|" + "---|" * tau_grid.numel(),
    ]
    for i, t in enumerate(t_grid.tolist()):
        cells = " | ".join(f"{float(v):.4f}" for v in joint.scores[i])
        lines.append(f"| {t:g} | {cells} |")
    best_evid = (evid.temperature, float(evid.prior_precision))
    best_joint = (joint.temperature, float(joint.prior_precision))
    lines += [
        "",
        f"Selected: evidence-τ search T = {best_evid[0]:g}, τ = {best_evid[1]:.3g} "
        f"(validation NLL {float(evid.scores.min()):.4f}; {t_evid:.0f} s); joint search "
        f"T = {best_joint[0]:g}, τ = {best_joint[1]:.3g} (validation NLL "
        f"{float(joint.scores.min()):.4f}; {t_joint:.0f} s).",
    ]
    chosen = best_joint if float(joint.scores.min()) < float(evid.scores.min()) else best_evid
    return lines, {"evidence": best_evid, "joint": best_joint, "chosen": chosen}


def _intervals(la: ff.Laplace, ids: Tensor, top_k: int) -> Any:
    parts = [ff.llm.token_intervals(la, row, top_k=top_k) for row in ids.split(8)]
    cat = {
        k: torch.cat([getattr(p, k) for p in parts])
        for k in ("token_ids", "mean", "lower", "upper")
    }
    return ff.llm.TokenIntervals(**cat, level=0.9, method="linearized")


def report(
    la: ff.Laplace, test: Tensor, settings: dict[str, tuple[float, float]], top_k: int = 10
) -> list[str]:
    """Test-split NLL and widths per setting; reliability of the chosen one."""
    targets = torch.full_like(test, -100)
    targets[:, :-1] = test[:, 1:]
    map_nll = torch.cat([ff.llm.next_token_nll(la, r, method="map") for r in test.split(8)])
    lines = [
        "| posterior | T | τ | test NLL (probit) | Δ vs MAP | top-token width: median | q90 |",
        "|---|---|---|---|---|---|---|",
        f"| MAP (no posterior) | – | – | {float(map_nll.mean()):.4f} | 0 | 0 | 0 |",
    ]
    for label, (t, tau) in settings.items():
        la.temperature, la.prior_precision = t, tau
        nll = torch.cat([ff.llm.next_token_nll(la, r) for r in test.split(8)])
        iv = _intervals(la, test, 1)
        w = iv.width[:, :-1, 0].reshape(-1)
        lines.append(
            f"| {label} | {t:g} | {tau:.3g} | {float(nll.mean()):.4f} | "
            f"{float(nll.mean() - map_nll.mean()):+.4f} | {_q(w, 0.5):.3f} | {_q(w, 0.9):.3f} |"
        )
    t, tau = settings["chosen"]
    la.temperature, la.prior_precision = t, tau
    rel = ff.llm.interval_reliability(_intervals(la, test, top_k), targets, n_bins=10)
    lines += [
        "",
        f"**Reliability of the chosen posterior's 90% intervals** (T = {t:g}, τ = {tau:.3g}) "
        f"on the test split: the top {top_k} candidates at each of "
        f"{int(rel['count'].sum()) // top_k:,} "
        "positions, in 10 equal-count bins of the posterior mean probability; observed = "
        "frequency with which the candidate was the next token (± binomial standard error).",
        "",
        "| bin | pairs | mean prob. | mean lower | mean upper | observed | ± s.e. | inside |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in range(rel["count"].numel()):
        lines.append(
            f"| {b + 1} | {int(rel['count'][b])} | {float(rel['mean'][b]):.4f} | "
            f"{float(rel['lower'][b]):.4f} | {float(rel['upper'][b]):.4f} | "
            f"{float(rel['observed'][b]):.4f} | {float(rel['stderr'][b]):.4f} | "
            f"{'yes' if rel['inside'][b] else 'no'} |"
        )
    return lines
