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

from leanrec.models.ranker import ItemSide, LateRanker, UserSide
from leanrec.schema import FeatureSet, Side
from leanrec.train.metrics import auc
from leanrec.train.reader import Batch


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """One batch of all requests and items of ``batches`` (request rows renumbered)."""
    if not batches:
        raise ValueError("no held-out requests to audit on")
    offsets = np.cumsum([0, *(b.n_requests for b in batches[:-1])])
    return Batch(
        req_floats=torch.cat([b.req_floats for b in batches]),
        req_ints=torch.cat([b.req_ints for b in batches]),
        item_floats=torch.cat([b.item_floats for b in batches]),
        item_ints=torch.cat([b.item_ints for b in batches]),
        item_request=torch.cat([b.item_request + int(o) for b, o in zip(batches, offsets, strict=True)]),
        click=torch.cat([b.click for b in batches]),
        like=torch.cat([b.like for b in batches]),
        request_ids=[r for b in batches for r in b.request_ids],
        positions=torch.cat([b.positions for b in batches]),
    )


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

    The user side and item side of the unshuffled data are computed once; a shuffle of item-side
    features recomputes only the item side, a shuffle of request-side features only the user side.

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
        with torch.inference_mode():
            self._user = model.user_side(data.req_floats, data.req_ints)
            self._item = model.item_side(data.item_floats, data.item_ints)
        self.base_auc = self._auc(self._user, self._item)

    def _auc(self, user: UserSide, item: ItemSide) -> float:
        with torch.inference_mode():
            logits = self.model.score(user.take(self.data.item_request), item)[:, 0]
        self.evaluations += 1
        return auc(self.labels, logits.numpy())

    def _shuffled(self, names: Sequence[str], side: Side, rng: np.random.Generator):
        d = self.data
        floats, ints = (d.req_floats, d.req_ints) if side is Side.REQUEST else (d.item_floats, d.item_ints)
        cols = [self.columns[n] for n in names if self.columns[n].side is side]
        if not cols:
            return None
        perm = torch.from_numpy(rng.permutation(len(floats)))
        floats, ints = floats.clone(), ints.clone()
        for c in cols:
            block = floats if c.is_float else ints
            block[:, c.start : c.stop] = block[perm, c.start : c.stop]
        return floats, ints

    def loss(self, names: Sequence[str], rng: np.random.Generator) -> float:
        """AUC lost when ``names`` are shuffled together (one permutation per side)."""
        unknown = [n for n in names if n not in self.columns]
        if unknown:
            raise KeyError(f"features not in the model's FeatureSet: {unknown}")
        user, item = self._user, self._item
        with torch.inference_mode():
            if (req := self._shuffled(names, Side.REQUEST, rng)) is not None:
                user = self.model.user_side(*req)
            if (it := self._shuffled(names, Side.ITEM, rng)) is not None:
                item = self.model.item_side(*it)
        return self.base_auc - self._auc(user, item)

    def losses(self, names: Sequence[str], repeats: int, seed: int) -> np.ndarray:
        """``(repeats,)`` AUC losses of independent shuffles."""
        rng = np.random.default_rng(seed)
        return np.array([self.loss(names, rng) for _ in range(repeats)])


@dataclass
class Importance:
    """Permutation importance of one feature.

    Attributes:
        loss: Mean held-out AUC lost when it is shuffled (negative: the model did better without it).
        ci: Half-width of the 95% confidence interval of ``loss`` over the repeats.
        repeats: Shuffles measured.
        block: Features it was decided with: itself, or the block it was screened in (then ``loss``
            is the block's loss shared equally among its members).

    """

    loss: float
    ci: float
    repeats: int
    block: tuple[str, ...]


def _ci(x: np.ndarray) -> float:
    return float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("inf")


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
                name = f.name if f.name in model.tables else model.config.item_id
                table = model.tables[name]
                ids = ints[:, slot.offset : slot.stop]
                pooled = table(torch.where(ids < 0, table.padding_idx, ids)).sum(1)
                out[f.name] = float(pooled.norm(dim=1).mean())
    return out
