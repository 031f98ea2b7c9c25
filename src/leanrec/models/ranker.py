"""The late ranker: a DLRM-style model built from the FeatureSet, with a request-level forward path.

The model finds its inputs by role, never by name (see :class:`~leanrec.schema.Role`): the user's
history (``Role.HISTORY``, an id sequence of items) and the item id (``Role.ITEM_ID``) whose embedding
table the history shares. Every other id feature is sum-pooled through a table of its own, every dense
feature enters its side's dense tower. Ids arrive raw (64-bit); each table maps them to its rows as
its feature declares (:mod:`leanrec.models.idmap`), and a managed table learns which ids earn a row
from the batches the trainer shows it (:meth:`LateRanker.observe`). Without a history there is no
encoder and no target attention: the user side's history parts are zero-width and every shape stays
consistent. A side without dense
inputs has zero-width input layers, whose outputs are their biases (learnt constants); a side without
ids pools nothing.

Everything that depends only on the request side (the user's dense tower, the user's embedding
lookups, the transformer over the user's history) is the *user side*. A request-level batch computes
it once per request and broadcasts it to the request's items; an impression-level batch computes it
once per item. Both paths share every parameter and give the same outputs: the request-level one
simply does not repeat work.

``forward(..., dedup=True)`` goes further and computes each distinct row's work once
(:meth:`LateRanker.score_rows`): the item side once per distinct item row of the batch
(byte-identical features, :func:`distinct_rows`; a popular item is shown in many requests with the
same features each time); the top MLP's first layer split by the columns it reads, its user term
once per request and its item term once per distinct item row, only the interaction terms per
impression; and target attention over each request's history where it lies, not over a copy per
impression. It is the same function; the sums run in another order, so the outputs agree up to
float32 rounding.

Per item: the item's dense tower and embedding lookups, target attention of the item over the
encoded history, an interaction of user and item vectors, a top MLP, and two heads (click, like).
Beside the deep part, a wide part (a linear model of each side's dense inputs and of the dot
products of vectors in one embedding space) adds straight to the logits; the trainer solves it first
(:meth:`LateRanker.fit_wide`), and the deep part learns what it leaves. The solve first selects the
dense features the wide part reads (a group lasso whose penalty no feature unrelated to the labels
is likely to pass), then fits them; the rest stay at zero through training.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from leanrec.models.idmap import IdEmbedding, MapSpec
from leanrec.schema import PAD_ID, Feature, FeatureSet, Kind, Role, Side


@dataclass(frozen=True)
class RankerConfig:
    """Sizes of the late ranker.

    Attributes:
        dim: Width of every embedding and of the history encoder.
        hidden: Width of the dense towers and the top MLP.
        heads: Attention heads of the history encoder.

    The history and the item id are not named here: the model reads them from the FeatureSet's roles.

    """

    dim: int = 32
    hidden: int = 128
    heads: int = 2


def _linear(a: int, b: int) -> nn.Linear:
    """``nn.Linear(a, b)``; with ``a == 0`` (a side without dense inputs) its output is its bias."""
    with warnings.catch_warnings():
        # Initialising a (b, 0) weight does nothing, which is what a zero-width input needs.
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        return nn.Linear(a, b)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [_linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@dataclass
class UserSide:
    """The user side of B rows: a vector, and the encoded history with its mask.

    Without a history role in the FeatureSet, ``L`` is 0.
    """

    vector: torch.Tensor  # (B, hidden)
    linear: torch.Tensor  # (B, dim) linear projection of the dense inputs, for the dot interaction
    wide: torch.Tensor  # (B, 2) the user's share of the wide part's (click, like) logits
    spaced: torch.Tensor  # (B, S) raw user vectors that share an embedding space with item vectors
    history: torch.Tensor  # (B, L, dim)
    mask: torch.Tensor  # (B, L) True where the history has an entry

    def take(self, rows: torch.Tensor) -> UserSide:
        """Broadcast to items: row ``rows[i]`` for item i."""
        return UserSide(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


@dataclass
class SideParts:
    """The input-dependent parts of one side of B rows (see ``LateRanker.side_parts``)."""

    normed: torch.Tensor  # (B, F) standardised dense inputs
    first: torch.Tensor  # (B, width) first dense layer, before its activation
    linear: torch.Tensor  # (B, dim) linear projection for the dot interaction
    wide: torch.Tensor  # (B, 2) the side's share of the wide part's logits
    pooled: torch.Tensor  # (B, n_ids, dim) sum-pooled embedding of each id feature
    spaced: torch.Tensor  # (B, S) raw vectors of a shared embedding space
    encoded: torch.Tensor | None = None  # request side: (B, L, dim) encoded history (L = 0 without)
    mask: torch.Tensor | None = None  # request side: (B, L)
    summary: torch.Tensor | None = None  # request side: (B, dim), (B, 0) without a history

    def replace(self, **changes: torch.Tensor) -> SideParts:
        """A copy with some parts replaced."""
        return dataclasses.replace(self, **changes)


@dataclass
class ItemSide:
    """The item side of N rows."""

    vector: torch.Tensor  # (N, hidden)
    query: torch.Tensor  # (N, dim) the item's attention query over the user's history; (N, 0) without
    linear: torch.Tensor  # (N, dim) linear projection of the dense inputs, for the dot interaction
    wide: torch.Tensor  # (N, 2) the item's share of the wide part's logits
    spaced: torch.Tensor  # (N, S) raw item vectors matched with ``UserSide.spaced``, column for column

    def take(self, rows: torch.Tensor) -> ItemSide:
        """Gather to impressions: row ``rows[i]`` for impression i."""
        return ItemSide(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def distinct_rows(floats: torch.Tensor, ints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The distinct rows of a block of N rows: rows whose float and int features are byte-identical.

    The whole row decides, not an id: an item's features change over time, and two rows of one
    item with different features must each get their own item side. Bytes decide, not values, so
    rows found equal give the very same computation (0.0 and -0.0 stay apart, equal NaNs merge).
    The rows' bytes are viewed as one opaque value each and ``np.unique`` sorts them: no Python loop
    per row, and exact (a hash would need a check for collisions).

    Args:
        floats: ``(N, F)`` float32 on the CPU.
        ints: ``(N, I)`` int64 on the CPU.

    Returns:
        ``first`` ``(M,)`` a row holding each distinct row and ``of`` ``(N,)`` the position in ``first``
        of each row's copy, so that ``rows[first][of]`` equals ``rows``; None when no row repeats.

    """
    n = len(floats)
    width = floats.shape[1] * floats.element_size() + ints.shape[1] * ints.element_size()
    if n < 2 or width == 0:
        return None
    data = np.concatenate(
        [np.ascontiguousarray(x.numpy()).view(np.uint8).reshape(n, x[0].nbytes) for x in (floats, ints)], 1
    )
    keys = data.view(np.dtype((np.void, width))).ravel()
    _, first, of = np.unique(keys, return_index=True, return_inverse=True)
    if len(first) == n:
        return None
    return torch.from_numpy(first), torch.from_numpy(of.reshape(n))


def _space_pairs(fs: FeatureSet) -> tuple[list[int], list[int], torch.Tensor]:
    """Pairs of a request-side and an item-side dense vector of one embedding space and size.

    Returns:
        Float columns of the request layout and of the item layout, aligned (S each), and a
        ``(S, P)`` 0/1 matrix that sums each of the P pairs' elementwise products into its dot product.

    """
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    u_cols: list[int] = []
    i_cols: list[int] = []
    pair_of: list[int] = []
    for us in req.slots:
        for it in item.slots:
            uf, itf = us.feature, it.feature
            if uf.space and uf.space == itf.space and uf.is_float and itf.is_float and uf.size == itf.size:
                pair_of += [pair_of[-1] + 1 if pair_of else 0] * uf.size
                u_cols += range(us.offset, us.stop)
                i_cols += range(it.offset, it.stop)
    n_pairs = pair_of[-1] + 1 if pair_of else 0
    summing = torch.zeros(len(pair_of), n_pairs)
    summing[torch.arange(len(pair_of)), torch.tensor(pair_of, dtype=torch.long)] = 1.0
    return u_cols, i_cols, summing


class LateRanker(nn.Module):
    """The late-stage ranker of one FeatureSet version.

    Args:
        fs: The FeatureSet whose layouts the inputs follow; the checkpoint records it. Its
            ``Role.HISTORY`` feature, if any, is encoded (with the request-side id sequences of the
            same size, which describe the same entries) and attended to by each item; it shares the
            embedding table of the ``Role.ITEM_ID`` feature.
        config: Sizes.

    Attributes:
        history: The FeatureSet's history feature, or None (no encoder, no target attention).
        item_id: The FeatureSet's item id feature, or None.
        trained_id_maps: What training reported of each table's map (``TrainResult.id_maps``: ids
            seen, collisions), when the model came from a checkpoint; empty otherwise.

    """

    def __init__(self, fs: FeatureSet, config: RankerConfig = RankerConfig()) -> None:
        super().__init__()
        self.fs, self.config = fs, config
        self.trained_id_maps: dict[str, dict] = {}
        self.history: Feature | None = fs.role(Role.HISTORY)
        self.item_id: Feature | None = fs.role(Role.ITEM_ID)
        req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
        d, h = config.dim, config.hidden
        self.register_buffer("req_mean", torch.zeros(req.float_width))
        self.register_buffer("req_std", torch.ones(req.float_width))
        self.register_buffer("item_mean", torch.zeros(item.float_width))
        self.register_buffer("item_std", torch.ones(item.float_width))
        self.user_dense = _mlp([req.float_width, 2 * h, h])
        self.item_dense = _mlp([item.float_width, h, h])
        # One table per id feature; the history shares the item-id table so attention compares like
        # with like. Padding (-1) reads zeros that are never trained.
        self.tables = nn.ModuleDict()
        # Every block of ids each table reads: (table, side, offset, size), for observe().
        self._reads: list[tuple[str, Side, int, int]] = []
        self._req_ids: list[tuple[str, int, int]] = []  # (name, offset, size) of pooled request ids
        self._item_ids: list[tuple[str, int, int]] = []
        # Request-side id sequences of the history's length, added to its tokens: they describe the
        # same entries (the category of each item in the history, say). Only with a history.
        self._side_seqs: list[tuple[str, int, int]] = []
        self._hist = (0, 0)  # (offset, size) of the history in the request ints
        for side, out in ((req, self._req_ids), (item, self._item_ids)):
            for slot in side.slots:
                f = slot.feature
                if f.is_float:
                    continue
                if f.role == Role.HISTORY:
                    self._hist = (slot.offset, f.size)
                    if self.item_id is not None:
                        self._reads.append((self.item_id.name, side.side, slot.offset, f.size))
                    continue
                self.tables[f.name] = IdEmbedding(MapSpec.of(f), d)
                self._reads.append((f.name, side.side, slot.offset, f.size))
                if self.aligned(f):
                    self._side_seqs.append((f.name, slot.offset, f.size))
                else:
                    out.append((f.name, slot.offset, f.size))
        # The history's share of the user vector (its summary) and of the top MLP (the target
        # attention): dim each with a history, nothing without.
        d_hist = d if self.history is not None else 0
        self.encoder: nn.TransformerEncoderLayer | None = None
        if self.history is not None:
            self.encoder = nn.TransformerEncoderLayer(
                d, config.heads, dim_feedforward=2 * d, batch_first=True, dropout=0.0
            )
        n_req, n_item = len(self._req_ids), len(self._item_ids)
        self.user_mix = _mlp([h + n_req * d + d_hist, h, h])
        self.item_mix = _mlp([h + n_item * d, h, h])
        self.query: nn.Linear | None = nn.Linear(h, d) if self.history is not None else None
        # DLRM's dot interaction on linear projections of the dense inputs: a bilinear user-item
        # term the MLPs would otherwise have to approximate.
        self.user_linear = _linear(req.float_width, d)
        self.item_linear = _linear(item.float_width, d)
        # Vectors the FeatureSet places in one embedding space interact directly: their elementwise
        # products and dot product go to the top MLP. A learnt projection would have to rediscover
        # the alignment from data, which MLPs do slowly.
        u_cols, i_cols, summing = _space_pairs(fs)
        self.register_buffer("user_space_cols", torch.tensor(u_cols, dtype=torch.long))
        self.register_buffer("item_space_cols", torch.tensor(i_cols, dtype=torch.long))
        self.register_buffer("space_sum", summing)
        # Wide part: each side's dense inputs and each pair's dot product add straight to both logits.
        # Zero to start; fit_wide solves it.
        self.space_weight = nn.Parameter(torch.zeros(summing.shape[1], 2))
        self.user_wide = _linear(req.float_width, 2)
        self.item_wide = _linear(item.float_width, 2)
        for layer in (self.user_wide, self.item_wide):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # Which (head, input) weights of the wide part may be non-zero: fit_wide selects them, and a
        # gradient hook keeps the others at zero through training. Not saved: the zeros are in the
        # weights, and the support only constrains training.
        self.register_buffer("user_wide_support", torch.ones(2, req.float_width), persistent=False)
        self.register_buffer("item_wide_support", torch.ones(2, item.float_width), persistent=False)
        self.user_wide.weight.register_hook(lambda g: g * self.user_wide_support)
        self.item_wide.weight.register_hook(lambda g: g * self.item_wide_support)
        self.top = _mlp([3 * h + d_hist + d + len(u_cols) + summing.shape[1], h, h // 2, 2])
        # Slot of each dense input column, for per-feature weight norms.
        for side, name in ((req, "req"), (item, "item")):
            slot_of = [
                i for i, sl in enumerate(side.slots) if sl.feature.is_float for _ in range(sl.feature.size)
            ]
            self.register_buffer(f"{name}_column_slot", torch.tensor(slot_of, dtype=torch.long))

    def aligned(self, f: Feature) -> bool:
        """Whether ``f`` is an id sequence the history encoder reads with the history, entry by entry.

        That is a request-side sequence of the history's size other than the history itself; without
        a history no feature is.
        """
        h = self.history
        return (
            h is not None
            and f.name != h.name
            and f.kind is Kind.SEQUENCE
            and f.side is Side.REQUEST
            and f.size == h.size
        )

    # ------------------------------------------------------------------ inputs
    def fit_normalizer(self, req_floats: torch.Tensor, item_floats: torch.Tensor) -> None:
        """Standardise dense inputs with statistics of training data (stored in the checkpoint)."""
        for name, x in (("req", req_floats), ("item", item_floats)):
            if x.shape[1] == 0:  # a side without dense inputs has nothing to standardise
                continue
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp_min(1e-3))

    def dense_input_norms(self, side: Side) -> torch.Tensor:
        """L2 norm of the first-layer weights that read each slot of a side, ``(n_slots,)``.

        The inputs are standardised, so the norms compare across features; id slots get 0. The
        trainer's group lasso penalises their sum, and audits read them as weight-based importance.
        """
        col_sq = sum(m.weight.square().sum(0) for m in self.input_layers(side).values())  # (F,)
        index = self.req_column_slot if side is Side.REQUEST else self.item_column_slot
        out = col_sq.new_zeros(len(self.fs.layout(side).slots)).index_add(0, index, col_sq)
        return out.clamp_min(1e-12).sqrt()

    def input_layers(self, side: Side) -> dict[str, nn.Linear]:
        """The linear layers that read a side's standardised dense inputs, by their ``SideParts`` name.

        ``first`` is the dense tower's first layer, ``linear`` the projection for the dot interaction,
        ``wide`` the side's share of the wide part.
        """
        if side is Side.REQUEST:
            return {"first": self.user_dense[0], "linear": self.user_linear, "wide": self.user_wide}
        return {"first": self.item_dense[0], "linear": self.item_linear, "wide": self.item_wide}

    def normalise(self, side: Side, floats: torch.Tensor) -> torch.Tensor:
        """A side's dense inputs ``(B, F)`` standardised with the training statistics."""
        if side is Side.REQUEST:
            return (floats - self.req_mean) / self.req_std
        return (floats - self.item_mean) / self.item_std

    def _ids(self, name: str, ints: torch.Tensor, offset: int, size: int) -> torch.Tensor:
        return self.tables[name](ints[:, offset : offset + size])  # (B, size, d)

    # ------------------------------------------------------------------ id maps
    def table_ids(self, req_ints: torch.Tensor, item_ints: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every raw id each embedding table reads in a batch, flattened (padding included).

        Args:
            req_ints: ``(R, I_req)`` request-side ids, one row per request (not per item, so a
                request's ids count once whichever warehouse layout the batch came from).
            item_ints: ``(N, I_item)`` item-side ids.

        """
        parts: dict[str, list[torch.Tensor]] = {}
        for name, side, offset, size in self._reads:
            ints = req_ints if side is Side.REQUEST else item_ints
            parts.setdefault(name, []).append(ints[:, offset : offset + size].reshape(-1))
        return {name: torch.cat(p) for name, p in parts.items()}

    def observe(self, req_ints: torch.Tensor, item_ints: torch.Tensor) -> dict[str, torch.Tensor]:
        """Show every managed table a training batch's ids (see :meth:`IdEmbedding.observe`).

        Call before the batch's forward, with one request row per request (see :meth:`table_ids`).

        Returns:
            The rows each table reset, by table name; pass them to :meth:`reset_optimizer_rows`.

        """
        managed = self.managed_tables()
        return {
            n: managed[n].observe(ids)
            for n, ids in self.table_ids(req_ints, item_ints).items()
            if n in managed
        }

    def managed_tables(self) -> dict[str, IdEmbedding]:
        """The tables whose map is ``managed`` (the ones training must show its ids), by name."""
        return {n: t for n, t in self.tables.items() if t.spec.kind == "managed"}

    def reset_optimizer_rows(self, optimizer: torch.optim.Optimizer, resets: dict[str, torch.Tensor]) -> None:
        """Zero the optimizer state of the rows :meth:`observe` reset."""
        for name, rows in resets.items():
            self.tables[name].reset_optimizer_rows(optimizer, rows)

    def id_map_report(self, seen: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, dict]:
        """Each table's map: its kind, memory, counters and (given the ids it saw) its collisions.

        Args:
            seen: Per table, the distinct ids it read in training and how often (``(n,)`` each).

        Returns:
            Per table name: ``map``, ``rows``, ``memory_bytes``, ``rows_in_use``, ``admissions``,
            ``evictions`` and, with ``seen``, ``ids_seen``, ``collided``, ``collision_rate_head``
            (among the 1% most frequent ids) and ``collision_rate_rest``.

        """
        out = {}
        for name, table in self.tables.items():
            row: dict = {"map": table.spec.kind, "memory_bytes": table.memory_bytes, **table.counters()}
            if seen is not None and name in seen:
                collided = table.collisions(*seen[name])
                row |= {k: v for k, v in collided.items() if k != "rows_in_use"}
            out[name] = row
        return out

    # ------------------------------------------------------------------ the two halves
    def side_parts(self, side: Side, floats: torch.Tensor, ints: torch.Tensor) -> SideParts:
        """The input-dependent parts of one side of B rows, before they are mixed.

        Everything after these parts is a function of them alone, so a caller that changes a few
        inputs (a feature audit shuffling a column) can update the parts and skip the rest.
        """
        req = side is Side.REQUEST
        normed = self.normalise(side, floats)
        ids = self._req_ids if req else self._item_ids
        pooled = torch.stack([self._ids(n, ints, o, s).sum(1) for n, o, s in ids], 1) if ids else None
        parts = SideParts(
            normed=normed,
            **{part: layer(normed) for part, layer in self.input_layers(side).items()},
            pooled=pooled if pooled is not None else normed.new_zeros(len(normed), 0, self.config.dim),
            spaced=floats[:, self.user_space_cols if req else self.item_space_cols],
        )
        if req:
            parts.encoded, parts.mask, parts.summary = self.encode(ints)
        return parts

    def pooled_index(self, side: Side) -> dict[str, int]:
        """Position of each sum-pooled id feature of a side in ``SideParts.pooled``."""
        ids = self._req_ids if side is Side.REQUEST else self._item_ids
        return {n: i for i, (n, _, _) in enumerate(ids)}

    @property
    def encoded_features(self) -> frozenset[str]:
        """Features the history encoder reads: the history and the sequences aligned with it.

        Empty without a history.
        """
        if self.history is None:
            return frozenset()
        return frozenset([self.history.name, *(n for n, _, _ in self._side_seqs)])

    def encode(self, ints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The history of B request rows, encoded.

        Args:
            ints: ``(B, I_req)`` request-side ids.

        Returns:
            The encoded history ``(B, L, dim)``, its attention mask ``(B, L)`` (True where attended)
            and its summary ``(B, dim)``, the mean of the encoded entries. Without a history, ``L``
            is 0 and the summary is ``(B, 0)``.

        """
        if self.encoder is None or self.item_id is None:
            b = len(ints)
            empty = torch.zeros(b, 0, self.config.dim, device=ints.device)
            return empty, torch.zeros(b, 0, dtype=torch.bool, device=ints.device), empty[:, :, 0]
        off, size = self._hist
        hist = ints[:, off : off + size]
        mask = hist != PAD_ID
        tokens = self.tables[self.item_id.name](hist)
        for n, o, s in self._side_seqs:
            tokens = tokens + self._ids(n, ints, o, s)
        # An empty history attends to nothing; keep one slot open so softmax stays defined.
        enc_mask = mask.clone()
        enc_mask[:, 0] = True
        encoded = self.encoder(tokens, src_key_padding_mask=~enc_mask)
        summary = (encoded * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return encoded, enc_mask, summary

    def user_from(self, p: SideParts) -> UserSide:
        """The user side from its parts (see :meth:`side_parts`)."""
        dense = self.user_dense[1:](p.first)
        vector = self.user_mix(torch.cat([dense, p.summary, p.pooled.flatten(1)], dim=1))
        return UserSide(vector, p.linear, p.wide, p.spaced, p.encoded, p.mask)

    def item_from(self, p: SideParts) -> ItemSide:
        """The item side from its parts (see :meth:`side_parts`)."""
        dense = self.item_dense[1:](p.first)
        vector = self.item_mix(torch.cat([dense, p.pooled.flatten(1)], dim=1))
        query = self.query(vector) if self.query is not None else vector.new_zeros(len(vector), 0)
        return ItemSide(vector, query, p.linear, p.wide, p.spaced)

    def user_side(self, floats: torch.Tensor, ints: torch.Tensor) -> UserSide:
        """Everything that depends only on the request side, for B rows."""
        return self.user_from(self.side_parts(Side.REQUEST, floats, ints))

    def item_side(self, floats: torch.Tensor, ints: torch.Tensor) -> ItemSide:
        """The item side of N rows."""
        return self.item_from(self.side_parts(Side.ITEM, floats, ints))

    def score(self, user: UserSide, item: ItemSide) -> torch.Tensor:
        """Logits ``(N, 2)`` (click, like) for N items whose user side is ``user`` (N rows)."""
        if self.history is None:
            target = item.vector.new_zeros(len(item.vector), 0)  # no history to attend to
        else:
            att = torch.einsum("nld,nd->nl", user.history, item.query) / self.config.dim**0.5
            att = att.masked_fill(~user.mask, float("-inf")).softmax(-1)
            target = torch.einsum("nl,nld->nd", att, user.history)  # (N, dim)
        products = user.spaced * item.spaced  # (N, S)
        dots = products @ self.space_sum  # (N, P) dot product of each pair of one embedding space
        z = torch.cat(
            [
                user.vector,
                item.vector,
                user.vector * item.vector,
                target,
                user.linear * item.linear,
                products,
                dots,
            ],
            dim=1,
        )
        return self.top(z) + user.wide + item.wide + dots @ self.space_weight

    def score_rows(
        self, user: UserSide, item: ItemSide, user_row: torch.Tensor, item_row: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(N, 2)`` of N impressions of U user rows and M item rows, each row's work done once.

        The same function as ``score(user.take(user_row), item.take(item_row))``, computed so that
        nothing that depends on one side alone is repeated per impression:

        - the top MLP's first layer reads ``[u; i; x]`` (user vector, item vector, the interaction
          terms): ``W [u; i; x] + b = W_u u + (W_i i + b) + W_x x``, where ``W_u u`` is computed once
          per user row and ``W_i i + b`` once per item row; only ``W_x x`` is per impression;
        - target attention reads each user row's encoded history where it lies, ``(U, L, dim)``,
          instead of a copy per impression ``(N, L, dim)`` (:meth:`target_attention`).

        The sums are the same terms in another order, so the logits equal ``score``'s up to float32
        rounding (a few 1e-7 relative), and the gradients too.

        Args:
            user: U user rows (one per request in a request-level batch).
            item: M item rows (one per distinct item row, see :func:`distinct_rows`).
            user_row: ``(N,)`` the user row of each impression.
            item_row: ``(N,)`` the item row of each impression; None when they are one to one (M = N).

        """
        h = self.config.hidden

        def at(x: torch.Tensor) -> torch.Tensor:
            return x if item_row is None else x[item_row]

        first: nn.Linear = self.top[0]
        w_user, w_item, w_pair = first.weight[:, :h], first.weight[:, h : 2 * h], first.weight[:, 2 * h :]
        i_vector = at(item.vector)
        products = user.spaced[user_row] * at(item.spaced)  # (N, S)
        dots = products @ self.space_sum  # (N, P)
        target = self.target_attention(user.history, user.mask, at(item.query), user_row)
        linear = user.linear[user_row] * at(item.linear)
        pair = torch.cat([user.vector[user_row] * i_vector, target, linear, products, dots], dim=1)
        hidden = (
            nn.functional.linear(user.vector, w_user)[user_row]
            + at(nn.functional.linear(item.vector, w_item, first.bias))
            + nn.functional.linear(pair, w_pair)
        )
        return self.top[1:](hidden) + user.wide[user_row] + at(item.wide) + dots @ self.space_weight

    def target_attention(
        self, history: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, user_row: torch.Tensor
    ) -> torch.Tensor:
        """Each impression's attention over its user row's encoded history, ``(N, dim)``.

        The same as copying the history for each impression (``history[user_row]``, ``(N, L, dim)``)
        and attending one query at a time, with a copy per block of queries instead: a user row's
        impressions are cut into blocks of ``k`` queries (the last one padded), and each block meets
        its row's history in one batched product ``(k, dim) x (dim, L)``. ``k`` is the power of two
        nearest the mean number of impressions per user row, so a request-level batch copies the
        history about once per request rather than once per impression and pads about half a block
        per request; an impression-level one (a user row per impression) gets ``k = 1``, no padding.
        One batched product for the whole batch: no loop over rows.

        Args:
            history: ``(U, L, dim)`` encoded history of each user row.
            mask: ``(U, L)`` True where a row's history may be attended.
            query: ``(N, dim)`` each impression's query.
            user_row: ``(N,)`` the user row of each impression.

        Returns:
            ``(N, dim)``; ``(N, 0)`` without a history.

        """
        n = len(query)
        if self.history is None:
            return query.new_zeros(n, 0)
        u, dim = history.shape[0], query.shape[1]
        counts = torch.bincount(user_row, minlength=u)
        k = 2 ** max(round(float(np.log2(n / max(int((counts > 0).sum()), 1)))), 0) if n else 1
        blocks = (counts + k - 1) // k  # (U,) blocks of each user row
        first_block = torch.cumsum(blocks, 0) - blocks
        # The slot of each impression among its row's impressions (0, 1, ...), by a stable sort.
        order = torch.argsort(user_row, stable=True)
        start = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(user_row)
        slot[order] = torch.arange(n) - start[user_row[order]]
        at = first_block[user_row] * k + slot  # (N,) where each query sits among the blocks' slots
        n_blocks = int(blocks.sum())
        block_row = torch.repeat_interleave(torch.arange(u), blocks)  # (V,) the user row of each block
        take = torch.full((n_blocks * k,), n, dtype=torch.long)  # n: the zero query that pads a block
        take[at] = torch.arange(n)
        queries = torch.cat([query, query.new_zeros(1, dim)])[take].view(n_blocks, k, dim)
        hist = history[block_row]  # (V, L, dim)
        att = torch.bmm(queries, hist.transpose(1, 2)) / self.config.dim**0.5  # (V, k, L)
        att = att.masked_fill(~mask[block_row].unsqueeze(1), float("-inf")).softmax(-1)
        return torch.bmm(att, hist).view(n_blocks * k, dim)[at]

    def wide_parameters(self) -> list[nn.Parameter]:
        """The parameters of the wide part (see :meth:`fit_wide`)."""
        return [*self.user_wide.parameters(), *self.item_wide.parameters(), self.space_weight]

    def fit_wide(
        self,
        req_floats: torch.Tensor,
        item_floats: torch.Tensor,
        labels: torch.Tensor,
        iters: int = 100,
        l2: float = 1e-4,
        alpha: float | None = 0.05,
    ) -> float:
        """Solve the wide part alone: a logistic regression on the examples given.

        The wide part is convex, so it is solved outright rather than walked towards by the deep
        part's optimiser, which would take hundreds of steps to reach the weight of a strong linear
        signal (the dot product of pretrained embeddings) while the deep part begins to overfit. Call
        it after :meth:`fit_normalizer` and before training the rest. It takes one request row per
        example, so either warehouse layout poses the very same problem and gets the same solution.

        The solve has two steps. First it selects the dense features each head reads, by a group
        lasso (one group per feature and head, see :func:`wide_support`) whose penalty is set so that
        a feature unrelated to the labels enters with probability at most ``alpha`` over all groups.
        A logistic regression of every input on a few ten thousand examples gives each unrelated
        input a weight of the order of its sampling noise, 1/sqrt(examples); a FeatureSet of a
        hundred such inputs puts that much noise into every logit, which costs held-out AUC and
        makes a shuffle of any of them look costly to an audit. Then it fits the selected inputs
        and the dot products by full-batch L-BFGS with a light ridge ``l2`` (a refit: the lasso's
        shrinkage does not stay in the weights). The inputs left out stay at zero while the deep
        part trains (see ``user_wide_support``).

        Args:
            req_floats: ``(N, F_req)`` request-side dense inputs of each example.
            item_floats: ``(N, F_item)``.
            labels: ``(N, 2)`` click and like, 0/1.
            iters: Most L-BFGS iterations of the refit.
            l2: Penalty on the squared weights of the dense inputs in the refit.
            alpha: Chance that any dense feature unrelated to the labels is selected; None selects
                every input (a plain ridge logistic regression).

        Returns:
            The training log loss of the fitted wide part (the mean over both heads, with the penalty).

        """
        with torch.no_grad():
            user, item = self.normalise(Side.REQUEST, req_floats), self.normalise(Side.ITEM, item_floats)
            dots = (
                req_floats[:, self.user_space_cols] * item_floats[:, self.item_space_cols]
            ) @ self.space_sum
            if alpha is None:
                self.user_wide_support.fill_(1.0)
                self.item_wide_support.fill_(1.0)
            else:
                groups = torch.cat(
                    [self.req_column_slot, len(self.fs.layout(Side.REQUEST).slots) + self.item_column_slot]
                )
                support = wide_support(torch.cat([user, item], 1), dots, labels, groups, alpha)
                self.user_wide_support.copy_(support[:, : user.shape[1]])
                self.item_wide_support.copy_(support[:, user.shape[1] :])
            for layer in (self.user_wide, self.item_wide):
                layer.weight.zero_()
            # The refit reads only the columns some head selected.
            u_cols = self.user_wide_support.any(0).nonzero().flatten()
            i_cols = self.item_wide_support.any(0).nonzero().flatten()
            user, item = user[:, u_cols], item[:, i_cols]
            u_mask, i_mask = self.user_wide_support[:, u_cols], self.item_wide_support[:, i_cols]
        opt = torch.optim.LBFGS(self.wide_parameters(), max_iter=iters, line_search_fn="strong_wolfe")

        def penalised() -> torch.Tensor:
            u_w, i_w = self.user_wide.weight[:, u_cols] * u_mask, self.item_wide.weight[:, i_cols] * i_mask
            logits = (
                nn.functional.linear(user, u_w, self.user_wide.bias)
                + nn.functional.linear(item, i_w, self.item_wide.bias)
                + dots @ self.space_weight
            )
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
            return loss + l2 * (u_w.square().sum() + i_w.square().sum())

        def objective() -> torch.Tensor:
            opt.zero_grad()
            loss = penalised()
            loss.backward()
            return loss

        opt.step(objective)
        with torch.no_grad():
            self.user_wide.weight.mul_(self.user_wide_support)
            self.item_wide.weight.mul_(self.item_wide_support)
            return float(penalised())

    def forward(
        self,
        req_floats: torch.Tensor,
        req_ints: torch.Tensor,
        item_floats: torch.Tensor,
        item_ints: torch.Tensor,
        item_request: torch.Tensor,
        request_level: bool = True,
        dedup: bool = False,
    ) -> torch.Tensor:
        """Logits ``(N, 2)``.

        Args:
            req_floats: ``(R, F_req)`` request-side dense inputs.
            req_ints: ``(R, I_req)`` request-side raw ids (-1 = padding).
            item_floats: ``(N, F_item)``.
            item_ints: ``(N, I_item)``.
            item_request: ``(N,)`` the request row of each item.
            request_level: Compute the user side once per request row (True) or once per item.
            dedup: Compute each distinct row's work once (:meth:`score_rows`): the item side once
                per distinct item row (see :func:`distinct_rows`), the top MLP's user and item
                terms once per user and item row, target attention without a copy of the history
                per item. The same function; the outputs agree up to float32 rounding.

        """
        if dedup:
            if request_level:
                user, user_row = self.user_side(req_floats, req_ints), item_request
            else:  # a user row per impression: nothing of the user side is shared
                user = self.user_side(req_floats[item_request], req_ints[item_request])
                user_row = torch.arange(len(item_request))
            found = distinct_rows(item_floats, item_ints)
            if found is None:
                return self.score_rows(user, self.item_side(item_floats, item_ints), user_row)
            first, of = found
            return self.score_rows(user, self.item_side(item_floats[first], item_ints[first]), user_row, of)
        if request_level:
            user = self.user_side(req_floats, req_ints).take(item_request)
        else:
            user = self.user_side(req_floats[item_request], req_ints[item_request])
        return self.score(user, self.item_side(item_floats, item_ints))


def wide_support(
    x: torch.Tensor,
    fixed: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    alpha: float = 0.05,
    iters: int = 2_000,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Which inputs each head of a logistic regression reads: the support of a group lasso.

    Each head h is its own logistic regression of the inputs ``x``, penalised by group (the columns
    of one feature), and of the ``fixed`` inputs (unpenalised, like the intercept). A group is
    orthonormalised first (its columns replaced by an orthonormal basis of their span, scaled to
    unit variance), and its penalty is the norm of its contribution to the logits, which no
    reparameterisation of the feature changes (Simon and Tibshirani, 2012). The penalty of group g
    in head h is the level its gradient would reach at zero if the feature were unrelated to the
    labels, with probability at most ``alpha`` over all G groups and H heads:

        lambda[g, h] = sqrt(v[h] / N) * (sqrt(k[g]) + sqrt(2 log(G H / alpha)))

    where N is the number of examples, k[g] the group's rank and v[h] the mean Bernoulli variance
    p (1 - p) of head h under the unpenalised inputs alone. Unrelated to the labels, the gradient of
    an orthonormalised group at zero is a mean of N independent terms, near normal with covariance
    v[h] / N times the identity, so its norm exceeds sqrt(v[h] / N) (sqrt(k[g]) + t) with
    probability at most exp(-t^2 / 2) (Gaussian concentration of a norm); the union over the G H
    groups gives ``alpha``. Selected are the groups whose evidence beats that threshold.

    The problem is convex. It is solved on a working set: the groups whose gradient breaks the
    optimality condition at the current solution join it, the problem restricted to the working set
    is solved by accelerated proximal gradient (FISTA with backtracking and adaptive restart; the
    proximal step sets groups exactly to zero), and this repeats until no group outside breaks the
    condition. The working set stays small, so each step touches a few columns.

    Args:
        x: ``(N, F)`` inputs (standardised or not: groups are orthonormalised).
        fixed: ``(N, P)`` inputs every head reads, unpenalised (may be ``(N, 0)``).
        labels: ``(N, H)`` 0/1.
        groups: ``(F,)`` the group of each column of ``x`` (ids need not be contiguous).
        alpha: Chance that any group unrelated to the labels is selected.
        iters: Most proximal-gradient iterations per working set.
        tol: Stop a working set's solve when an iteration changes the objective by less than this
            (relative).

    Returns:
        ``(H, F)`` 1.0 where head h may read column f (its group was selected), else 0.0.

    """
    n, h = len(x), labels.shape[1]
    if x.shape[1] == 0:  # no dense inputs: nothing to select
        return x.new_zeros(h, 0)
    ids, groups = torch.unique(groups, return_inverse=True)
    n_groups = len(ids)
    bce = nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        # Orthonormalise each group: z_g = x_g V diag(1/sqrt(eig)), keeping the directions it spans.
        # A one-column group (most features) is simply standardised.
        xc = x - x.mean(0)
        sd = xc.std(0)
        size = torch.bincount(groups, minlength=n_groups)
        single = (size[groups] == 1) & (sd > 1e-6 * max(float(sd.max()), 1e-30))
        basis, of = [xc[:, single] / sd[single]], [groups[single]]
        for g in (size > 1).nonzero().flatten().tolist():
            xg = xc.index_select(1, (groups == g).nonzero().flatten()).double()
            evals, evecs = torch.linalg.eigh(xg.T @ xg / n)
            keep = evals > 1e-6 * max(float(evals.max()), 1e-30)
            basis.append((xg @ (evecs[:, keep] / evals[keep].sqrt())).float())
            of.append(torch.full((int(keep.sum()),), g, dtype=torch.long))
        z, of_t = torch.cat(basis, 1), torch.cat(of)
        rank = torch.bincount(of_t, minlength=n_groups).float()
    with torch.enable_grad():  # the unpenalised start: intercepts and fixed inputs alone
        bias = torch.zeros(h, requires_grad=True)
        fw = torch.zeros(fixed.shape[1], h, requires_grad=True)
        opt = torch.optim.LBFGS([bias, fw], max_iter=100, line_search_fn="strong_wolfe")

        def null_objective() -> torch.Tensor:
            opt.zero_grad()
            loss = bce(fixed @ fw + bias, labels, reduction="none").mean(0).sum()
            loss.backward()
            return loss

        opt.step(null_objective)
    with torch.no_grad():
        bias, fw = bias.detach(), fw.detach()
        p = torch.sigmoid(fixed @ fw + bias)
        v = (p * (1 - p)).mean(0)  # (H,)
        t = float(np.sqrt(2 * np.log(max(n_groups * h, 1) / alpha)))
        lam = (v / n).sqrt()[None, :] * (rank.sqrt()[:, None] + t)  # (G, H)
        lam[rank == 0] = float("inf")  # a constant feature explains nothing
        w = torch.zeros(z.shape[1], h)
        active = torch.zeros(n_groups, h, dtype=torch.bool)

        def norms_of(wt: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n_groups, h).index_add_(0, of_t[cols], wt.square()).sqrt()

        for _ in range(n_groups * h + 1):
            residual = torch.sigmoid(z @ w + fixed @ fw + bias) - labels
            grad_norm = norms_of(z.T @ residual / n, torch.arange(z.shape[1]))
            breaks = (grad_norm > lam * (1 + 1e-4)) & ~active
            if not breaks.any():
                break
            active |= breaks
            cols = torch.isin(of_t, active.any(1).nonzero().flatten()).nonzero().flatten()
            free = active[of_t[cols]].float()  # (C, H) entries the restricted problem may move
            sub = _group_lasso(
                z[:, cols], of_t[cols], free, fixed, labels, lam, w[cols], fw, bias, iters, tol
            )
            w[cols], fw, bias = sub
        selected = norms_of(w, torch.arange(z.shape[1])) > 0  # (G, H)
        return selected[groups].T.float().contiguous()


def _group_lasso(
    z: torch.Tensor,
    of: torch.Tensor,
    free: torch.Tensor,
    fixed: torch.Tensor,
    labels: torch.Tensor,
    lam: torch.Tensor,
    w: torch.Tensor,
    fw: torch.Tensor,
    bias: torch.Tensor,
    iters: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FISTA on a working set of :func:`wide_support`'s problem, from ``(w, fw, bias)``.

    In double precision, with the gradient written out: the logits are linear in the parameters, so
    the extrapolated point's logits are the same combination of the iterates' and each iteration
    costs one product with ``z`` each way.
    """
    n_groups, h = lam.shape
    z, fixed, labels = z.double(), fixed.double(), labels.double()
    safe = torch.where(torch.isinf(lam), torch.zeros_like(lam), lam).double()
    lam = lam.double()

    def logits(ps: list[torch.Tensor]) -> torch.Tensor:
        return z @ ps[0] + fixed @ ps[1] + ps[2]

    def smooth(eta: torch.Tensor) -> float:  # the mean log loss of each head, summed over heads
        return float((nn.functional.softplus(eta) - labels * eta).mean(0).sum())

    def gradient(eta: torch.Tensor) -> list[torch.Tensor]:
        r = (torch.sigmoid(eta) - labels) / len(z)
        return [z.T @ r, fixed.T @ r, r.sum(0)]

    def group_norms(wt: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_groups, h, dtype=wt.dtype).index_add_(0, of, wt.square()).sqrt()

    def prox(wt: torch.Tensor, step: float) -> torch.Tensor:
        scale = (1 - step * lam / group_norms(wt).clamp_min(1e-300)).clamp_min(0.0)
        return wt * scale[of] * free

    x = [w.double(), fw.double(), bias.double()]
    eta_x = logits(x)
    obj_x = smooth(eta_x) + float((safe * group_norms(x[0])).sum())
    y, eta_y = x, eta_x
    step, momentum = 1.0, 1.0
    for _ in range(iters):
        f_y, g = smooth(eta_y), gradient(eta_y)
        while True:  # backtracking: the step must keep the quadratic upper bound at y
            new = [a - step * b for a, b in zip(y, g, strict=True)]
            new[0] = prox(new[0], step)
            diff = [a - b for a, b in zip(new, y, strict=True)]
            eta_new = logits(new)
            f_new = smooth(eta_new)
            bound = f_y + sum(float((a * b).sum()) for a, b in zip(g, diff, strict=True))
            bound += sum(float(d.square().sum()) for d in diff) / (2 * step)
            if f_new <= bound + 1e-12 or step < 1e-10:
                break
            step /= 2
        obj = f_new + float((safe * group_norms(new[0])).sum())
        if obj > obj_x:  # adaptive restart: drop the momentum when the objective goes up
            momentum, y, eta_y = 1.0, x, eta_x
            continue
        nxt = (1 + np.sqrt(1 + 4 * momentum**2)) / 2
        beta = (momentum - 1) / nxt
        y = [a + beta * (a - b) for a, b in zip(new, x, strict=True)]
        eta_y = eta_new + beta * (eta_new - eta_x)
        done = obj_x - obj <= tol * max(abs(obj), 1.0)
        momentum, x, eta_x, obj_x = nxt, new, eta_new, obj
        step *= 1.2  # let the step grow back after a cautious stretch
        if done:
            break
    return x[0].float(), x[1].float(), x[2].float()
