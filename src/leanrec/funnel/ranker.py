"""The ranking funnel: retrieval of 1,000 from the corpus, an early ranker to 100, a late ranker.

The late ranker consumes the full FeatureSet (or a later version that retired some of its features);
the features it scores are returned with the ranking, so a logger can freeze exactly those bytes. Its
scoring here is a stand-in (a fixed model that inverts the world's feature projections) until a
trained model replaces it: it exposes the same ``score`` signature a trained model does.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from leanrec.featurelog.ranked import RankedBatch
from leanrec.schema import FeatureBlock, FeatureSet, Owner, Side
from leanrec.stores.features import FeatureStore
from leanrec.world import World


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

    Args:
        world: Supplies the projections to invert.
        seed: Seeds the small weights.
        fs: The FeatureSet whose blocks it scores: the world's (default) or a retirement of it. The
            small weights are those of the world's features, cut to the survivors, and the tastes are
            recovered from whichever taste features survive.

    """

    def __init__(self, world: World, seed: int = 0, fs: FeatureSet | None = None) -> None:
        full = world.featureset
        fs = fs or full
        rng = np.random.default_rng(seed)
        req, item = full.layout(Side.REQUEST), full.layout(Side.ITEM)
        # Weights of the world's layout first (drawn as ever), then cut to fs's columns.
        user_map = 0.01 * rng.normal(size=(req.float_width, world.user_latent.shape[1]))
        item_map = 0.01 * rng.normal(size=(item.float_width, world.item_latent.shape[1]))
        item_w = 0.01 * rng.normal(size=item.float_width)
        ucols, _ = fs.columns_from(full, Side.REQUEST)
        icols, _ = fs.columns_from(full, Side.ITEM)
        self.user_map, self.item_map, self.item_w = user_map[ucols], item_map[icols], item_w[icols]
        uslots, islots = fs.owner_slots(Owner.USER), fs.owner_slots(Owner.ITEM)
        # Request floats -> latent (d); item floats -> latent (d), from the taste features still there.
        for slots, prefix, n, proj, dest in (
            (uslots, "u_taste", 24, world.proj_user_taste, self.user_map),
            (islots, "i_taste", 16, world.proj_item_taste, self.item_map),
        ):
            have = [j for j in range(n) if f"{prefix}_{j:02d}" in slots]
            if have:
                dest[[slots[f"{prefix}_{j:02d}"].offset for j in have]] = np.linalg.pinv(proj[:, have])
        for name, weight in (("i_click_rate", 3.0), ("i_views_log", 0.1)):
            if name in islots:
                self.item_w[islots[name].offset] = weight
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
        store: Current features (of the world's FeatureSet); defaults to the world's store.
        n_retrieve: Candidates from retrieval.
        n_rank: Items the early ranker passes to the late ranker (and the list length returned).
        scorer: Late-stage model; the stand-in (of ``featureset``) by default.
        featureset: The FeatureSet the late ranker consumes and the ranking returns (so the one that
            gets logged and stored): the world's (default) or a retirement of it, e.g. after a feature
            audit. Retrieval and the early ranker are separate models and read the store as before.

    Raises:
        ValueError: Impossible sizes, or a ``featureset`` that cannot be cut from the world's.

    """

    def __init__(
        self,
        world: World,
        store: FeatureStore | None = None,
        n_retrieve: int = 1000,
        n_rank: int = 100,
        scorer: LateScorer | None = None,
        featureset: FeatureSet | None = None,
    ) -> None:
        if not 0 < n_rank <= n_retrieve <= world.config.n_items:
            raise ValueError(f"need 0 < n_rank ({n_rank}) <= n_retrieve ({n_retrieve}) <= corpus size")
        full = world.featureset
        if featureset is not None and (conflicts := featureset.read_conflicts(full)):
            raise ValueError(
                f"FeatureSet {featureset.name} v{featureset.version} is not a retirement of the world's "
                f"{full.name} v{full.version}: " + "; ".join(conflicts)
            )
        self.world = world
        self.fs: FeatureSet = featureset or full
        self.store = store or world.store
        self.n_retrieve, self.n_rank = n_retrieve, n_rank
        self.scorer = scorer or StandInScorer(world, fs=self.fs)
        # Column indices cutting the store's (world) layout to self.fs; None when nothing is cut.
        self._cut = {
            side: None
            if self.fs.layout(side).names == full.layout(side).names
            else self.fs.columns_from(full, side)
            for side in Side
        }
        # Retrieval reads the store's rows, so it uses the world's slots.
        islots = full.owner_slots(Owner.ITEM)
        uslots = full.owner_slots(Owner.USER)
        self.item_ids = world.item_ids  # raw id of each retrieval row
        all_items = self.store.get_many(Owner.ITEM, self.item_ids)
        emb = islots["i_emb"]
        self.index = np.ascontiguousarray(all_items.floats[:, emb.offset : emb.stop].T)  # (16, N_items)
        # Retrieval's popularity term (WorldConfig.exposure_popularity): the view counters as they
        # stand now, like the index, rebuilt with the funnel.
        self._popular: np.ndarray | None = None
        if world.config.exposure_popularity:
            views = all_items.floats[:, islots["i_views_log"].offset]
            z = (views - views.mean()) / max(float(views.std()), 1e-12)
            self._popular = (world.config.exposure_popularity * z).astype(np.float32)  # (N_items,)
        self._q0, self._q1 = uslots["u_emb_0"], uslots["u_emb_1"]

    def _project(self, block: FeatureBlock, side: Side) -> FeatureBlock:
        """A block of the store's layout cut to ``self.fs``'s (a gather of the surviving columns)."""
        cut = self._cut[side]
        return block if cut is None else block.take_columns(*cut)

    def rank(self, user_ids: np.ndarray, t_ms: np.ndarray, surface: np.ndarray) -> RankedBatch:
        """Rank the corpus for B requests.

        Args:
            user_ids: ``(B,)`` raw user ids.
            t_ms: ``(B,)`` request times (context features).
            surface: ``(B,)`` feed surface ids.

        """
        user_ids = np.asarray(user_ids)
        b = len(user_ids)
        users = self.store.get_many(Owner.USER, user_ids)
        # Retrieval: two-tower dot product over the whole corpus, vectorised top-k.
        q0 = users.floats[:, self._q0.offset : self._q0.stop]
        retr = q0 @ self.index  # (B, N_items)
        if self._popular is not None:
            retr += self._popular
        cand = np.argpartition(-retr, self.n_retrieve - 1, axis=1)[:, : self.n_retrieve]  # rows
        # Early ranker: a second embedding plus popularity, on the candidates only.
        q1 = users.floats[:, self._q1.offset : self._q1.stop]
        cand_emb = self.index.T[cand]  # (B, 1000, 16)
        pop = self.store.get_feature(Owner.ITEM, "i_views_log", self.item_ids[cand.ravel()]).reshape(b, -1)
        early = np.einsum("bd,bkd->bk", q1, cand_emb) + 0.05 * pop
        top = np.take_along_axis(cand, np.argpartition(-early, self.n_rank - 1, axis=1)[:, : self.n_rank], 1)
        top = self.item_ids[top]  # raw ids from here on
        # Late ranker on self.fs: the store's (and the world's context) blocks cut to its layout.
        request = FeatureBlock.hstack([users, self.world.context_block(t_ms, surface)])
        request = self._project(request, Side.REQUEST)
        items = self._project(self.store.get_many(Owner.ITEM, top.ravel()), Side.ITEM)
        scores = self.scorer.score(request, items, self.n_rank)
        order = np.argsort(-scores, axis=1, kind="stable")
        flat = (order + np.arange(b)[:, None] * self.n_rank).ravel()
        return RankedBatch(
            user_ids=user_ids,
            item_ids=np.take_along_axis(top, order, 1),
            scores=np.take_along_axis(scores, order, 1),
            request=request,
            items=items.take(flat),
        )
