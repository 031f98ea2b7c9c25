"""Id maps: raw 64-bit ids to the rows of an embedding table smaller than the id space.

leanrec's ids are the catalog's own int64 values (any value but ``PAD_ID``), so no table can have a
row per possible id: a map decides which row an id reads. Three maps share one module,
:class:`IdEmbedding`, whose ``forward`` takes raw ids and returns their embeddings:

- ``hash``: row = ``mix64(id) mod rows``. No state; two ids collide with chance ``1 / rows``.
- ``qr``: the quotient-remainder trick (Shi et al., KDD 2020, "Compositional Embeddings Using
  Complementary Partitions"). The memory is split into two tables of ``q_rows = ceil(rows / 2)`` and
  ``r_rows = rows - q_rows`` rows; with ``h = mix64(id) mod (q_rows * r_rows)`` an id's embedding is
  ``E_q[h // r_rows] * E_r[h mod r_rows]`` (element-wise). Two ids share an embedding only when both
  parts match, so the same memory tells apart about ``rows**2 / 4`` hash values instead of ``rows``.
- ``managed``: a row for each id that earns one and a shared residual hash for the rest, in the spirit
  of Monolith's collisionless table (ByteDance 2022) and TorchRec's managed-collision modules. The
  trainer calls :meth:`IdEmbedding.observe` once per batch; it counts ids with decaying scores, admits
  newcomers into free slots at once and into held slots when they beat the eviction victim (``lfu``
  or ``lru``), and resets a row it hands over to the residual row its new id was sharing, so
  admission keeps what the model learnt of the id. Its ``rows`` are its slots: ids it tells apart
  (a table of as many rows as an id feature has values is collisionless); the residual hash adds an
  eighth of them (at least one row) beside. Serving never observes: its lookups are read-only.

Every map's state (weights, and for ``managed`` the slot table, candidate buffer and counters) is in
the module's ``state_dict()``: a checkpoint restores the map exactly, with nothing kept beside it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from leanrec.ids import mix64
from leanrec.schema import EVICTIONS, ID_MAPS, PAD_ID, Feature

MAP_KINDS = ID_MAPS
"""The ways :class:`IdEmbedding` maps raw ids to rows."""

EMPTY = PAD_ID
"""Id of a free slot or candidate entry: the padding id, which no real id may take."""

HASH_STD = 0.05
"""Init std of a hash or managed table, and of the product of a qr map's two.

Small, as TorchRec's tables start, not ``nn.Embedding``'s 1.0: Adam moves a row by about its learning
rate per step, so rows drawn at 1.0 barely change in an epoch and an id's row learns next to nothing.
"""


def _mod(ids: np.ndarray, n: int) -> np.ndarray:
    """``mix64(ids) mod n`` as int64 (row numbers), ``(*S)`` in, ``(*S)`` out."""
    return (mix64(ids) % np.uint64(n)).astype(np.int64)


@dataclass(frozen=True)
class MapSpec:
    """How an :class:`IdEmbedding` maps ids, and how much memory it has.

    Attributes:
        kind: One of ``MAP_KINDS``.
        rows: Embedding rows: ``hash`` has one table of ``rows``; ``qr`` two of ``ceil(rows / 2)``
            and ``rows // 2``; ``managed`` has ``rows`` slots (a row of its own for each of up to
            ``rows`` ids) and ``max(1, rows // 8)`` residual rows beside them.
        evict: For ``managed``, the victim a newcomer displaces when no slot is free: ``lfu`` (lowest
            decayed score) or ``lru`` (least recently seen, never one seen in the same call).
        admit: For ``managed``, the decayed score a newcomer needs to take a held slot (a free slot
            it takes on its first sighting).
        decay: For ``managed``, the factor every score is multiplied by per :meth:`IdEmbedding.observe`
            call, in ``(0, 1]``; 1 counts plain frequencies.

    """

    kind: str
    rows: int
    evict: str = "lfu"
    admit: float = 2.0
    decay: float = 0.99

    def __post_init__(self) -> None:
        if self.kind not in MAP_KINDS:
            raise ValueError(f"unknown map kind {self.kind!r} (known: {', '.join(MAP_KINDS)})")
        if self.evict not in EVICTIONS:
            raise ValueError(f"unknown eviction {self.evict!r} (known: {', '.join(EVICTIONS)})")
        least = 2 if self.kind == "qr" else 1  # qr splits its memory in two non-empty tables
        if self.rows < least:
            raise ValueError(f"a {self.kind} map needs rows >= {least}, got {self.rows}")
        if not 0.0 < self.decay <= 1.0:  # also refuses NaN
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")

    @classmethod
    def of(cls, f: Feature) -> MapSpec:
        """The map an id feature declares (its map, rows and eviction, defaults resolved)."""
        return cls(f.id_map, f.rows, f.id_evict or EVICTIONS[0])


class IdEmbedding(nn.Module):
    """Embeddings of raw int64 ids through a map (see the module's docstring).

    Padding ids (``PAD_ID``) read exact zeros and send no gradient to any row: the tables have no
    padding row; padded positions are masked out of the output.

    Attributes:
        spec: The map.
        dim: Embedding width.
        weight: ``(rows, dim)`` table of ``hash``; ``(rows + residual, dim)`` of ``managed`` (slots
            first, then residual rows).
        weight_q: ``(q_rows, dim)`` quotient table of ``qr``.
        weight_r: ``(r_rows, dim)`` remainder table of ``qr``.

    A ``managed`` map also holds these buffers (all fixed-size; ``slots = rows``):
    ``slot_ids`` ``(slots,)`` int64 (``EMPTY`` when free), ``slot_score`` ``(slots,)`` float64 decayed
    frequency, ``slot_last_seen`` ``(slots,)`` int64 step, ``cand_ids`` / ``cand_score`` ``(slots,)``
    the ids waiting for a slot, ``sorted_ids`` / ``sorted_rows`` ``(slots,)`` the slot ids sorted with
    their rows (the lookup index), and the scalars ``step``, ``admissions``, ``evictions``.

    """

    def __init__(self, spec: MapSpec, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"an id embedding needs dim >= 1, got {dim}")
        self.spec = spec
        self.dim = dim
        # The table draws from a generator of its own, seeded by one draw of the global one: how
        # large the table is then moves no other parameter's initial values, so models that differ
        # in their maps alone start alike everywhere else.
        gen = torch.Generator().manual_seed(int(torch.randint(2**62, (), dtype=torch.int64)))
        if spec.kind == "qr":
            self.q_rows = math.ceil(spec.rows / 2)
            self.r_rows = spec.rows - self.q_rows
            # Both parts normal with std sqrt(HASH_STD): the product has the other maps' std, and
            # both parts carry signal from the start (with E_q near 1, ids sharing a remainder row
            # would start almost equal, and only training would tell them apart).
            std = math.sqrt(HASH_STD)
            self.weight_q = nn.Parameter(torch.empty(self.q_rows, dim).normal_(0.0, std, generator=gen))
            self.weight_r = nn.Parameter(torch.empty(self.r_rows, dim).normal_(0.0, std, generator=gen))
            return
        extra = max(1, spec.rows // 8) if spec.kind == "managed" else 0
        self.weight = nn.Parameter(torch.empty(spec.rows + extra, dim).normal_(0.0, HASH_STD, generator=gen))
        if spec.kind == "managed":
            self.residual = extra
            self.slots = n = spec.rows
            self.register_buffer("slot_ids", torch.full((n,), EMPTY, dtype=torch.int64))
            self.register_buffer("slot_score", torch.zeros(n, dtype=torch.float64))
            self.register_buffer("slot_last_seen", torch.zeros(n, dtype=torch.int64))
            # As many candidates as slots: enough to remember every contender of a table's turnover.
            self.register_buffer("cand_ids", torch.full((n,), EMPTY, dtype=torch.int64))
            self.register_buffer("cand_score", torch.zeros(n, dtype=torch.float64))
            self.register_buffer("sorted_ids", torch.full((n,), EMPTY, dtype=torch.int64))
            self.register_buffer("sorted_rows", torch.arange(n, dtype=torch.int64))
            self.register_buffer("step", torch.zeros((), dtype=torch.int64))
            self.register_buffer("admissions", torch.zeros((), dtype=torch.int64))
            self.register_buffer("evictions", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        """Map kind, memory and width, for ``print(module)``."""
        return f"kind={self.spec.kind}, rows={self.spec.rows}, dim={self.dim}"

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The row(s) each id reads; read-only.

        Args:
            ids: ``(*S)`` int64 raw ids, ``PAD_ID`` for padding.

        Returns:
            ``(*S)`` int64 rows of ``weight`` for ``hash`` and ``managed``, ``(*S, 2)`` (quotient row,
            remainder row) for ``qr``; -1 for padding.

        """
        ids = np.asarray(ids, dtype=np.int64)
        pad = ids == PAD_ID
        kind = self.spec.kind
        if kind == "hash":
            rows = _mod(ids, self.spec.rows)
        elif kind == "qr":
            h = _mod(ids, self.q_rows * self.r_rows)
            rows = np.stack([h // self.r_rows, h % self.r_rows], axis=-1)
        else:
            rows = self._managed_rows(ids)
        rows[pad] = -1
        return rows

    def _managed_rows(self, ids: np.ndarray) -> np.ndarray:
        """Slot row of the ids in the table, residual row of the others; ``(*S)`` in and out."""
        rows = self.slots + _mod(ids, self.residual)
        if self.slots:
            hit, pos = self._find(ids)
            rows = np.where(hit, self.sorted_rows.numpy()[pos], rows)
        return rows

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which ids hold a slot, and their position in ``sorted_ids``; ``(*S)`` bool and int64."""
        sorted_ids = self.sorted_ids.numpy()
        pos = np.minimum(np.searchsorted(sorted_ids, ids), self.slots - 1)
        # EMPTY is the padding id, so only padding could match a free slot; callers mask it.
        return sorted_ids[pos] == ids, pos

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of raw ids.

        Args:
            ids: ``(*S)`` int64 raw ids, ``PAD_ID`` for padding.

        Returns:
            ``(*S, dim)`` float32; exact zeros at padding, which no row gets gradient from.

        """
        rows = torch.from_numpy(self.rows_of(ids.detach().cpu().numpy())).to(ids.device)
        safe = rows.clamp(min=0)  # padding reads row 0, then is masked out below
        if self.spec.kind == "qr":
            emb = F.embedding(safe[..., 0], self.weight_q) * F.embedding(safe[..., 1], self.weight_r)
        else:
            emb = F.embedding(safe, self.weight)
        # where(), not a product with the mask: the masked branch gets exactly zero gradient.
        return torch.where((ids == PAD_ID).unsqueeze(-1), emb.new_zeros(()), emb)

    def observe(self, ids: torch.Tensor, counts: np.ndarray | None = None) -> torch.Tensor:
        """Count a training batch's ids and admit the ids that earn a slot (``managed`` only).

        Call once per batch, before the forward, with every id the batch holds (padding is ignored).
        Every score (slots and candidates) decays by ``spec.decay``; each distinct id adds its count.
        Ids in the table update score and last-seen step; the others join the candidates. Candidates
        take free slots at once, best score first; then, best first, each candidate seen in this call
        with score >= ``spec.admit`` is paired with the next victim, worst first: under ``lfu`` the
        slot of lowest score (ties: least recently seen, then lowest row), which it must beat
        strictly; under ``lru`` the least recently seen slot not seen in this call (ties: lowest score,
        then lowest row). Only candidates seen in this call displace a held slot: admission is
        triggered by an arrival, so a waiting id never pushes out one seen as recently as itself.

        An evicted id returns to the candidates with its score, so an id pushed out by a burst keeps
        its history and comes back once it beats a slot again. The candidate buffer keeps the highest
        scores (ties: ids seen in this call, then lowest id) and drops the rest.

        A row handed over (a victim's, or a free one to an id that waited among the candidates) takes
        the value of the residual row its new id read until now, so the model keeps what it learnt of
        the id; a free row taken by an id on its first sighting keeps its initial draw (no row was
        learnt for the id, and identical starts would slow the rows apart). The caller zeroes the
        optimizer state of every row returned with :meth:`reset_optimizer_rows`.

        Args:
            ids: ``(*S)`` int64 raw ids of one batch.
            counts: Or, with ``ids`` ``(n,)`` distinct, how often each occurred (data-parallel
                training observes every rank's ids at once this way).

        Returns:
            ``(k,)`` int64 rows of ``weight`` whose content was reset (newly taken slots, free ones
            included), ascending; empty for ``hash`` and ``qr``.

        Raises:
            RuntimeError: The module is in eval mode (serving lookups are read-only).

        """
        if self.spec.kind != "managed":
            return torch.empty(0, dtype=torch.int64)
        if not self.training:
            raise RuntimeError("observe() changes a managed map: call it in training mode only")
        spec = self.spec
        flat = torch.as_tensor(ids).detach().cpu().reshape(-1).numpy().astype(np.int64)
        if counts is None:
            uniq, counts = np.unique(flat[flat != PAD_ID], return_counts=True)
        else:
            counts = np.asarray(counts).reshape(-1)
            if counts.shape != flat.shape or len(np.unique(flat)) != len(flat):
                raise ValueError("observe() with counts needs distinct ids and one count each")
            order = np.argsort(flat[flat != PAD_ID], kind="stable")
            uniq, counts = flat[flat != PAD_ID][order], counts[flat != PAD_ID][order]
        counts = counts.astype(np.float64)
        step = int(self.step) + 1

        # Copies: the buffers are written back at the end, all together.
        slot_ids = self.slot_ids.numpy().copy()
        score = self.slot_score.numpy() * spec.decay
        last = self.slot_last_seen.numpy().copy()
        cand_ids = self.cand_ids.numpy()
        cand_score = self.cand_score.numpy() * spec.decay

        # Ids in the table.
        if self.slots:
            hit, pos = self._find(uniq)
            held = self.sorted_rows.numpy()[pos[hit]]
            score[held] += counts[hit]
            last[held] = step
        else:
            hit = np.zeros(len(uniq), dtype=bool)

        # The pool of contenders: waiting candidates and this call's newcomers, merged by id.
        waiting = cand_ids != EMPTY
        pool_ids, inverse = np.unique(np.concatenate([cand_ids[waiting], uniq[~hit]]), return_inverse=True)
        pool_score = np.bincount(
            inverse, weights=np.concatenate([cand_score[waiting], counts[~hit]]), minlength=len(pool_ids)
        )
        pool_seen = np.zeros(len(pool_ids), dtype=bool)
        pool_seen[inverse[int(waiting.sum()) :]] = True
        pool_waited = np.zeros(len(pool_ids), dtype=bool)  # read the residual before this call
        pool_waited[inverse[: int(waiting.sum())]] = True
        best = np.lexsort((pool_ids, -pool_score))  # best first: highest score, then lowest id
        pool_ids, pool_score, pool_seen = pool_ids[best], pool_score[best], pool_seen[best]
        pool_waited = pool_waited[best]

        # Free slots go to the best contenders, whatever their score.
        free = np.flatnonzero(slot_ids == EMPTY)
        n_free = min(len(free), len(pool_ids))
        held_slots = np.flatnonzero(slot_ids != EMPTY)  # before this call's admissions: never a newcomer
        rest_ids, rest_score, rest_seen = pool_ids[n_free:], pool_score[n_free:], pool_seen[n_free:]

        # Held slots: best eligible contenders against worst victims, pair by pair.
        contenders = np.flatnonzero(rest_seen & (rest_score >= spec.admit))
        v_score, v_last = score[held_slots], last[held_slots]
        if spec.evict == "lfu":
            victims = held_slots[np.lexsort((held_slots, v_last, v_score))]
        else:
            unseen = v_last < step
            victims = held_slots[unseen][np.lexsort((held_slots[unseen], v_score[unseen], v_last[unseen]))]
        k = min(len(contenders), len(victims))
        contenders, victims = contenders[:k], victims[:k]
        if spec.evict == "lfu":
            # Contenders fall and victims rise along the pairs, so the pairs that win are a prefix.
            k = int(np.cumprod(rest_score[contenders] > score[victims]).sum())
            contenders, victims = contenders[:k], victims[:k]
        evicted_ids, evicted_score = slot_ids[victims], score[victims]

        new_rows = np.concatenate([free[:n_free], victims])
        new_ids = np.concatenate([pool_ids[:n_free], rest_ids[contenders]])
        slot_ids[new_rows] = new_ids
        score[new_rows] = np.concatenate([pool_score[:n_free], rest_score[contenders]])
        last[new_rows] = step

        # The candidates left: contenders not admitted and the evicted ids, the best kept.
        left = np.ones(len(rest_ids), dtype=bool)
        left[contenders] = False
        left_ids = np.concatenate([rest_ids[left], evicted_ids])
        left_score = np.concatenate([rest_score[left], evicted_score])
        left_seen = np.concatenate([rest_seen[left], np.zeros(k, dtype=bool)])
        keep = np.lexsort((left_ids, ~left_seen, -left_score))[: self.slots]
        cand_ids = np.full(self.slots, EMPTY, dtype=np.int64)
        cand_score = np.zeros(self.slots, dtype=np.float64)
        cand_ids[: len(keep)], cand_score[: len(keep)] = left_ids[keep], left_score[keep]

        with torch.no_grad():
            if len(new_rows):
                # Slot rows and residual rows are disjoint, so no copy reads a row another writes.
                # A first sighting in a free slot keeps the slot's initial draw.
                handed = np.concatenate([pool_waited[:n_free], np.ones(len(victims), dtype=bool)])
                src = torch.from_numpy(self.slots + _mod(new_ids[handed], self.residual))
                self.weight[torch.from_numpy(new_rows[handed])] = self.weight[src]
                order = np.argsort(slot_ids, kind="stable")  # membership changed: rebuild the index
                self.sorted_ids.copy_(torch.from_numpy(slot_ids[order]))
                self.sorted_rows.copy_(torch.from_numpy(order))
            self.slot_ids.copy_(torch.from_numpy(slot_ids))
            self.slot_score.copy_(torch.from_numpy(score))
            self.slot_last_seen.copy_(torch.from_numpy(last))
            self.cand_ids.copy_(torch.from_numpy(cand_ids))
            self.cand_score.copy_(torch.from_numpy(cand_score))
            self.step.fill_(step)
            self.admissions += len(new_rows)
            self.evictions += k
        return torch.from_numpy(np.sort(new_rows))

    def reset_optimizer_rows(self, optimizer: torch.optim.Optimizer, rows: torch.Tensor) -> None:
        """Zero the optimizer state of table rows whose content :meth:`observe` reset.

        Every per-parameter state tensor of ``weight`` whose first dimension is the table's (AdamW's
        ``exp_avg`` and ``exp_avg_sq``, SGD's momentum) is zeroed at ``rows``, so a newly admitted id
        does not inherit the moments of the id it displaced; scalars (AdamW's ``step``) are left alone.

        Args:
            optimizer: The optimizer over this module's parameters (a table it has not stepped yet
                has no state, and nothing is done).
            rows: ``(k,)`` int64 rows of ``weight``, as :meth:`observe` returns them.

        Raises:
            ValueError: Rows are given for a ``qr`` map, whose observe resets none.

        """
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if rows.numel() == 0:
            return
        if self.spec.kind == "qr":
            raise ValueError("a qr map has no rows to reset (its observe() admits nothing)")
        state = optimizer.state.get(self.weight)
        if not state:
            return
        with torch.no_grad():
            for value in state.values():
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == self.weight.shape[0]:
                    value[rows] = 0

    @property
    def memory_bytes(self) -> int:
        """Bytes of the parameters and the map's state (every buffer)."""
        tensors = itertools.chain(self.parameters(), self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def counters(self) -> dict[str, int]:
        """The map's size and turnover.

        Returns:
            ``rows`` (as the map declares them: a managed map's slots), ``rows_in_use``
            (``managed``: occupied slots plus every residual row, which any id outside the table may
            read; ``hash`` and ``qr`` keep no state, so all their rows), ``admissions`` and
            ``evictions`` (``managed`` since it was built; 0 for the others).

        """
        if self.spec.kind != "managed":
            return {"rows": self.spec.rows, "rows_in_use": self.spec.rows, "admissions": 0, "evictions": 0}
        occupied = int((self.slot_ids != EMPTY).sum())
        return {
            "rows": self.spec.rows,
            "rows_in_use": occupied + self.residual,
            "admissions": int(self.admissions),
            "evictions": int(self.evictions),
        }

    def collisions(self, ids: np.ndarray, counts: np.ndarray, head: float = 0.01) -> dict[str, float]:
        """How many of a set of ids share their embedding with another of them, head and rest.

        An id collides when another id of ``ids`` reads the same row (``qr``: the same pair of rows).
        Under ``managed`` an id in a slot never collides (its slot is its own), and an id outside
        collides when another id of ``ids`` lands in its residual row.

        Args:
            ids: ``(n,)`` distinct raw ids seen (padding is dropped).
            counts: ``(n,)`` their frequencies, which rank the head.
            head: Fraction of the ids, most frequent first (ties: lowest id), that make the head; at
                least one id.

        Returns:
            ``ids_seen`` (n), ``collided`` (ids that collide), ``collision_rate_head`` and
            ``collision_rate_rest`` (fraction colliding among the head and the others; 0.0 for an
            empty group) and ``rows_in_use`` (distinct rows the ids read; ``qr``: quotient rows plus
            remainder rows).

        Raises:
            ValueError: ``ids`` and ``counts`` differ in shape, ids repeat, or ``head`` is not in
                ``[0, 1]``.

        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        counts = np.asarray(counts).reshape(-1)
        if ids.shape != counts.shape:
            raise ValueError(f"ids and counts differ in shape: {ids.shape} and {counts.shape}")
        if not 0.0 <= head <= 1.0:
            raise ValueError(f"head must be in [0, 1], got {head}")
        real = ids != PAD_ID
        ids, counts = ids[real], counts[real]
        if len(np.unique(ids)) != len(ids):
            raise ValueError("collisions() needs distinct ids")
        n = len(ids)
        rows = self.rows_of(ids)
        if self.spec.kind == "qr":
            keys = rows[:, 0] * self.r_rows + rows[:, 1]
            in_use = len(np.unique(rows[:, 0])) + len(np.unique(rows[:, 1]))
        else:
            keys = rows
            in_use = len(np.unique(rows))
        _, inverse, key_counts = np.unique(keys, return_inverse=True, return_counts=True)
        collided = key_counts[inverse.reshape(-1)] > 1
        ranked = collided[np.lexsort((ids, -counts))]
        n_head = min(n, max(1, math.ceil(head * n)))

        def rate(group: np.ndarray) -> float:
            return float(group.mean()) if group.size else 0.0

        return {
            "ids_seen": n,
            "collided": int(collided.sum()),
            "collision_rate_head": rate(ranked[:n_head]),
            "collision_rate_rest": rate(ranked[n_head:]),
            "rows_in_use": in_use,
        }
