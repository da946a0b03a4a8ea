"""The reusable Fisher estimator: fed batch by batch, summed across ranks, built on demand.

:class:`FisherEstimator` is how optimizers and custom training loops get a Fisher;
:func:`~fisherflow.estimation.estimate` is a short loop over it. It owns the per-model
state an estimate needs (the parameter layout, the layer capture, the plan of which
layers are Kronecker-factored), the accumulator of the requested structure, the MC
label sampler and the observation count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from fisherflow.distributed import all_reduce_sum, is_distributed
from fisherflow.estimation.accumulate import Accumulator, Plan
from fisherflow.estimation.accumulators import ACCUMULATORS, make_accumulator
from fisherflow.estimation.capture import Capture
from fisherflow.estimation.checks import check_total
from fisherflow.estimation.data import (
    Forward,
    batch_rows,
    default_forward,
    evaluating,
    output_tensor,
    split_batch,
)
from fisherflow.estimation.engine import (
    Check,
    Recheck,
    build_plan,
    model_signature,
    probe,
    run_pass,
)
from fisherflow.estimation.likelihoods import Likelihood
from fisherflow.estimation.prepare import (
    CONVENTIONS,
    check_arguments,
    prepared,
    resolve_likelihood,
)
from fisherflow.matrices import FisherMatrix, ParamLayout

__all__ = ["FisherEstimator"]


class FisherEstimator:
    """The Fisher information of a model, accumulated batch by batch.

    The way optimizers and custom training loops get a Fisher: feed batches with
    :meth:`update` (or, reusing a training step's forward, :meth:`update_from`), sum
    the statistics across ``torch.distributed`` ranks with :meth:`all_reduce`, and
    build the :class:`~fisherflow.matrices.FisherMatrix` with :meth:`result` — as
    often as needed: building leaves the statistics as they are, and :meth:`reset`
    starts over. The result holds the **sum** over the ``num_samples`` observations
    fed (every unmasked token of a sequence is one). Kinds, structures, supported
    layers and conventions are those of :func:`~fisherflow.estimation.estimate`,
    which is a loop over this class and gives bit-identical results on the same
    batches.

    A typical loop refreshes the curvature every few steps::

        est = FisherEstimator(model, "categorical", "mc", "kfac")
        for step, batch in enumerate(loader):
            est.update(batch)                 # one more batch of statistics
            if step % 10 == 9:
                est.all_reduce()              # a no-op without a process group
                F = est.result()              # e.g. F.solve(grad, damping=1e-3)
                est.reset()

    The first :meth:`update` also checks the layer hooks against autograd on its
    batch (parameters the hooks would miss fall back to per-sample gradients, with a
    :class:`~fisherflow.estimation.FallbackNotice`). :meth:`update` runs the model in
    ``eval()`` mode (dropout off) and restores its mode.

    **Passes.** ``passes`` is how many passes over the data the structure may take:
    1, or 2 for ``"ekfac"`` (K-FAC's eigenbasis first, then eigenvalue corrections
    in it). After feeding every batch once, call :meth:`finish_pass`: it returns
    ``False`` when the estimate is complete — EKFAC replays the first pass's
    statistics (the same MC labels) when they fit
    :data:`~fisherflow.estimation.accumulate.REPLAY_BYTES` — and ``True`` when the
    same batches must be fed again (``current_pass`` then counts the pass being
    fed; call :meth:`finish_pass` again at its end). :meth:`result` finishes a
    pending pass itself when no data is needed. A single-pass structure never
    finishes: it keeps accumulating. A finished EKFAC takes no more batches until
    :meth:`reset`.

    **Ranks.** Each rank feeds its own shard; :meth:`all_reduce` then sums every
    rank's statistics and observation count, so every rank holds the estimate on
    the union of the shards (exactly, for ``"exact"`` and ``"empirical"``;
    ``"mc"`` draws different labels per rank). Call it once per pass, after the
    pass's last batch and before :meth:`finish_pass` (EKFAC's replayed
    corrections are summed in the same group by :meth:`finish_pass`); feeding more
    after it needs :meth:`reset` (or the next pass) first.

    Args:
        model: A ``torch.nn.Module``.
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"``,
            ``"poisson"``, a registered name or a :class:`Likelihood`.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        structure: ``"dense"``, ``"diagonal"``, ``"block"``, ``"kfac"``,
            ``"ekfac"`` or ``"lowrank"``.
        mc_samples: Sampled labels per observation (``"mc"``).
        rank: Rank of ``"lowrank"`` (other structures ignore it).
        params: Parameter names the Fisher covers (default: every trainable one).
        convention: K-FAC's treatment of layers shared over positions: ``"expand"``
            (every position is an input vector) or ``"reduce"`` (averaged per row).
        forward: Calls the model, ``forward(model, inputs) -> output`` (default:
            ``model(inputs)``, or ``model(**inputs)`` for a dict).
        shift_labels: Whether the dict labels of a causal LM are shifted by one
            (``None``: decided per batch by
            :func:`~fisherflow.estimation.data.split_batch`).
        seed: Seed of the MC label sampler (re-seeded by :meth:`reset`).
        **likelihood_options: Options of a named likelihood (e.g. ``variance=0.5``).

    Raises:
        TypeError: If ``model`` is not a module, ``forward`` is not callable, or a
            likelihood option is unknown (named in the error).
        ValueError: For an unknown kind, structure, likelihood or convention, a bad
            ``mc_samples``, ``rank`` or ``seed``, or ``params`` selecting nothing.

    Example:
        A linear model with a Gaussian likelihood (σ² = 1) has Fisher ``Σ x xᵀ``:

        >>> model = nn.Linear(2, 1, bias=False)
        >>> est = FisherEstimator(model, "gaussian", "exact", "dense")
        >>> for x in (torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 3.0]])):
        ...     _ = est.update((x, None))
        >>> est.result().to_dense().tolist()
        [[1.0, 2.0], [2.0, 13.0]]
        >>> est.num_samples
        2
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        kind: str,
        structure: str = "diagonal",
        *,
        mc_samples: int = 1,
        rank: int = 10,
        params: Iterable[str] | None = None,
        convention: str = "expand",
        forward: Forward | None = None,
        shift_labels: bool | None = None,
        seed: int | None = None,
        **likelihood_options: float,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_arguments(kind, structure, mc_samples, rank, convention, seed)
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be callable or None, got {type(forward).__name__}")
        self.model, self.kind, self.structure = model, kind, structure
        self.mc_samples, self.convention, self.seed = mc_samples, convention, seed
        self.shift_labels = shift_labels
        self.likelihood = resolve_likelihood(likelihood, likelihood_options)
        self._model_sig = model_signature(model)
        self._prep = prepared(model, None if params is None else tuple(params), self._model_sig)
        if self._prep.layout.size == 0:
            raise ValueError("params selects no trainable parameters")
        p0 = next(p for n, p in model.named_parameters() if n in self._prep.layout)
        self._stat = torch.float64 if p0.dtype == torch.float64 else torch.float32
        self._device = p0.device
        self._forward = forward or default_forward
        #: Estimator options mapped to accumulator options by the structure table.
        self._options = {"rank": rank}
        self._capture: Capture | None = None
        self._shared = False
        self.reset()

    # ------------------------------------------------------------------ state
    @property
    def layout(self) -> ParamLayout:
        """The layout of the estimated parameters."""
        return self._prep.layout

    @property
    def num_samples(self) -> int:
        """Observations fed so far (summed over ranks after :meth:`all_reduce`)."""
        return self._count

    @property
    def passes(self) -> int:
        """Passes over the data the structure may take (2 for ``"ekfac"``, else 1)."""
        return ACCUMULATORS[self.structure].accumulator.passes

    @property
    def current_pass(self) -> int:
        """The pass :meth:`update` feeds (0 for the first)."""
        return self._pass

    def reset(self) -> None:
        """Drop every statistic and start a new estimate (the MC sampler re-seeded).

        The next :meth:`update` checks the hooks again on its batch.
        """
        self._acc: Accumulator | None = None
        self._check: Check | None = None
        self._started = False
        self._count = 0
        self._pass = 0
        self._batches = 0  # fed in the current pass
        self._finished = False
        self._reduced = False
        self._generator = torch.Generator(device=self._device)
        self._generator.manual_seed(0 if self.seed is None else int(self.seed))

    def _share_cached_capture(self) -> None:
        """Use the capture cached per model (one-shot estimates; see ``estimate``)."""
        self._shared = True

    def _capture_of(self) -> Capture:
        if self._shared:
            if self._prep.capture is None:
                self._prep.capture = Capture(self.model, self._prep.layout, self._stat)
            return self._prep.capture
        if self._capture is None:
            self._capture = Capture(self.model, self._prep.layout, self._stat)
        return self._capture

    def _begin(self, batch: Any, caller: str) -> Capture:
        """The capture, after the first batch's hook check has been set up."""
        if self._finished:
            raise RuntimeError(
                f"{caller}(): the {self.structure!r} estimate is complete; call reset() "
                "to start a new one"
            )
        if self._reduced:
            raise RuntimeError(
                f"{caller}() after all_reduce() in the same pass: the reduced statistics "
                "would be summed again; call reset() first"
            )
        capture = self._capture_of()
        if not self._started:
            capture.reset()  # a fresh hooked set; the fallback notices fire again
            self._check = probe(
                self.model,
                batch,
                capture,
                forward=self._forward,
                shift_labels=self.shift_labels,
                device=self._device,
                model_sig=self._model_sig,
            )
            self._started = True
        return capture

    def _plan(self, capture: Capture) -> Plan:
        """The (cached) plan for the parameters the capture currently hooks."""
        key = (frozenset(capture.hooked), self.convention)
        plan = self._prep.plans.get(key)
        if plan is None:
            reduce = CONVENTIONS[self.convention]
            plan = build_plan(capture, self._prep.layout, self._stat, self._device, reduce)
            self._prep.plans[key] = plan
        return plan

    def _feed(self, batch: Any, capture: Capture, forward: Forward) -> int:
        """One pass over one batch (again from a fresh plan if the hook check demotes)."""
        try:
            while True:
                if self._acc is None:
                    plan = self._plan(capture)
                    self._acc = make_accumulator(self.structure, plan, **self._options)
                try:
                    count = run_pass(
                        self.model,
                        [batch],
                        capture,
                        [self._acc],
                        lik=self.likelihood,
                        kind=self.kind,
                        mc_samples=self.mc_samples,
                        generator=self._generator,
                        forward=forward,
                        shift_labels=self.shift_labels,
                        device=self._device,
                        stat=self._stat,
                        check=self._check,
                    )
                except Recheck:  # raised before anything is accumulated
                    if self._check is None:  # pragma: no cover - only with a check
                        raise
                    self._check.demote(capture)
                    self._acc = None
                    continue
                break
        finally:
            capture.start(0)  # drop the batch's records (activations, graph)
        self._check = None
        self._batches += 1
        if self._pass == 0:  # later passes revisit the same observations
            self._count += count
        return count

    # ------------------------------------------------------------------ feeding
    def update(self, batch: Any) -> int:
        """Add one batch: a forward with the capture on, then one backward per score.

        Args:
            batch: ``(inputs, targets)`` or a dict with ``"labels"`` (one batch of
                what :func:`~fisherflow.estimation.estimate` streams).

        Returns:
            The number of observations in the batch.

        Raises:
            RuntimeError: After :meth:`all_reduce` in the same pass, or once a
                multi-pass estimate is complete (call :meth:`reset`).
            ValueError: For NaN/Inf outputs or targets the likelihood rejects.
            TypeError: If the batch has the wrong form.
        """
        with evaluating(self.model):
            capture = self._begin(batch, "update")
            return self._feed(batch, capture, self._forward)

    @contextlib.contextmanager
    def update_from(self, batch: Any) -> Iterator[Callable[[Any], None]]:
        """Add one batch whose forward the caller runs, e.g. a training step's.

        Inside the ``with`` block the estimator's hooks are on: run the forward and
        pass its output to ``record``, which turns the hooks off. Then compute the
        loss and call ``loss.backward(retain_graph=True)`` — the estimator's own
        backward passes, run when the block exits, need the graph and free it. The
        model keeps its mode (with dropout on, the Fisher is taken at the mask that
        forward drew); the parameters' ``.grad`` are left to the caller's backward.
        A forward the estimator must repeat (a first batch whose hook check demotes
        parameters, per-sample fallbacks) runs ``forward`` itself.

        Example (``step`` is the caller's optimizer)::

            with estimator.update_from((x, y)) as record:
                output = model(x)
                record(output)
                loss_fn(output, y).backward(retain_graph=True)
            step.step()

        Args:
            batch: The batch the caller's forward runs on, as for :meth:`update`
                (its targets give the scores).

        Yields:
            ``record(output)``: call it once with the model output of the forward.

        Raises:
            RuntimeError: If ``record`` is not called exactly once in the block, and
                as :meth:`update`.
            ValueError: If the recorded output has no autograd graph.
        """
        capture = self._begin(batch, "update_from")
        seen: list[tuple[Any, list[Any], dict[int, Any], set[str]]] = []
        hooks = contextlib.ExitStack()

        def record(output: Any) -> None:
            if seen:
                raise RuntimeError("update_from: record() was already called in this block")
            if output_tensor(output).grad_fn is None:
                raise ValueError(
                    "update_from: the recorded output has no autograd graph; run the "
                    "forward with gradients enabled"
                )
            hooks.close()
            seen.append(
                (output, list(capture.records), dict(capture.unbatched), set(capture.failed))
            )

        capture.start(batch_rows(split_batch(batch, self.shift_labels).inputs))
        hooks.enter_context(capture)
        try:
            yield record
        except BaseException:
            hooks.close()
            capture.start(0)
            raise
        hooks.close()
        if not seen:
            capture.start(0)
            raise RuntimeError("update_from: call record(output) inside the with block")

        def forward(model: nn.Module, inputs: Any) -> Any:
            """The caller's forward once (its records restored), then real ones."""
            if seen and not capture.paused:
                output, records, unbatched, failed = seen.pop()
                capture.records.extend(records)
                capture.unbatched.update(unbatched)
                capture.failed |= failed
                return output
            return self._forward(model, inputs)

        self._feed(batch, capture, forward)

    # ------------------------------------------------------------------ results
    def _accumulator(self, caller: str) -> Accumulator:
        if self._acc is None:
            raise RuntimeError(f"{caller}() needs at least one update() first")
        return self._acc

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics and the observation count across ranks, in place.

        Every rank of ``group`` calls it at the same point, after feeding at least
        one batch; each accumulator reduces its own state through
        :mod:`fisherflow.distributed`. Without a process group it does nothing.

        Args:
            group: The process group (default: the world).

        Raises:
            RuntimeError: Before any :meth:`update`, or a second time in one pass.
        """
        acc = self._accumulator("all_reduce")
        if not is_distributed():
            return
        if self._reduced:
            raise RuntimeError("all_reduce() was already called in this pass")
        acc.reduce(group)
        if self._pass == 0:
            total = torch.tensor([float(self._count)], dtype=torch.float64, device=self._device)
            self._count = int(all_reduce_sum(total, group).item())
        self._reduced = True

    def finish_pass(self) -> bool:
        """Close the pass :meth:`update` has been feeding.

        Returns:
            ``True`` if the structure needs the same data again (feed every batch
            again, then call :meth:`finish_pass` once more), ``False`` when the
            estimate is complete (always, for single-pass structures).

        Raises:
            RuntimeError: Before any :meth:`update`, or when a pass that needs the data
                again has not been fed.
        """
        acc = self._accumulator("finish_pass")
        if self._finished or acc.passes == 1:
            return False
        if self._batches == 0:
            raise RuntimeError(
                f"finish_pass(): pass {self._pass} of {self.structure!r} has had no batch; "
                "call update() on every batch again first"
            )
        more = acc.end_pass()
        self._reduced, self._batches = False, 0
        if more:
            self._pass += 1
            self._capture_of().batches = 0  # errors number the batches of each pass
        else:
            self._finished = True
        return more

    def result(self) -> FisherMatrix:
        """The Fisher matrix of everything fed so far (the statistics are kept).

        A multi-pass structure's pending pass is finished first (:meth:`finish_pass`).

        Returns:
            A :class:`~fisherflow.matrices.FisherMatrix` of the estimator's structure.

        Raises:
            RuntimeError: Before any :meth:`update`, or if the structure needs the data
                again: then feed every batch again and call :meth:`result` once more.
            ValueError: If every target fed so far is masked (no observation).
        """
        acc = self._accumulator("result")
        if self._pass == 0 and not self._finished:
            check_total(self._count, self._batches)
        if acc.passes > 1 and not self._finished and self.finish_pass():
            raise RuntimeError(
                f"structure {self.structure!r} needs another pass over the same data (its "
                "first pass's statistics exceed REPLAY_BYTES): call update() on every "
                "batch again, then result()"
            )
        return acc.build(
            num_samples=float(self._count), kind=self.kind, likelihood=self.likelihood.name
        )

    def _final_result(self) -> FisherMatrix:
        """:meth:`result` when nothing follows (``estimate``): the sums are handed over.

        The accumulator finishes its sums in place instead of copying them
        (:attr:`~fisherflow.estimation.accumulate.Accumulator.final`); the estimator
        then needs :meth:`update` before another result.
        """
        acc = self._accumulator("result")
        acc.final = True
        try:
            return self.result()
        finally:
            self._acc = None  # its sums (if built) belong to the result now
