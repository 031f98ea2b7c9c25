"""The funnel on a user's own catalog: features from their FeatureStore, candidates, their ranker.

:class:`~leanrec.funnel.ranker.Funnel` ranks the synthetic world. :class:`CatalogFunnel` ranks any
catalog a FeatureSet file declares: the candidates come from a retrieval index
(:class:`~leanrec.retrieval.index.RetrievalIndex`, trained by :mod:`leanrec.retrieval`) or from the
caller; the user's and the candidates' features are read from the FeatureStore that
``leanrec features load`` fills, the context features come with the request; the late ranker is a
``leanrec train`` checkpoint, or, without one, the retrieval scores order the list (the baseline a
trained ranker must beat). The returned :class:`RankedBatch` holds exactly the features the ranker
scored, so the logger freezes those bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from leanrec.featurelog.inputs import FeatureInputError, pack_owner, ranked_ids, user_key
from leanrec.featurelog.ranked import RankedBatch
from leanrec.funnel.ranker import LateScorer
from leanrec.retrieval.index import RetrievalIndex
from leanrec.schema import FeatureBlock, FeatureSet, Owner, Side
from leanrec.stores.features import FeatureStore


class CatalogFunnel:
    """Retrieval (or the caller's candidates) → late rank, over a FeatureStore of one FeatureSet.

    Args:
        featureset: What the store holds and the ranking returns (and so what gets logged).
        store: Current features of the catalog's users and items (of ``featureset``).
        index: Retrieval; None when every request brings its candidates.
        scorer: The late ranker; None orders candidates by their retrieval scores (or, for the
            caller's candidates, keeps the caller's order).
        model_fs: The FeatureSet ``scorer`` reads, if it is a retirement of ``featureset`` (a model
            trained after a feature audit): its columns are cut from the served blocks.
        n_retrieve: Candidates retrieval passes to the late ranker.
        n_rank: Items returned (and logged).

    Raises:
        ValueError: Impossible sizes, or a ``model_fs`` that cannot read ``featureset``'s blocks.

    """

    def __init__(
        self,
        featureset: FeatureSet,
        store: FeatureStore,
        index: RetrievalIndex | None = None,
        scorer: LateScorer | None = None,
        model_fs: FeatureSet | None = None,
        n_retrieve: int = 1000,
        n_rank: int = 100,
    ) -> None:
        if not 0 < n_rank <= n_retrieve:
            raise ValueError(f"need 0 < n_rank ({n_rank}) <= n_retrieve ({n_retrieve})")
        if model_fs is not None and (conflicts := model_fs.read_conflicts(featureset)):
            raise ValueError(
                f"the model reads FeatureSet {model_fs.name} v{model_fs.version}, which cannot read the "
                f"served {featureset.name} v{featureset.version}: " + "; ".join(conflicts)
            )
        self.fs, self.store, self.index, self.scorer = featureset, store, index, scorer
        self.n_retrieve, self.n_rank = n_retrieve, n_rank
        self._cut = (
            None
            if model_fs is None or model_fs.fingerprint == featureset.fingerprint
            else {side: model_fs.columns_from(featureset, side) for side in Side}
        )

    def candidates(self, user_id: int, given: object | None) -> tuple[np.ndarray, np.ndarray]:
        """``(K,)`` candidate items and ``(K,)`` prior scores: the caller's, else retrieval's.

        Raises:
            FeatureInputError: No candidates and no retrieval, or candidates that are not item ids.

        """
        if given is not None:
            n = len(given) if hasattr(given, "__len__") else 0
            if n > self.n_retrieve:
                raise FeatureInputError(
                    f"candidates: {n} items, limit {self.n_retrieve}", "candidates", status=413
                )
            try:
                cand = ranked_ids(self.fs, given)
            except FeatureInputError as exc:
                raise FeatureInputError(str(exc).replace("items", "candidates", 1), "candidates") from None
            if len(np.unique(cand)) != len(cand):
                raise FeatureInputError("candidates: an item is listed twice", "candidates")
            return cand, np.arange(len(cand), 0, -1, dtype=np.float32)
        if self.index is None:
            raise FeatureInputError(
                "candidates: this service has no retrieval model; send the request's candidates",
                "candidates",
            )
        items, scores = self.index.top(np.array([user_id]), self.n_retrieve)
        return items[0], scores[0]

    def rank(
        self,
        user_id: int | str,
        context: Mapping[str, object] | None = None,
        candidates: object | None = None,
    ) -> RankedBatch:
        """Rank one request.

        Args:
            user_id: Whose request (a 64-bit id, or a string for string user ids); their features
                are read from the store.
            context: The FeatureSet's context features by name (each a number or ``size`` values).
            candidates: ``(K,)`` item ids to rank, or None for retrieval's.

        Raises:
            FeatureInputError: Bad candidates or context (naming what was wrong).
            KeyError: The store holds no features for the user or a candidate.

        """
        user_id = user_key(self.fs, user_id)
        cand, prior = self.candidates(user_id, candidates)
        users = self.store.get_many(Owner.USER, np.array([user_id]))
        ctx = pack_owner(self.fs, Owner.CONTEXT, context or {}, 1, "the request's context")
        request = FeatureBlock.hstack([users, ctx])
        n = min(self.n_rank, len(cand))
        if self.scorer is None:
            keep = np.argsort(-prior, kind="stable")[:n]
            items = self.store.get_many(Owner.ITEM, cand[keep])
            return RankedBatch(
                np.array([user_id], np.int64),
                cand[keep][None, :],
                prior[keep][None, :],
                request,
                items,
            )
        items = self.store.get_many(Owner.ITEM, cand)
        if self._cut is None:
            scores = self.scorer.score(request, items, len(cand))[0]
        else:
            scores = self.scorer.score(
                request.take_columns(*self._cut[Side.REQUEST]),
                items.take_columns(*self._cut[Side.ITEM]),
                len(cand),
            )[0]
        keep = np.argsort(-scores, kind="stable")[:n]
        return RankedBatch(
            np.array([user_id], np.int64),
            cand[keep][None, :],
            scores[keep].astype(np.float32)[None, :],
            request,
            items.take(keep),
        )
