"""Out-of-distribution scores from a Laplace posterior, and their detection metrics.

Every score is a function of the linearised (GLM) predictive of a classifier: the
logits at an input are ``N(f, J Σ Jᵀ)`` under ``θ ~ N(θ*, Σ)`` (see
:mod:`fisherflow.uncertainty.predictive`). With ``S`` logit draws ``f_s`` and their
class probabilities ``p_s``, and the predictive mean ``p̄ = (1/S) Σ_s p_s``:

- ``max_prob``: ``max_c p̄_c`` (Hendrycks & Gimpel (2017), "A baseline for detecting
  misclassified and out-of-distribution examples", ICLR); *lower* means more OOD;
- ``entropy``: ``H(p̄) = −Σ_c p̄_c log p̄_c``;
- ``mutual_information``: BALD, ``H(p̄) − (1/S) Σ_s H(p_s)``, the information the label
  carries about the parameters (Houlsby et al. (2011), "Bayesian active learning for
  classification and preference learning"); it is ≥ 0 by concavity of ``H``;
- ``variance``: ``Σ_c Var_s(p_{s,c})``, the posterior variance of the probability
  vector (summed over classes);
- ``logit_variance``: ``tr(J Σ Jᵀ)``, exact (no sampling);
- ``fisher_norm``: ``gᵀ Σ g`` for the score ``g = ∇_θ log p(ŷ | x, θ*)`` of the
  predicted label ``ŷ`` — the squared norm of the score in the posterior's metric,
  ``(F / T + τI)⁻¹``; as ``g = Jᵀ r`` with ``r = e_ŷ − softmax(f)`` (``ŷ − σ(f)`` for a
  Bernoulli output), ``gᵀ Σ g = rᵀ (J Σ Jᵀ) r``, and ``Σ Jᵀ`` is the structure's
  ``solve`` (never a P×P matrix for K-FAC, diagonal, low-rank).

A Bernoulli output is scored as the two classes ``(1 − σ(f), σ(f))``. The metrics
(:func:`ood_auroc`, :func:`fpr_at_tpr`) are scikit-learn's ROC computations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fisherflow.uncertainty.predictive import sample_outputs

if TYPE_CHECKING:
    from fisherflow.uncertainty.laplace import Laplace

__all__ = [
    "HIGHER_IS_OOD",
    "OODScores",
    "fpr_at_tpr",
    "ood_auroc",
    "ood_metrics",
    "ood_scores",
    "scores_from_draws",
]

#: For each score, whether a larger value means "more out-of-distribution".
HIGHER_IS_OOD: dict[str, bool] = {
    "max_prob": False,
    "entropy": True,
    "mutual_information": True,
    "variance": True,
    "logit_variance": True,
    "fisher_norm": True,
}

#: Likelihoods with class probabilities to score.
CLASSIFICATION = ("categorical", "bernoulli")


@dataclass(frozen=True)
class OODScores:
    """Per-input OOD scores, each a float64 ``(M,)`` tensor (one value per observation).

    See the module docstring for the formulas; :data:`HIGHER_IS_OOD` gives each
    score's direction.
    """

    max_prob: Tensor
    entropy: Tensor
    mutual_information: Tensor
    variance: Tensor
    logit_variance: Tensor
    fisher_norm: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """The scores as ``{name: tensor}``, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


def scores_from_draws(probs: Tensor) -> dict[str, Tensor]:
    """Max probability, entropy, BALD mutual information and variance of probability draws.

    Args:
        probs: ``(S, M, C)`` class probabilities of ``S`` posterior draws at ``M`` inputs.

    Returns:
        ``{"max_prob", "entropy", "mutual_information", "variance"}``, each ``(M,)``.

    Example:
        >>> p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident, opposite draws
        >>> out = scores_from_draws(p)
        >>> out["max_prob"].item(), round(out["mutual_information"].item(), 4)  # log 2
        (0.5, 0.6931)
    """
    mean = probs.mean(0)
    entropy = _entropy(mean)
    return {
        "max_prob": mean.max(-1).values,
        "entropy": entropy,
        "mutual_information": (entropy - _entropy(probs).mean(0)).clamp_min(0),
        "variance": probs.var(0, correction=0).sum(-1),
    }


def _chunks(x: Any, batch_size: int) -> Iterator[Any]:
    """Row chunks of a tensor input; any other input is one chunk."""
    if isinstance(x, Tensor) and x.dim() > 0:
        yield from torch.split(x, batch_size)
    else:
        yield x


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _chunk_scores(
    la: Laplace, mean: Tensor, cov: Tensor, n_samples: int, gen: torch.Generator | None
) -> OODScores:
    draws = sample_outputs(mean, cov, n_samples, gen)
    if la.likelihood.name == "bernoulli":
        p1 = torch.sigmoid(draws)
        probs = torch.cat([1 - p1, p1], -1)
        q = torch.sigmoid(mean)
        residual = (q > 0.5).to(q.dtype) - q  # ŷ − σ(f)
    else:
        probs = torch.softmax(draws, -1)
        q = torch.softmax(mean, -1)
        residual = torch.nn.functional.one_hot(q.argmax(-1), q.shape[-1]).to(q.dtype) - q
    fisher_norm = torch.einsum("mc,mcd,md->m", residual, cov, residual)
    return OODScores(
        **scores_from_draws(probs),
        logit_variance=cov.diagonal(dim1=-2, dim2=-1).sum(-1),
        fisher_norm=fisher_norm,
    )


def ood_scores(
    la: Laplace,
    x: Any,
    *,
    n_samples: int = 100,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> OODScores:
    """OOD scores of a classifier's Laplace posterior at inputs ``x``.

    Args:
        la: A :class:`~fisherflow.uncertainty.Laplace` with a categorical or Bernoulli
            likelihood and a Fisher (given or fitted).
        x: Inputs: any batch the model takes (its GLM predictive is computed
            ``batch_size`` rows at a time, :meth:`Laplace.glm_predictive`).
        n_samples: Logit draws from the linearised predictive (for the sampled scores).
        batch_size: Rows per chunk of the predictive (and observations per chunk of
            the logit draws).
        generator: Random generator for the draws.
        progress: Show a progress bar over chunks.

    Returns:
        :class:`OODScores`, float64 ``(M,)`` tensors (``M`` observations: rows, or rows
        × positions for a sequence output).

    Raises:
        ValueError: If the likelihood is not a classification one, ``n_samples`` or
            ``batch_size`` is not a positive integer, or the posterior has no Fisher.

    Example:
        >>> from torch import nn
        >>> from fisherflow.matrices import Dense, ParamLayout
        >>> import fisherflow as ff
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> _ = model.weight.data.fill_(0.0)
        >>> F = Dense(torch.tensor([[3.0]], dtype=torch.float64),
        ...           ParamLayout.from_shapes({"weight": (1, 1)}), likelihood="bernoulli")
        >>> la = ff.Laplace(model, likelihood="bernoulli", fisher=F, prior_precision=1.0)
        >>> s = ood_scores(la, torch.tensor([[2.0]], dtype=torch.float64))
        >>> s.logit_variance.item(), s.fisher_norm.item()  # x²/(F+τ) = 1; (1 − ½)² · 1
        (1.0, 0.25)
    """
    if la.likelihood.name not in CLASSIFICATION:
        raise ValueError(
            f"ood_scores needs a classification likelihood {list(CLASSIFICATION)}, got "
            f"{la.likelihood.name!r}"
        )
    n_samples = _check_int(n_samples, "n_samples")
    batch_size = _check_int(batch_size, "batch_size")
    mean, cov, _ = la.glm_predictive(x, batch_size, progress=progress)  # (M, C), (M, C, C)
    # the draws of ``batch_size`` observations at a time bound their memory
    parts = [
        _chunk_scores(la, m, c, n_samples, generator)
        for m, c in zip(torch.split(mean, batch_size), torch.split(cov, batch_size), strict=True)
    ]
    return OODScores(
        **{name: torch.cat([getattr(p, name) for p in parts]).double() for name in HIGHER_IS_OOD}
    )


def _labelled(scores_in: Any, scores_out: Any, higher_is_ood: bool) -> tuple[Any, Any]:
    a = np.asarray(torch.as_tensor(scores_in).detach().cpu().double().reshape(-1))
    b = np.asarray(torch.as_tensor(scores_out).detach().cpu().double().reshape(-1))
    for name, arr in (("scores_in", a), ("scores_out", b)):
        if arr.size == 0:
            raise ValueError(f"{name} must hold at least one score, got none")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite, got NaN or infinite values")
    score = np.concatenate([a, b]) if higher_is_ood else -np.concatenate([a, b])
    is_ood = np.concatenate([np.zeros(a.size), np.ones(b.size)])
    return is_ood, score


def ood_auroc(scores_in: Any, scores_out: Any, higher_is_ood: bool = True) -> float:
    """Area under the ROC curve for telling OOD inputs (positives) from in-distribution.

    Args:
        scores_in: Scores of in-distribution inputs (tensor or array).
        scores_out: Scores of out-of-distribution inputs.
        higher_is_ood: Whether a larger score means more OOD (``False`` for
            ``max_prob``; see :data:`HIGHER_IS_OOD`).

    Returns:
        AUROC in ``[0, 1]`` (0.5: no separation), scikit-learn's ``roc_auc_score``.

    Raises:
        ValueError: If either set is empty or holds NaN/Inf.

    Example:
        >>> ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.15, 0.9]))  # 3 of 4 pairs
        0.75
    """
    from sklearn.metrics import roc_auc_score

    is_ood, score = _labelled(scores_in, scores_out, higher_is_ood)
    return float(roc_auc_score(is_ood, score))


def fpr_at_tpr(
    scores_in: Any, scores_out: Any, higher_is_ood: bool = True, tpr: float = 0.95
) -> float:
    """FPR@95: the fraction of OOD inputs accepted when ``tpr`` of in-distribution ones are.

    In-distribution inputs are the positives (Liang, Li & Srikant (2018), "Enhancing
    the reliability of out-of-distribution image detection", ICLR): the threshold is
    the first of scikit-learn's ``roc_curve`` that keeps at least ``tpr`` of them.

    Args:
        scores_in: Scores of in-distribution inputs.
        scores_out: Scores of out-of-distribution inputs.
        higher_is_ood: Whether a larger score means more OOD.
        tpr: The true-positive rate, in ``(0, 1]``.

    Returns:
        The false-positive rate in ``[0, 1]`` (lower is better).

    Raises:
        ValueError: If ``tpr`` is not in ``(0, 1]`` or a set is empty or not finite.

    Example:
        >>> fpr_at_tpr(torch.tensor([0.1, 0.2]), torch.tensor([0.15, 0.9]))  # 0.15 passes
        0.5
    """
    from sklearn.metrics import roc_curve

    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0 < tpr <= 1:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    is_ood, score = _labelled(scores_in, scores_out, higher_is_ood)
    fpr, tprs, _ = roc_curve(1 - is_ood, -score)  # in-distribution positive
    return float(fpr[int(np.searchsorted(tprs, tpr - 1e-12, side="left"))])


def ood_metrics(scores_in: OODScores, scores_out: OODScores) -> dict[str, dict[str, float]]:
    """AUROC and FPR@95 of every score, each in its own direction.

    Args:
        scores_in: :func:`ood_scores` of in-distribution inputs.
        scores_out: :func:`ood_scores` of out-of-distribution inputs.

    Returns:
        ``{score name: {"auroc": float, "fpr95": float}}``.
    """
    out: dict[str, dict[str, float]] = {}
    for name, higher in HIGHER_IS_OOD.items():
        a, b = getattr(scores_in, name), getattr(scores_out, name)
        out[name] = {"auroc": ood_auroc(a, b, higher), "fpr95": fpr_at_tpr(a, b, higher)}
    return out
