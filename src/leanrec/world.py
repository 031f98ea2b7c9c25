"""The synthetic world that drives the demo and the tests: traffic whose truth is known.

Users and items have latent tastes; engagement is drawn from them. Observable features are noisy
projections of the latents (informative), counters that drift as events happen (mutable), or pure
noise, so an audit has a ground truth and online-offline skew would show. Item popularity has a
power-law tail; scroll depth decays steeply (median about six items) with a long tail.

Engagement is calibrated to what a short-video feed shows on the items a user actually viewed. The
reference is KuaiRand (Gao et al., "KuaiRand: An Unbiased Sequential Recommendation Dataset with
Randomly Exposed Videos", CIKM 2022), whose signals are defined per view: ``is_click`` is a valid
play in the single-column feed (played at least 7 s, or to the end of a shorter video),
``long_view`` a play of at least 18 s, and ``is_like`` and ``is_forward`` (a share) are rare. Its
published logs put valid plays and long views each at roughly a third of views, likes at a few
percent and shares well under one percent; KuaiSAR, from the same app, reports clicks to non-clicks
near 1:1. The targets, on viewed items of the demo's traffic (``ENGAGEMENT_TARGETS``):

============  ===============  ==========================================================
signal        target (views)   here
============  ===============  ==========================================================
click         25% – 50%        a valid play; drawn from the true affinity and popularity
long watch    20% – 40%        watch time of a click at least ``LONG_WATCH_MS`` (18 s)
like          1% – 6%          a click the user also liked
share         0.05% – 1%       a click the user also shared
============  ===============  ==========================================================

``leanrec demo`` prints the rates it drew beside these ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanrec.ids import IdIndex, scrambled_ids
from leanrec.schema import PAD_ID, Feature, FeatureBlock, FeatureSet, Kind, Owner, Role
from leanrec.stores.features import MemoryFeatureStore

USER_SALT, ITEM_SALT, CREATOR_SALT = 1, 2, 3
"""What ``scrambled_ids`` salts the world's users, items and creators with: their raw ids differ."""

LATENT_DIM = 16
N_CATEGORIES = 40
HISTORY_LEN = 50
SURFACES = 3
# Intercepts of the engagement model, set so that the rates on viewed items land in ENGAGEMENT_TARGETS.
CLICK_INTERCEPT = -5.0
LIKE_INTERCEPT = -6.8
SHARE_INTERCEPT = -7.0
WATCH_LOG_MEDIAN = float(np.log(12_000))
LONG_WATCH_MS = 18_000
"""KuaiRand's ``long_view``: a play of at least 18 s."""
ENGAGEMENT_TARGETS: dict[str, tuple[float, float]] = {
    "click": (0.25, 0.50),
    "long_watch": (0.20, 0.40),
    "like": (0.01, 0.06),
    "share": (0.0005, 0.01),
}
"""Sourced ranges of each signal's rate on viewed items (see the module docstring)."""


@dataclass(frozen=True)
class WorldConfig:
    """Size and shape of the synthetic world.

    Attributes:
        n_users: Users (the demo needs at least 10,000).
        n_items: Items in the corpus (at least 50,000).
        n_creators: Creators; each item has one, and followers accrue to them.
        popularity_exponent: Zipf exponent of item popularity (power-law tail).
        scroll_median: Median number of items a session views.
        scroll_sigma: Log-normal spread of scroll depth (larger: longer tail).
        history_len: Length of the user's click history and its side sequences.
        embedding_noise: Per-dimension noise of the pretrained taste embeddings (u_emb_0, i_emb).
        extra_noise: Additional pure-noise features registered after the demo's own, to make a
            FeatureSet of production scale (thousands of features) for audits to be measured on. They
            are a realistic mix: 85% user-side dense scalars (``x_user_00000`` …), 10% item-side dense
            scalars (``x_item_…``) and 5% user-side ids of 1,000 values (``x_uid_…``). 0 keeps
            the demo's FeatureSet and world exactly as they are.
        id_effect: Spread (standard deviation, in logits) of a per-item click effect that no feature
            shows at the start (the click-rate counters learn it only as clicks accrue): an item's id
            (its embedding row) learns it, as a real catalog's items carry appeal no feature describes.
            It is what makes an id's table worth its memory, and so what id maps are measured on.
            Drawn from its own stream: 0 keeps the world exactly as it is.
        exposure_popularity: Weight of an item's popularity in the funnel's retrieval score: its
            view counter (log, standardised over the corpus at the funnel's start) times this is
            added to the taste score (whose spread across a user's candidates is about 1). A real
            feed's candidate sources favour what is popular, so its views pile up on a head of
            items; 0 (the default) retrieves by taste alone, and views spread over the tail.
        seed: Everything the world draws follows from it.

    """

    n_users: int = 10_000
    n_items: int = 50_000
    n_creators: int = 5_000
    popularity_exponent: float = 1.0
    scroll_median: float = 6.0
    scroll_sigma: float = 1.0
    history_len: int = HISTORY_LEN
    embedding_noise: float = 0.1
    extra_noise: int = 0
    id_effect: float = 0.0
    exposure_popularity: float = 0.0
    seed: int = 7


EXTRA_NOISE_VOCAB = 1_000
"""Distinct values of the extra user-side noise ids (``x_uid_…``), and the rows of their tables."""


def _dense(owner: Owner, prefix: str, n: int, doc: str, size: int = 1, changes: str = "") -> list[Feature]:
    return [Feature(f"{prefix}_{i:02d}", owner, Kind.DENSE, size, doc=doc, changes=changes) for i in range(n)]


def _ids(owner: Owner, prefix: str, n: int, rows: int, doc: str, changes: str = "") -> list[Feature]:
    return [Feature(f"{prefix}_{i:02d}", owner, Kind.SPARSE, 1, rows, doc, changes=changes) for i in range(n)]


def extra_noise_features(n: int) -> list[Feature]:
    """``n`` pure-noise features in a production-like mix of families (see ``WorldConfig.extra_noise``).

    Mostly user-side dense scalars, as real FeatureSets are mostly user counters and ratios; the split
    is rounded so the three families always add up to exactly ``n``.
    """
    if n < 0:
        raise ValueError(f"extra_noise must be at least 0, got {n}")
    n_item, n_uid = round(0.10 * n), round(0.05 * n)
    n_user = n - n_item - n_uid
    doc, rarely = "pure noise (scale filler)", "rarely"
    return [
        *(Feature(f"x_user_{i:05d}", Owner.USER, Kind.DENSE, doc=doc, changes=rarely) for i in range(n_user)),
        *(
            Feature(f"x_uid_{i:05d}", Owner.USER, Kind.SPARSE, 1, EXTRA_NOISE_VOCAB, doc, changes=rarely)
            for i in range(n_uid)
        ),
        *(Feature(f"x_item_{i:05d}", Owner.ITEM, Kind.DENSE, doc=doc, changes=rarely) for i in range(n_item)),
    ]


def default_featureset(config: WorldConfig = WorldConfig()) -> tuple[FeatureSet, frozenset[str]]:
    """The demo's FeatureSet, as a late-stage ranker has it, and the names of its pure-noise features.

    156 user-side features (including the last 50 clicked item ids with their categories, creators,
    actions and ages, as sequence models consume them), 3 context features and 53 item-side features,
    then ``config.extra_noise`` more pure-noise features (see :func:`extra_noise_features`).
    Noise features have no relation to engagement: an audit should retire them. Like the useless
    features of a real FeatureSet (a stale embedding, a country, a device) each entity's noise is drawn
    once and stays; it cannot tell the model more of who the entity is than its id feature already
    does. The user's taste, pretrained embeddings, id, favourite category, age bucket, followed topics
    and noise, and the item's taste projection, embedding, id, category, creator, tags and noise are
    declared slowly changing (``changes="rarely"``): nothing in the simulation updates them, unlike
    the activity counters, rates and histories that engagement moves.

    User, item and creator ids are raw 64-bit ids (see :func:`leanrec.ids.scrambled_ids`); each id
    feature's table has a row per value it can take (its ``rows``), and maps ids by the default map.
    """
    U, C, I = Owner.USER, Owner.CONTEXT, Owner.ITEM
    nu, ni, hl = config.n_users, config.n_items, config.history_len
    feats: list[Feature] = [
        *_dense(U, "u_taste", 24, "noisy projection of the user's latent taste", changes="rarely"),
        *_dense(U, "u_act", 8, "activity counters, updated as the user engages"),
        *_dense(U, "u_noise", 92, "pure noise", changes="rarely"),
        Feature(
            "u_emb_0",
            U,
            Kind.DENSE,
            16,
            doc="pretrained user embedding (taste)",
            space="two_tower",
            changes="rarely",
        ),
        Feature(
            "u_emb_1",
            U,
            Kind.DENSE,
            16,
            doc="pretrained user embedding (taste, noisier)",
            space="two_tower",
            changes="rarely",
        ),
        Feature(
            "u_emb_long", U, Kind.DENSE, 64, doc="long-term interest embedding (taste)", changes="rarely"
        ),
        Feature("u_emb_2", U, Kind.DENSE, 64, doc="stale embedding, pure noise", changes="rarely"),
        Feature("u_emb_3", U, Kind.DENSE, 64, doc="stale embedding, pure noise", changes="rarely"),
        Feature("u_id", U, Kind.SPARSE, 1, nu, "user id", role=Role.USER_ID, changes="rarely"),
        Feature(
            "u_top_category",
            U,
            Kind.SPARSE,
            1,
            N_CATEGORIES,
            "the user's favourite category",
            changes="rarely",
        ),
        Feature("u_age_bucket", U, Kind.SPARSE, 1, 8, "age bucket (correlates with taste)", changes="rarely"),
        Feature("u_country", U, Kind.SPARSE, 1, 50, "country, pure noise here", changes="rarely"),
        Feature("u_lang", U, Kind.SPARSE, 1, 20, "language, pure noise here", changes="rarely"),
        Feature("u_gender", U, Kind.SPARSE, 1, 3, "pure noise here", changes="rarely"),
        Feature("u_device", U, Kind.SPARSE, 1, 10, "pure noise here", changes="rarely"),
        *_ids(U, "u_noise_id", 13, 1000, "pure noise id", changes="rarely"),
        Feature(
            "u_topics", U, Kind.MULTI_HOT, 8, N_CATEGORIES, "categories the user follows", changes="rarely"
        ),
        Feature("u_noise_tags", U, Kind.MULTI_HOT, 8, 500, "pure noise tag set", changes="rarely"),
        Feature("u_hist", U, Kind.SEQUENCE, hl, ni, f"last {hl} items the user clicked", role=Role.HISTORY),
        Feature("u_hist_cat", U, Kind.SEQUENCE, hl, N_CATEGORIES, "categories of u_hist"),
        Feature("u_hist_creator", U, Kind.SEQUENCE, hl, config.n_creators, "creators of u_hist"),
        Feature("u_hist_action", U, Kind.SEQUENCE, hl, 2, "1 where the click was also a like"),
        Feature("u_hist_age", U, Kind.DENSE, hl, doc="log hours since each u_hist click"),
        Feature("c_hour", C, Kind.SPARSE, 1, 24, "hour of day"),
        Feature("c_dow", C, Kind.SPARSE, 1, 7, "day of week"),
        Feature("c_surface", C, Kind.SPARSE, 1, SURFACES, "feed surface"),
        *_dense(I, "i_taste", 16, "noisy projection of the item's latent", changes="rarely"),
        Feature("i_views_log", I, Kind.DENSE, doc="log views, grows with traffic"),
        Feature("i_click_rate", I, Kind.DENSE, doc="smoothed click rate, drifts"),
        Feature("i_like_rate", I, Kind.DENSE, doc="smoothed like rate, drifts"),
        Feature("i_followers_log", I, Kind.DENSE, doc="log followers of the creator, grows with likes"),
        *_dense(I, "i_noise", 24, "pure noise", changes="rarely"),
        Feature(
            "i_emb", I, Kind.DENSE, 16, doc="pretrained item embedding", space="two_tower", changes="rarely"
        ),
        Feature("i_noise_emb", I, Kind.DENSE, 4, doc="stale embedding, pure noise", changes="rarely"),
        Feature("i_id", I, Kind.SPARSE, 1, ni, "item id", role=Role.ITEM_ID, changes="rarely"),
        Feature("i_category", I, Kind.SPARSE, 1, N_CATEGORIES, "item category", changes="rarely"),
        Feature("i_creator", I, Kind.SPARSE, 1, config.n_creators, "creator id", changes="rarely"),
        *_ids(I, "i_noise_id", 3, 1000, "pure noise id", changes="rarely"),
        Feature(
            "i_tags", I, Kind.MULTI_HOT, 5, N_CATEGORIES, "category and related categories", changes="rarely"
        ),
    ]
    noise_prefixes = ("u_noise", "i_noise", "u_emb_2", "u_emb_3", "c_hour", "c_dow")
    noise_names = {"u_country", "u_lang", "u_gender", "u_device"}
    noise = {f.name for f in feats if f.name.startswith(noise_prefixes) or f.name in noise_names}
    extra = extra_noise_features(config.extra_noise)
    noise.update(f.name for f in extra)
    return FeatureSet("demo", 1, (*feats, *extra)), frozenset(noise)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Engagement:
    """What users did with ranked items, drawn from the world's truth.

    All arrays are ``(B, n)`` for B requests of n ranked items; ``depth`` is ``(B,)``.
    """

    depth: np.ndarray
    viewed: np.ndarray
    click: np.ndarray
    like: np.ndarray
    share: np.ndarray
    hide: np.ndarray
    watch_ms: np.ndarray
    p_click: np.ndarray


class World:
    """Users, items, their latent truth and their current observable features.

    Args:
        config: Size, shape and seed.

    """

    def __init__(self, config: WorldConfig = WorldConfig()) -> None:
        if config.n_users < 1 or config.n_items < 1000:
            raise ValueError("a world needs at least one user and 1,000 items (retrieval takes 1,000)")
        if not config.id_effect >= 0:
            raise ValueError(f"id_effect must be at least 0, got {config.id_effect}")
        if not config.exposure_popularity >= 0:
            raise ValueError(f"exposure_popularity must be at least 0, got {config.exposure_popularity}")
        self.config = config
        self.featureset, self.noise_features = default_featureset(config)
        extra = {f.name for f in extra_noise_features(config.extra_noise)}
        self._extra_columns = {
            (owner, is_float): self._extra_span(owner, extra, is_float)
            for owner in (Owner.USER, Owner.ITEM)
            for is_float in (True, False)
        }
        # The extra noise has its own stream: a world with it draws the same truth, traffic and demo
        # features as one without, so the two differ only by the features added.
        self._extra_rng = np.random.default_rng([config.seed, config.extra_noise])
        rng = np.random.default_rng(config.seed)
        self.rng = rng
        nu, ni, d = config.n_users, config.n_items, LATENT_DIM

        # Latent truth: categories, tastes, popularity.
        centroids = rng.normal(size=(N_CATEGORIES, d))
        cat_weight = 1.0 / np.arange(1, N_CATEGORIES + 1) ** 0.7
        self.item_category = rng.choice(N_CATEGORIES, size=ni, p=cat_weight / cat_weight.sum())
        self.item_latent = 0.8 * centroids[self.item_category] + 0.6 * rng.normal(size=(ni, d))
        self.user_cats = rng.choice(N_CATEGORIES, size=(nu, 2), p=cat_weight / cat_weight.sum())
        self.user_latent = 0.5 * centroids[self.user_cats].sum(axis=1) + 0.5 * rng.normal(size=(nu, d))
        scale = np.sqrt((self.user_latent[:500] @ self.item_latent[:500].T).std())
        self.user_latent /= scale
        self.item_latent /= scale
        rank = rng.permutation(ni) + 1
        log_pop = -config.popularity_exponent * np.log(rank)
        self.popularity = np.exp(log_pop) / np.exp(log_pop).sum()
        self.pop_z = (log_pop - log_pop.mean()) / log_pop.std()
        self.user_bias = 0.3 * rng.normal(size=nu)
        # Its own stream, so a world with an id effect draws the same truth and traffic otherwise.
        self.item_effect = config.id_effect * np.random.default_rng([config.seed, 0x1D]).normal(size=ni)
        activity = 1.0 / np.arange(1, nu + 1) ** 0.8
        self.user_activity = rng.permutation(activity / activity.sum())
        self.item_creator = (self.item_category * (config.n_creators // N_CATEGORIES)) + rng.integers(
            0, max(1, config.n_creators // N_CATEGORIES), size=ni
        )

        # Projections the observable features are made of (the stand-in ranker inverts them).
        self.proj_user_taste = rng.normal(size=(d, 24)) / np.sqrt(d)
        self.proj_item_taste = rng.normal(size=(d, 16)) / np.sqrt(d)
        self.proj_embedding = np.linalg.qr(rng.normal(size=(d, d)))[0]

        # Mutable counters.
        self.item_views = np.floor(self.popularity * 5e6 * rng.uniform(0.5, 1.5, ni))
        base_ctr = _sigmoid(-3.2 + 0.5 * self.pop_z)
        self.item_clicks = np.floor(self.item_views * base_ctr)
        self.item_likes = np.floor(self.item_clicks * 0.09)
        self.creator_followers = rng.pareto(1.5, size=config.n_creators) * 100
        self.user_counts = np.zeros((nu, 4))  # sessions, views, clicks, likes

        # Raw ids: what the world shows the plumbing. Inside, users and items are rows of its arrays.
        self.user_ids = scrambled_ids(nu, USER_SALT)
        self.item_ids = scrambled_ids(ni, ITEM_SALT)
        self.creator_ids = scrambled_ids(config.n_creators, CREATOR_SALT)
        self.users = IdIndex(self.user_ids, "user")
        self.items = IdIndex(self.item_ids, "item")

        users, items = self._init_users(), self._init_items()
        self._draw_extra_noise(users, Owner.USER)
        self._draw_extra_noise(items, Owner.ITEM)
        self.store = MemoryFeatureStore(
            self.featureset,
            {Owner.USER: users, Owner.ITEM: items},
            {Owner.USER: self.user_ids, Owner.ITEM: self.item_ids},
        )

    # ----------------------------------------------------------------- observable features
    def _empty(self, owner: Owner, n: int) -> FeatureBlock:
        fw, iw = self.featureset.widths(owner)
        return FeatureBlock(np.zeros((n, fw), np.float32), np.full((n, iw), PAD_ID, np.int64))

    def _set(self, block: FeatureBlock, owner: Owner, name: str, values: np.ndarray) -> None:
        slot = self.featureset.owner_slots(owner)[name]
        target = block.floats if slot.feature.is_float else block.ints
        target[:, slot.offset : slot.stop] = np.asarray(values).reshape(len(target), -1)

    def _set_many(self, block: FeatureBlock, owner: Owner, prefix: str, values: np.ndarray) -> None:
        for j in range(values.shape[1]):
            self._set(block, owner, f"{prefix}_{j:02d}", values[:, j])

    def _extra_span(self, owner: Owner, extra: set[str], is_float: bool) -> slice:
        """Columns of ``owner``'s extra noise features in its float or int block.

        They are registered after every demo feature, so within an owner's block they are one run of
        trailing columns: a slice, written as one array rather than feature by feature.
        """
        slots = [s for n, s in self.featureset.owner_slots(owner).items() if n in extra]
        slots = [s for s in slots if s.feature.is_float is is_float]
        if not slots:
            return slice(0, 0)
        span = slice(slots[0].offset, slots[-1].stop)
        if span.stop - span.start != sum(s.feature.size for s in slots):
            raise RuntimeError(f"extra {owner} noise features are not contiguous")  # registry order broke
        return span

    def _draw_extra_noise(self, block: FeatureBlock, owner: Owner) -> None:
        """Fill the extra noise features of ``block``'s entities: one draw per family block."""
        n, rng = len(block), self._extra_rng
        floats, ints = self._extra_columns[owner, True], self._extra_columns[owner, False]
        if floats.stop > floats.start:
            block.floats[:, floats] = rng.standard_normal((n, floats.stop - floats.start), np.float32)
        if ints.stop > ints.start:
            block.ints[:, ints] = rng.integers(0, EXTRA_NOISE_VOCAB, (n, ints.stop - ints.start), np.int32)

    def _init_users(self) -> FeatureBlock:
        rng, nu, U = self.rng, self.config.n_users, Owner.USER
        b = self._empty(U, nu)
        lat = self.user_latent
        self._set_many(b, U, "u_taste", lat @ self.proj_user_taste + 0.5 * rng.normal(size=(nu, 24)))
        self._set_many(b, U, "u_noise", rng.normal(size=(nu, 92)))
        self._set(
            b,
            U,
            "u_emb_0",
            lat @ self.proj_embedding + self.config.embedding_noise * rng.normal(size=(nu, 16)),
        )
        self._set(b, U, "u_emb_1", lat @ self.proj_embedding + 0.8 * rng.normal(size=(nu, 16)))
        self._set(
            b, U, "u_emb_long", lat @ rng.normal(size=(LATENT_DIM, 64)) + 0.5 * rng.normal(size=(nu, 64))
        )
        self._set(b, U, "u_emb_2", rng.normal(size=(nu, 64)))
        self._set(b, U, "u_emb_3", rng.normal(size=(nu, 64)))
        self._set(b, U, "u_id", self.user_ids)
        self._set(b, U, "u_top_category", self.user_cats[:, 0])
        self._set(b, U, "u_age_bucket", np.clip((lat[:, 0] * 2 + 4).astype(int), 0, 7))
        for name, vocab in (("u_country", 50), ("u_lang", 20), ("u_gender", 3), ("u_device", 10)):
            self._set(b, U, name, rng.integers(0, vocab, nu))
        self._set_many(b, U, "u_noise_id", rng.integers(0, 1000, (nu, 13)))
        topics = np.full((nu, 8), PAD_ID)
        topics[:, :2] = self.user_cats
        topics[:, 2:5] = rng.integers(0, N_CATEGORIES, (nu, 3))
        self._set(b, U, "u_topics", topics)
        self._set(b, U, "u_noise_tags", rng.integers(0, 500, (nu, 8)))
        hist = self._raw_items(self._initial_history())
        self._set(b, U, "u_hist", hist)
        self._set(b, U, "u_hist_action", np.where(hist == PAD_ID, PAD_ID, rng.random(hist.shape) < 0.09))
        self._set(
            b,
            U,
            "u_hist_age",
            np.where(hist == PAD_ID, 0.0, np.log1p(np.cumsum(rng.exponential(24.0, hist.shape), axis=1))),
        )
        self._write_history_side(b, hist)
        self._write_user_activity(b, np.arange(nu))
        return b

    def _initial_history(self) -> np.ndarray:
        """Last clicks before the simulation: items of the user's categories, popular ones first."""
        rng, nu = self.rng, self.config.n_users
        order = np.lexsort((-self.popularity, self.item_category))
        counts = np.bincount(self.item_category, minlength=N_CATEGORIES)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        hl = self.config.history_len
        cat = np.where(rng.random((nu, hl)) < 0.5, self.user_cats[:, :1], self.user_cats[:, 1:])
        pick = (counts[cat] * rng.random((nu, hl)) ** 3).astype(int)
        hist = order[starts[cat] + np.minimum(pick, counts[cat] - 1)]
        length = np.minimum(hl, rng.geometric(1 / (0.6 * hl), nu))  # mean 30 at the default 50
        hist[np.arange(hl)[None, :] >= length[:, None]] = PAD_ID
        return hist

    def _raw_items(self, rows: np.ndarray) -> np.ndarray:
        """Raw ids of item rows, padding kept."""
        return np.where(rows == PAD_ID, PAD_ID, self.item_ids[np.maximum(rows, 0)])

    def _write_history_side(self, b: FeatureBlock, hist: np.ndarray) -> None:
        """Categories and creators of each history entry (raw item ids; padding stays padding)."""
        pad = hist == PAD_ID
        safe, _ = self.items.find(hist)
        self._set(b, Owner.USER, "u_hist_cat", np.where(pad, PAD_ID, self.item_category[safe]))
        creators = self.creator_ids[self.item_creator[safe]]
        self._set(b, Owner.USER, "u_hist_creator", np.where(pad, PAD_ID, creators))

    def _write_user_activity(self, b: FeatureBlock, rows: np.ndarray) -> None:
        s, v, c, l = (self.user_counts[rows, j] for j in range(4))
        act = np.stack(
            [
                np.log1p(s),
                np.log1p(v),
                np.log1p(c),
                np.log1p(l),
                (c + 1) / (v + 10),
                (l + 0.1) / (c + 1),
                v / (s + 1),
                self.user_bias[rows],
            ],
            axis=1,
        )
        slots = self.featureset.owner_slots(Owner.USER)
        for j in range(8):
            b.floats[:, slots[f"u_act_{j:02d}"].offset] = act[:, j]

    def _init_items(self) -> FeatureBlock:
        rng, ni, I = self.rng, self.config.n_items, Owner.ITEM
        b = self._empty(I, ni)
        lat = self.item_latent
        self._set_many(b, I, "i_taste", lat @ self.proj_item_taste + 0.5 * rng.normal(size=(ni, 16)))
        self._set_many(b, I, "i_noise", rng.normal(size=(ni, 24)))
        self._set(
            b, I, "i_emb", lat @ self.proj_embedding + self.config.embedding_noise * rng.normal(size=(ni, 16))
        )
        self._set(b, I, "i_noise_emb", rng.normal(size=(ni, 4)))
        self._set(b, I, "i_id", self.item_ids)
        self._set(b, I, "i_category", self.item_category)
        self._set(b, I, "i_creator", self.creator_ids[self.item_creator])
        self._set_many(b, I, "i_noise_id", rng.integers(0, 1000, (ni, 3)))
        tags = np.full((ni, 5), PAD_ID)
        tags[:, 0] = self.item_category
        tags[:, 1:3] = (self.item_category[:, None] + rng.integers(1, 3, (ni, 2))) % N_CATEGORIES
        self._set(b, I, "i_tags", tags)
        self._write_item_counters(b, np.arange(ni))
        return b

    def _write_item_counters(self, b: FeatureBlock, rows: np.ndarray) -> None:
        v, c, l = self.item_views[rows], self.item_clicks[rows], self.item_likes[rows]
        f = self.creator_followers[self.item_creator[rows]]
        slots = self.featureset.owner_slots(Owner.ITEM)
        for name, values in (
            ("i_views_log", np.log1p(v)),
            ("i_click_rate", (c + 1) / (v + 20)),
            ("i_like_rate", (l + 0.1) / (c + 1)),
            ("i_followers_log", np.log1p(f)),
        ):
            b.floats[:, slots[name].offset] = values

    def context_block(self, t_ms: np.ndarray, surface: np.ndarray) -> FeatureBlock:
        """Context features of B requests from their time and surface (``(B,)`` each)."""
        n = len(t_ms)
        b = self._empty(Owner.CONTEXT, n)
        hours = (np.asarray(t_ms) // 3_600_000).astype(np.int64)
        self._set(b, Owner.CONTEXT, "c_hour", hours % 24)
        self._set(b, Owner.CONTEXT, "c_dow", (hours // 24) % 7)
        self._set(b, Owner.CONTEXT, "c_surface", surface)
        return b

    # ----------------------------------------------------------------- traffic and behaviour
    def sample_users(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Raw ids of the users of ``n`` requests; heavy users make more requests (power law)."""
        return self.user_ids[rng.choice(self.config.n_users, size=n, p=self.user_activity)]

    def sample_depth(self, n: int, rng: np.random.Generator, n_items: int) -> np.ndarray:
        """Items viewed per session: log-normal, median ``scroll_median``, clipped to the list."""
        raw = np.exp(np.log(self.config.scroll_median) + self.config.scroll_sigma * rng.normal(size=n))
        return np.clip(np.round(raw), 1, n_items).astype(np.int32)

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """True user-item affinity, ``(B, n)`` for raw user ids ``(B,)`` and raw item ids ``(B, n)``."""
        return self._affinity(self.users.rows(users), self.items.rows(items))

    def _affinity(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return np.einsum("bd,bnd->bn", self.user_latent[u], self.item_latent[i])

    def click_probability(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The oracle: true click probability, ``(B, n)``, for raw ids as :meth:`affinity` takes them."""
        return self._click_probability(self.users.rows(users), self.items.rows(items))

    def _click_probability(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        logit = CLICK_INTERCEPT + 1.6 * self._affinity(u, i) + 0.5 * self.pop_z[i] + self.item_effect[i]
        return _sigmoid(logit + self.user_bias[u][:, None])

    def engage(self, users: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> Engagement:
        """Draw what B users (raw ids ``(B,)``) do with their ranked lists ``items`` ``(B, n)`` (raw)."""
        b, n = items.shape
        u, i = self.users.rows(users), self.items.rows(items)
        aff = self._affinity(u, i)
        p_click = self._click_probability(u, i)
        depth = self.sample_depth(b, rng, n)
        viewed = np.arange(n)[None, :] < depth[:, None]
        click = viewed & (rng.random((b, n)) < p_click)
        like = click & (rng.random((b, n)) < _sigmoid(LIKE_INTERCEPT + 1.2 * aff))
        share = click & (rng.random((b, n)) < _sigmoid(SHARE_INTERCEPT + 0.5 * aff))
        hide = viewed & ~click & (rng.random((b, n)) < _sigmoid(-4.0 - aff))
        watch = np.where(click, np.exp(WATCH_LOG_MEDIAN + 0.3 * aff + 0.6 * rng.normal(size=(b, n))), 0.0)
        return Engagement(depth, viewed, click, like, share, hide, watch.astype(np.int32), p_click)

    def apply(self, users: np.ndarray, items: np.ndarray, eng: Engagement) -> None:
        """Let engagement move the world: counters, rates, followers and histories drift.

        Args:
            users: ``(B,)`` raw user ids of the requests.
            items: ``(B, n)`` raw item ids they were shown.
            eng: What they did (:meth:`engage`).

        """
        flat_items = self.items.rows(items.ravel())
        np.add.at(self.item_views, flat_items, eng.viewed.ravel())
        np.add.at(self.item_clicks, flat_items, eng.click.ravel())
        np.add.at(self.item_likes, flat_items, eng.like.ravel())
        np.add.at(self.creator_followers, self.item_creator[flat_items], eng.like.ravel() * 5.0)
        touched = np.unique(flat_items[eng.viewed.ravel()])
        block = self.store.get_many(Owner.ITEM, self.item_ids[touched])
        self._write_item_counters(block, touched)
        self.store.put_many(Owner.ITEM, self.item_ids[touched], block)

        rows = self.users.rows(users)
        np.add.at(self.user_counts[:, 0], rows, 1)
        np.add.at(self.user_counts[:, 1], rows, eng.viewed.sum(axis=1))
        np.add.at(self.user_counts[:, 2], rows, eng.click.sum(axis=1))
        np.add.at(self.user_counts[:, 3], rows, eng.like.sum(axis=1))
        uniq = np.unique(rows)
        ublock = self.store.get_many(Owner.USER, self.user_ids[uniq])
        self._write_user_activity(ublock, uniq)
        slots = self.featureset.owner_slots(Owner.USER)
        hist, action, age = slots["u_hist"], slots["u_hist_action"], slots["u_hist_age"]
        row_of = {u: i for i, u in enumerate(uniq.tolist())}
        for r in np.flatnonzero(eng.click.any(axis=1)):  # one history update per request that clicked
            clicked = items[r][eng.click[r]][::-1].astype(np.int64)
            liked = eng.like[r][eng.click[r]][::-1].astype(np.int64)
            i = row_of[int(rows[r])]
            for slot, new in ((hist, clicked), (action, liked)):
                row = ublock.ints[i, slot.offset : slot.stop]
                row[:] = np.concatenate([new, row])[: self.config.history_len]
            ages = ublock.floats[i, age.offset : age.stop]
            ages[:] = np.concatenate([np.zeros(len(clicked), np.float32), ages])[: self.config.history_len]
        self._write_history_side(ublock, ublock.ints[:, hist.offset : hist.stop])
        self.store.put_many(Owner.USER, self.user_ids[uniq], ublock)
