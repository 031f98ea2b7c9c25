"""The ranking funnel: retrieval of 1,000 from the corpus, an early ranker to 100, a late ranker.

The late ranker consumes the full FeatureSet; the features it scores are returned with the ranking,
so a logger can freeze exactly those bytes. Its scoring here is a stand-in (a fixed model that
inverts the world's feature projections) until a trained model replaces it: it exposes the same
``score`` signature a trained model does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from leanrec.schema import FeatureBlock, FeatureSet, Owner, Side
from leanrec.stores.features import FeatureStore
from leanrec.world import World


@dataclass
class RankedBatch:
    """B ranked requests, with the features the late ranker scored.

    Attributes:
        user_ids: ``(B,)`` int64.
        item_ids: ``(B, n)`` int32, in ranked order.
        scores: ``(B, n)`` float32 late-ranker scores, descending along axis 1.
        request: Request-side features, B rows.
        items: Item-side features, ``B * n`` rows; request b's items are rows ``b*n .. b*n+n-1`` in
            ranked order.

    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    scores: np.ndarray
    request: FeatureBlock
    items: FeatureBlock

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Items ranked per request."""
        return self.item_ids.shape[1]


class LateScorer(Protocol):
    """What the late ranker needs from a model."""

    def score(self, request: FeatureBlock, items: FeatureBlock, n: int) -> np.ndarray:
        """Scores ``(B, n)`` for B request rows and ``B * n`` item rows."""
        ...


class StandInScorer:
    """A fixed late-stage scorer built from the world's projections.

    It recovers the latent tastes from the informative dense features by least squares, adds the
    popularity counters, and gives every other feature a small weight, so that every feature the
    FeatureSet registers is consumed (and logged) as a production ranker's would be.
    """

    def __init__(self, world: World, seed: int = 0) -> None:
        fs = world.featureset
        rng = np.random.default_rng(seed)
        req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
        uslots, islots = fs.owner_slots(Owner.USER), fs.owner_slots(Owner.ITEM)
        # Request floats -> latent (d); item floats -> latent (d).
        self.user_map = 0.01 * rng.normal(size=(req.float_width, world.user_latent.shape[1]))
        taste = [uslots[f"u_taste_{j:02d}"].offset for j in range(24)]
        self.user_map[taste] = np.linalg.pinv(world.proj_user_taste)
        self.item_map = 0.01 * rng.normal(size=(item.float_width, world.item_latent.shape[1]))
        itaste = [islots[f"i_taste_{j:02d}"].offset for j in range(16)]
        self.item_map[itaste] = np.linalg.pinv(world.proj_item_taste)
        self.item_w = 0.01 * rng.normal(size=item.float_width)
        self.item_w[islots["i_click_rate"].offset] = 3.0
        self.item_w[islots["i_views_log"].offset] = 0.1
        # Id features: a small hashed embedding table, summed.
        self.id_table = 0.01 * rng.normal(size=4096).astype(np.float32)

    def score(self, request: FeatureBlock, items: FeatureBlock, n: int) -> np.ndarray:
        """Scores ``(B, n)``."""
        b = len(request)
        u = request.floats @ self.user_map  # (B, d)
        v = (items.floats @ self.item_map).reshape(b, n, -1)  # (B, n, d)
        s = np.einsum("bd,bnd->bn", u, v) + (items.floats @ self.item_w).reshape(b, n)
        s += self.id_table[np.abs(items.ints) % 4096].sum(axis=1).reshape(b, n)
        s += self.id_table[np.abs(request.ints) % 4096].sum(axis=1)[:, None]
        return s.astype(np.float32)


class Funnel:
    """Retrieval → early rank → late rank over one FeatureStore.

    Args:
        world: Supplies the FeatureSet, the FeatureStore and the stand-in scorer's projections.
        store: Current features; defaults to the world's store.
        n_retrieve: Candidates from retrieval.
        n_rank: Items the early ranker passes to the late ranker (and the list length returned).
        scorer: Late-stage model; the stand-in by default.

    """

    def __init__(
        self,
        world: World,
        store: FeatureStore | None = None,
        n_retrieve: int = 1000,
        n_rank: int = 100,
        scorer: LateScorer | None = None,
    ) -> None:
        if not 0 < n_rank <= n_retrieve <= world.config.n_items:
            raise ValueError(f"need 0 < n_rank ({n_rank}) <= n_retrieve ({n_retrieve}) <= corpus size")
        self.world = world
        self.fs: FeatureSet = world.featureset
        self.store = store or world.store
        self.n_retrieve, self.n_rank = n_retrieve, n_rank
        self.scorer = scorer or StandInScorer(world)
        islots = self.fs.owner_slots(Owner.ITEM)
        uslots = self.fs.owner_slots(Owner.USER)
        all_items = self.store.get_many(Owner.ITEM, np.arange(world.config.n_items))
        emb = islots["i_emb"]
        self.index = np.ascontiguousarray(all_items.floats[:, emb.offset : emb.stop].T)  # (16, N_items)
        self._q0, self._q1 = uslots["u_emb_0"], uslots["u_emb_1"]

    def rank(self, user_ids: np.ndarray, t_ms: np.ndarray, surface: np.ndarray) -> RankedBatch:
        """Rank the corpus for B requests.

        Args:
            user_ids: ``(B,)`` users.
            t_ms: ``(B,)`` request times (context features).
            surface: ``(B,)`` feed surface ids.

        """
        user_ids = np.asarray(user_ids)
        b = len(user_ids)
        users = self.store.get_many(Owner.USER, user_ids)
        # Retrieval: two-tower dot product over the whole corpus, vectorised top-k.
        q0 = users.floats[:, self._q0.offset : self._q0.stop]
        retr = q0 @ self.index  # (B, N_items)
        cand = np.argpartition(-retr, self.n_retrieve - 1, axis=1)[:, : self.n_retrieve]
        # Early ranker: a second embedding plus popularity, on the candidates only.
        q1 = users.floats[:, self._q1.offset : self._q1.stop]
        cand_emb = self.index.T[cand]  # (B, 1000, 16)
        pop = self.store.get_feature(Owner.ITEM, "i_views_log", cand.ravel()).reshape(b, -1)
        early = np.einsum("bd,bkd->bk", q1, cand_emb) + 0.05 * pop
        top = np.take_along_axis(cand, np.argpartition(-early, self.n_rank - 1, axis=1)[:, : self.n_rank], 1)
        # Late ranker on the full FeatureSet.
        request = FeatureBlock.hstack([users, self.world.context_block(t_ms, surface)])
        items = self.store.get_many(Owner.ITEM, top.ravel())
        scores = self.scorer.score(request, items, self.n_rank)
        order = np.argsort(-scores, axis=1, kind="stable")
        flat = (order + np.arange(b)[:, None] * self.n_rank).ravel()
        return RankedBatch(
            user_ids=user_ids,
            item_ids=np.take_along_axis(top, order, 1).astype(np.int32),
            scores=np.take_along_axis(scores, order, 1),
            request=request,
            items=items.take(flat),
        )
