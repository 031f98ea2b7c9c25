"""Feature importance, three ways: the model's weights, permutation on held-out requests, ablation.

Weight norms are what production audits read because they are free; they mislead where inputs are
correlated or where a table's norm reflects how often ids were seen rather than what they predict.
Permutation importance measures what the model loses on held-out requests when one feature (or a
group) is shuffled across requests (request-side features) or across items (item-side features),
breaking its relation to the label while keeping its distribution. Ablation (retraining without a
group) is in :mod:`leanrec.audit.plan`.

Permutations are screened hierarchically, so a FeatureSet of thousands of features is affordable:
each family of features (``u_noise_00`` … ``u_noise_91``) is permuted in blocks, a block whose joint
loss is within a tolerance is decided as a whole, and only blocks that matter are split further, down
to single features measured with full repeats.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from leanrec.models.ranker import ItemSide, LateRanker, SideParts, UserSide
from leanrec.schema import FeatureSet, Side
from leanrec.train.metrics import auc
from leanrec.train.reader import Batch


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """One batch of all requests and items of ``batches`` (request rows renumbered)."""
    if not batches:
        raise ValueError("no held-out requests to audit on")
    return Batch.concat(batches)


def family(name: str) -> str:
    """A feature's family: its name without a trailing ``_<digits>`` (``u_noise_07`` → ``u_noise``)."""
    return re.sub(r"_\d+$", "", name)


@dataclass(frozen=True)
class Columns:
    """Where one feature's values sit in a batch: side, block (floats or ints) and column range."""

    side: Side
    is_float: bool
    start: int
    stop: int


def feature_columns(fs: FeatureSet) -> dict[str, Columns]:
    """Columns of every feature in the request and item layouts."""
    return {
        s.feature.name: Columns(side, s.feature.is_float, s.offset, s.stop)
        for side in Side
        for s in fs.layout(side).slots
    }


class PermutationAuditor:
    """Click AUC of a model on held-out requests, with chosen features shuffled.

    The parts of both sides of the unshuffled data (see ``LateRanker.side_parts``) are computed
    once. A shuffle updates only what its features feed: the first dense layers and the wide part by
    the change of the shuffled columns (they are linear), the pooled embeddings of shuffled ids by
    permuting their rows, the history encoder only when a feature it reads is shuffled; then the side
    is mixed and scored against the other side's cached result.

    Args:
        model: The trained late ranker.
        data: Held-out requests and their items (one batch, see :func:`concat_batches`).

    """

    def __init__(self, model: LateRanker, data: Batch) -> None:
        self.model = model.eval()
        self.data = data
        self.columns = feature_columns(model.fs)
        self.labels = data.click.numpy()
        if np.unique(self.labels).size < 2:
            raise ValueError("held-out data needs both clicked and unclicked items to measure AUC")
        self.evaluations = 0
        self._inputs = {
            Side.REQUEST: (data.req_floats, data.req_ints),
            Side.ITEM: (data.item_floats, data.item_ints),
        }
        self._pooled = {side: model.pooled_index(side) for side in Side}
        self._space = {Side.REQUEST: model.user_space_cols, Side.ITEM: model.item_space_cols}
        with torch.inference_mode():
            self._parts = {side: model.side_parts(side, *self._inputs[side]) for side in Side}
            self._user = model.user_from(self._parts[Side.REQUEST])
            self._item = model.item_from(self._parts[Side.ITEM])
        self.base_auc = self._auc(self._user, self._item)

    def _auc(self, user: UserSide, item: ItemSide) -> float:
        with torch.inference_mode():
            logits = self.model.score(user.take(self.data.item_request), item)[:, 0]
        self.evaluations += 1
        return auc(self.labels, logits.numpy())

    def _shuffled_parts(
        self, names: Sequence[str], side: Side, perm: torch.Tensor, parts: SideParts, encoded: Sequence[str]
    ) -> SideParts:
        """``parts`` of ``side`` with ``names`` also permuted across its rows by ``perm``.

        ``parts`` may already hold other features shuffled by the same ``perm``; ``encoded`` names
        every sequence the history encoder must then see shuffled (it is recomputed as a whole).
        """
        model = self.model
        ints = self._inputs[side][1]
        cols = [self.columns[n] for n in names]
        changes: dict[str, torch.Tensor] = {}
        dense = [torch.arange(c.start, c.stop) for c in cols if c.is_float]
        if dense:
            idx = torch.cat(dense)
            delta = parts.normed.index_select(1, idx)
            delta = delta.index_select(0, perm) - delta  # (B, C) change of the shuffled inputs
            for part, layer in model.input_layers(side).items():
                changes[part] = getattr(parts, part) + delta @ layer.weight.index_select(1, idx).T
            # A vector can sit in several pairs: every position that reads a shuffled column changes.
            at = torch.isin(self._space[side], idx).nonzero().flatten()
            if len(at):
                new = parts.spaced.clone()
                new[:, at] = self._parts[side].spaced.index_select(0, perm)[:, at]
                changes["spaced"] = new
        pooled = [self._pooled[side][n] for n in names if n in self._pooled[side]]
        if pooled:
            at = torch.tensor(pooled)
            new = parts.pooled.clone()
            new[:, at] = self._parts[side].pooled.index_select(0, perm)[:, at]
            changes["pooled"] = new
        if side is Side.REQUEST and model.encoded_features.intersection(names):
            seq = torch.cat([torch.arange(self.columns[n].start, self.columns[n].stop) for n in encoded])
            shuffled = ints.clone()
            shuffled[:, seq] = ints.index_select(0, perm)[:, seq]
            changes["encoded"], changes["mask"], changes["summary"] = model.encode(shuffled)
        return parts.replace(**changes)

    def _check(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.columns]
        if unknown:
            raise KeyError(f"features not in the model's FeatureSet: {unknown}")

    def shuffle(
        self, names: Sequence[str], repeats: int, seed: int, base: Shuffled | None = None
    ) -> Shuffled:
        """The held-out parts with ``names`` shuffled, ``repeats`` times, on top of ``base``.

        Each repeat draws one permutation per side from ``seed``; on top of ``base`` its permutations
        are reused, so ``shuffle(b, r, s, shuffle(a, r, s))`` scores as ``shuffle(a + b, r, s)`` while
        updating only what ``b`` feeds. A plan that grows its retired set one feature at a time pays
        for that feature alone.
        """
        self._check(names)
        if base is None:
            rng = np.random.default_rng(seed)
            perms = [
                {side: torch.from_numpy(rng.permutation(len(self._inputs[side][0]))) for side in Side}
                for _ in range(repeats)
            ]
            base = Shuffled((), perms, [dict(self._parts) for _ in range(repeats)])
        new = [n for n in dict.fromkeys(names) if n not in base.names]
        every = (*base.names, *new)
        encoded = [n for n in every if n in self.model.encoded_features]
        parts = []
        with torch.inference_mode():
            for perm, prior in zip(base.perms, base.parts, strict=True):
                mine = dict(prior)
                for side in Side:
                    on_side = [n for n in new if self.columns[n].side is side]
                    if on_side:
                        mine[side] = self._shuffled_parts(on_side, side, perm[side], prior[side], encoded)
                parts.append(mine)
        return Shuffled(every, base.perms, parts)

    def score(self, state: Shuffled) -> np.ndarray:
        """``(repeats,)`` AUC lost by each repeat of a shuffled state."""
        out = np.empty(len(state.parts))
        with torch.inference_mode():
            for k, parts in enumerate(state.parts):
                user, item = self._user, self._item
                if parts[Side.REQUEST] is not self._parts[Side.REQUEST]:
                    user = self.model.user_from(parts[Side.REQUEST])
                if parts[Side.ITEM] is not self._parts[Side.ITEM]:
                    item = self.model.item_from(parts[Side.ITEM])
                out[k] = self.base_auc - self._auc(user, item)
        return out

    def losses(self, names: Sequence[str], repeats: int, seed: int) -> np.ndarray:
        """``(repeats,)`` AUC losses of independent shuffles."""
        return self.score(self.shuffle(names, repeats, seed))


@dataclass
class Shuffled:
    """Held-out parts with some features shuffled, one state per repeat (see ``PermutationAuditor.shuffle``).

    Attributes:
        names: The features shuffled.
        perms: Per repeat, the row permutation of each side.
        parts: Per repeat, the parts of each side (the unshuffled parts where a side is untouched).

    """

    names: tuple[str, ...]
    perms: list[dict[Side, torch.Tensor]]
    parts: list[dict[Side, SideParts]]


@dataclass
class Importance:
    """Permutation importance of one feature.

    Attributes:
        loss: Mean held-out AUC lost when it is shuffled (negative: the model did better without it).
        ci: Half-width of the 95% interval that ``loss`` stays within if the feature is worth nothing
            (see :func:`_ci`): a loss above it is measurable.
        repeats: Shuffles measured.
        block: Features it was decided with: itself, or the block it was screened in (then ``loss``
            is the block's loss shared equally among its members).

    """

    loss: float
    ci: float
    repeats: int
    block: tuple[str, ...]


def _ci(x: np.ndarray) -> float:
    """Half-width of the 95% interval of the mean loss ``x.mean()`` of a feature worth nothing.

    For such a feature the unshuffled held-out data is exchangeable with its shuffles: the
    unshuffled AUC is one more draw of the shuffled AUCs' distribution, not their expectation. The
    mean loss over ``r`` shuffles then spreads as one shuffle does plus the mean's own spread,
    ``sd * sqrt(1 + 1 / r)``, however many shuffles are taken. The standard error of the mean alone,
    ``sd / sqrt(r)``, would call a feature of no value measurable about one time in five at five
    shuffles (1.96 / sqrt(6) standard deviations), which no number of repeats could cure.
    """
    r = len(x)
    return float(1.96 * x.std(ddof=1) * np.sqrt(1 + 1 / r)) if r > 1 else float("inf")


def permutation_importance(
    auditor: PermutationAuditor,
    names: Sequence[str],
    repeats: int = 5,
    screen_repeats: int = 2,
    block_size: int = 16,
    tolerance: float = 2.5e-4,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Importance]:
    """Permutation importance of ``names``, screened by blocks within each family.

    Args:
        auditor: Scores shuffles.
        names: Features to measure.
        repeats: Shuffles per single feature.
        screen_repeats: Shuffles per block while screening.
        block_size: Most features permuted together in a first-pass block.
        tolerance: A block whose mean joint loss is at most this is decided as a whole; it should be
            well below the prune budget.
        seed: Seeds the shuffles.
        progress: Called with the number of features decided after each step.

    """
    families: dict[str, list[str]] = {}
    for n in names:
        families.setdefault(family(n), []).append(n)
    queue = [tuple(m[i : i + block_size]) for m in families.values() for i in range(0, len(m), block_size)]
    out: dict[str, Importance] = {}
    step = 0
    while queue:
        block = queue.pop()
        step += 1
        if len(block) == 1:
            x = auditor.losses(block, repeats, seed + step)
            out[block[0]] = Importance(float(x.mean()), _ci(x), repeats, block)
        else:
            x = auditor.losses(block, screen_repeats, seed + step)
            if x.mean() > tolerance:
                half = len(block) // 2
                queue += [block[:half], block[half:]]
                continue
            share = Importance(float(x.mean()) / len(block), _ci(x) / len(block), screen_repeats, block)
            out.update(dict.fromkeys(block, share))
        if progress:
            progress(len(block))
    return out


def weight_importance(model: LateRanker, data: Batch) -> dict[str, float]:
    """Importance read from the weights, as cheap production audits do.

    Dense features: the norm of their first-layer weights (the inputs are standardised). Id
    features: the mean norm of their pooled embedding over the held-out rows; the history uses the
    item-id table. The two kinds are on different scales: compare within a kind.
    """
    out: dict[str, float] = {}
    with torch.inference_mode():
        for side in Side:
            norms = model.dense_input_norms(side)
            ints = data.req_ints if side is Side.REQUEST else data.item_ints
            for i, slot in enumerate(model.fs.layout(side).slots):
                f = slot.feature
                if f.is_float:
                    out[f.name] = float(norms[i])
                    continue
                # The history has no table of its own: it reads the item id's.
                name = f.name if f.name in model.tables else getattr(model.item_id, "name", f.name)
                # Raw ids go through the table's map; padding reads zeros.
                pooled = model.tables[name](ints[:, slot.offset : slot.stop]).sum(1)
                out[f.name] = float(pooled.norm(dim=1).mean())
    return out
