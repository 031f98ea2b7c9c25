"""MovieLens 100K as a catalog of its own: a FeatureSet, feature snapshots, sessions and a retrieval index.

    python examples/movielens/prepare.py --data ../shared/data/ml-100k --out ml-work

Reads the dataset in RecBole's atomic format and writes, into ``--out``:

- ``featureset.toml``: the FeatureSet of a late ranker for this catalog (user, item and context
  features, the roles a model needs: the user id, the movie id, the history of movies rated, and a
  user and a movie vector of the retrieval model's embedding space);
- ``retrieval.npz``: a BPR model (``leanrec.retrieval``) trained on the first 60% of the sessions,
  exported as a retrieval index that masks what it was trained on;
- per replay chunk k (1..4): ``users_k.parquet`` and ``items_k.parquet``, the features as they stood
  when chunk k began (histories, counts, like rates: they move from chunk to chunk, as features
  mutate in a live feed), and ``sessions_k.parquet``: the chunk's sessions in time order (a
  session is a user's ratings with less than 30 minutes between them; its items are what it
  engaged with, ratings of 4 and 5 are likes).

Users and movies get raw 64-bit ids (:func:`leanrec.ids.scrambled_ids` of their rank in the
dataset's own numbering), as a real catalog's ids are: nothing downstream works because ids happen to
be small and dense. Only BPR's own tables are indexed by row, inside this script.

Chunks 1 and 2 (60–80% of the sessions) are round 1: replayed and logged to train the late ranker.
Chunks 3 and 4 (the last 20%) are held out: the ranker and retrieval alone are replayed on them.
The dataset's terms forbid redistributing it: the files written stay on this machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leanrec.featurefile import dump_featureset
from leanrec.ids import scrambled_ids
from leanrec.retrieval.atomic import read_atomic
from leanrec.retrieval.index import embeddings_of, save_index
from leanrec.retrieval.models import BPR
from leanrec.retrieval.protocol import Split
from leanrec.schema import Feature, FeatureSet, Kind, Owner

GAP_S = 30 * 60  # ratings further apart than this start a new session
HISTORY = 20
RECENT_S = 7 * 86_400
USER_SALT, ITEM_SALT = 11, 12  # the catalog's raw ids: scrambled_ids(n, salt)
CHUNKS = ((0.60, 0.70), (0.70, 0.80), (0.80, 0.90), (0.90, 1.00))  # session shares of chunks 1..4


def featureset(n_users: int, n_items: int, n_genres: int, n_occupations: int, dim: int) -> FeatureSet:
    """The late ranker's FeatureSet of this catalog.

    Who a user is and what a movie is (ids, demographics, genres, the retrieval vectors) change
    rarely; histories, counts and rates move with every rating.
    """
    f, R = Feature, "rarely"
    return FeatureSet(
        "movielens",
        1,
        (
            f("viewer", Owner.USER, Kind.SPARSE, 1, n_users, "the user", role="user_id", changes=R),
            f("age_band", Owner.USER, Kind.SPARSE, 1, 8, "age by decade", changes=R),
            f("gender", Owner.USER, Kind.SPARSE, 1, 2, "gender", changes=R),
            f("occupation", Owner.USER, Kind.SPARSE, 1, n_occupations, "occupation", changes=R),
            f("watched", Owner.USER, Kind.SEQUENCE, HISTORY, n_items, "rated, newest 1st", role="history"),
            f("ratings_log", Owner.USER, Kind.DENSE, 1, 0, "log(1 + movies rated so far)"),
            f("genre_taste", Owner.USER, Kind.DENSE, n_genres, 0, "genre shares of movies rated"),
            f("u_bpr", Owner.USER, Kind.DENSE, dim, 0, "the user's retrieval vector", space="bpr", changes=R),
            f("hour", Owner.CONTEXT, Kind.SPARSE, 1, 24, "hour of the session (UTC)"),
            f("weekday", Owner.CONTEXT, Kind.SPARSE, 1, 7, "day of the week of the session"),
            f("movie", Owner.ITEM, Kind.SPARSE, 1, n_items, "the movie", role="item_id", changes=R),
            f("genres", Owner.ITEM, Kind.DENSE, n_genres, 0, "the movie's genres, one-hot", changes=R),
            f("decade", Owner.ITEM, Kind.SPARSE, 1, 12, "decade of release", changes=R),
            f("popularity_log", Owner.ITEM, Kind.DENSE, 1, 0, "log(1 + ratings so far)"),
            f("recent_log", Owner.ITEM, Kind.DENSE, 1, 0, "log(1 + ratings in the last 7 days)"),
            f("like_rate", Owner.ITEM, Kind.DENSE, 1, 0, "share of its ratings that were 4 or 5 (smoothed)"),
            f("i_bpr", Owner.ITEM, Kind.DENSE, dim, 0, "the movie's BPR vector", space="bpr", changes=R),
        ),
    )  # fmt: skip


def dense_ids(tokens: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Ids 0..N-1 in the order of the tokens' numeric value, and each id's token."""
    values = tokens.to_numpy(zero_copy_only=False).astype(np.int64)
    uniq, ids = np.unique(values, return_inverse=True)
    return ids, uniq


def column(values: np.ndarray) -> pa.Array:
    """A Parquet column: numbers, or a fixed-size list per row for ``(rows, size)``."""
    values = np.asarray(values)
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def snapshot(t: float, inter: dict, users: dict, items: dict, u_emb: np.ndarray, i_emb: np.ndarray) -> tuple:
    """Users' and items' feature tables as they stood at time ``t`` (only ratings before it count).

    ``users["raw"]`` and ``items["raw"]`` are the raw ids of the rows; the tables hold raw ids only.
    """
    past = inter["ts"] < t
    u, i, r, ts = (inter[k][past] for k in ("user", "item", "rating", "ts"))
    n_users, n_items = len(users["age"]), len(items["decade"])
    count_u = np.bincount(u, minlength=n_users)
    genre_sum = np.zeros((n_users, items["genres"].shape[1]))
    np.add.at(genre_sum, u, items["genres"][i])
    taste = genre_sum / np.maximum(genre_sum.sum(1, keepdims=True), 1)
    order = np.lexsort((-ts, u))  # each user's ratings, newest first
    us = u[order]
    rank = np.arange(len(us)) - np.searchsorted(us, us)  # position within the user's ratings
    keep = rank < HISTORY
    watched = np.full((n_users, HISTORY), -1, np.int64)
    watched[us[keep], rank[keep]] = items["raw"][i[order][keep]]
    user_table = pa.table(
        {
            "user_id": users["raw"],
            "age_band": np.minimum(users["age"] // 10, 7),
            "gender": users["gender"],
            "occupation": users["occupation"],
            "watched": column(watched),
            "ratings_log": np.log1p(count_u).astype(np.float32),
            "genre_taste": column(taste.astype(np.float32)),
            "u_bpr": column(u_emb),
        }
    )
    count_i = np.bincount(i, minlength=n_items)
    recent = np.bincount(i[ts >= t - RECENT_S], minlength=n_items)
    liked = np.bincount(i[r >= 4], minlength=n_items)
    item_table = pa.table(
        {
            "item_id": items["raw"],
            "genres": column(items["genres"]),
            "decade": items["decade"],
            "popularity_log": np.log1p(count_i).astype(np.float32),
            "recent_log": np.log1p(recent).astype(np.float32),
            "like_rate": ((liked + 1) / (count_i + 2)).astype(np.float32),
            "i_bpr": column(i_emb),
        }
    )
    return user_table, item_table


def main() -> None:
    """Write the catalog's files (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", default="../shared/data/ml-100k", help="the ml-100k folder (RecBole atomic files)"
    )
    ap.add_argument("--out", default="ml-work", help="folder to write (default ./ml-work)")
    ap.add_argument("--epochs", type=int, default=60, help="BPR epochs (default 60)")
    ap.add_argument("--seed", type=int, default=2020)
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inter_t = read_atomic(data / "ml-100k.inter")
    user_t, item_t = read_atomic(data / "ml-100k.user"), read_atomic(data / "ml-100k.item")
    uid, user_tokens = dense_ids(inter_t.column("user_id"))
    iid, item_tokens = dense_ids(inter_t.column("item_id"))
    inter = {
        "user": uid,
        "item": iid,
        "rating": inter_t.column("rating").to_numpy(),
        "ts": inter_t.column("timestamp").to_numpy(),
    }
    # Users' and items' attributes, rows in id order.
    u_tokens = user_t.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64)
    u_row = np.argsort(u_tokens)[np.searchsorted(u_tokens, user_tokens, sorter=np.argsort(u_tokens))]
    occupations, occ = np.unique(
        user_t.column("occupation").to_numpy(zero_copy_only=False), return_inverse=True
    )
    users = {
        "age": user_t.column("age").to_numpy(zero_copy_only=False).astype(np.int64)[u_row],
        "gender": (user_t.column("gender").to_numpy(zero_copy_only=False) == "F").astype(np.int64)[u_row],
        "occupation": occ[u_row],
        "raw": scrambled_ids(len(user_tokens), USER_SALT),
    }
    i_tokens = item_t.column("item_id").to_numpy(zero_copy_only=False).astype(np.int64)
    i_row = np.searchsorted(i_tokens, item_tokens, sorter=np.argsort(i_tokens))
    i_row = np.argsort(i_tokens)[i_row]
    classes = item_t.column("class").to_pylist()
    genre_names = sorted({g for c in classes for g in (c or [])})
    by_file_row = np.zeros((len(classes), len(genre_names)), np.float32)
    for row, c in enumerate(classes):  # 1,682 movies, once
        by_file_row[row, [genre_names.index(g) for g in (c or [])]] = 1.0
    genres = by_file_row[i_row]
    year_tokens = item_t.column("release_year").to_pylist()
    years = np.array([int(y) if y and str(y).isdigit() else 1990 for y in year_tokens])
    items = {
        "genres": genres,
        "decade": np.clip((years[i_row] - 1900) // 10, 0, 11),
        "raw": scrambled_ids(len(item_tokens), ITEM_SALT),
    }

    # Sessions, in the order they started.
    order = np.lexsort((inter["ts"], inter["user"]))
    u_sorted, t_sorted = inter["user"][order], inter["ts"][order]
    new = np.r_[True, (np.diff(u_sorted) != 0) | (np.diff(t_sorted) > GAP_S)]
    sid = np.cumsum(new) - 1
    starts = t_sorted[new]
    by_start = np.argsort(starts, kind="stable")
    rank_of = np.empty_like(by_start)
    rank_of[by_start] = np.arange(len(by_start))
    n_sessions = len(starts)
    session_rank = rank_of[sid]  # of each sorted interaction

    # Retrieval: BPR on the first 60% of the sessions.
    train = session_rank < int(CHUNKS[0][0] * n_sessions)
    tu, ti = inter["user"][order][train], inter["item"][order][train]
    n_users, n_items = len(user_tokens), len(item_tokens)
    split = Split(n_users, n_items, ((tu, ti), (tu[:1], ti[:1]), (tu[:1], ti[:1])))
    model = BPR()
    model.fit(split, epochs=args.epochs, seed=args.seed)
    u_emb, i_emb = embeddings_of(model)
    save_index(out / "retrieval.npz", u_emb, i_emb, users["raw"], items["raw"], seen=(tu, ti))
    fs = featureset(n_users, n_items, len(genre_names), len(occupations), u_emb.shape[1])
    (out / "featureset.toml").write_text(
        "# MovieLens 100K as a catalog: written by examples/movielens/prepare.py\n" + dump_featureset(fs)
    )
    for k, (lo, hi) in enumerate(CHUNKS, start=1):
        first, last = int(lo * n_sessions), int(hi * n_sessions)
        t0 = starts[by_start[first]]
        user_table, item_table = snapshot(t0, inter, users, items, u_emb, i_emb)
        pq.write_table(user_table, out / f"users_{k}.parquet")
        pq.write_table(item_table, out / f"items_{k}.parquet")
        chosen = by_start[first:last]  # session ids in start order
        rows = np.isin(sid, chosen)
        s_of, i_of = sid[rows], inter["item"][order][rows]
        liked = inter["rating"][order][rows] >= 4
        pos = np.searchsorted(np.sort(chosen), s_of)
        raw = items["raw"][i_of]
        lists = [raw[pos == j] for j in range(len(chosen))]
        likes = [raw[(pos == j) & liked] for j in range(len(chosen))]
        back = np.argsort(np.argsort(chosen))  # sorted-id slot of each chosen session
        when = starts[chosen].astype("datetime64[s]")
        hour = (when.astype("datetime64[h]").astype(np.int64) % 24).astype(np.int64)
        weekday = ((when.astype("datetime64[D]").astype(np.int64) + 3) % 7).astype(np.int64)  # 0 = Monday
        first_row = np.searchsorted(sid, chosen)
        pq.write_table(
            pa.table(
                {
                    "user_id": users["raw"][u_sorted[first_row]],
                    "items": pa.array([lists[j].tolist() for j in back], pa.list_(pa.int64())),
                    "likes": pa.array([likes[j].tolist() for j in back], pa.list_(pa.int64())),
                    "hour": hour,
                    "weekday": weekday,
                }
            ),
            out / f"sessions_{k}.parquet",
        )
        print(f"chunk {k}: {len(chosen):,} sessions, {int(rows.sum()):,} ratings, features as of {when[0]}")
    print(f"wrote {out}/: featureset.toml, retrieval.npz, users_k / items_k / sessions_k.parquet (k = 1..4)")


if __name__ == "__main__":
    main()
