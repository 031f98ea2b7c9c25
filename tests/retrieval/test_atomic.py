"""RecBole's atomic files, the per-user split and the full-ranking metrics, on fixtures written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from leanrec.retrieval.atomic import AtomicError, load_interactions, read_atomic, side_features
from leanrec.retrieval.metrics import evaluate
from leanrec.retrieval.protocol import random_split, split_counts

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"u{u}\ti{i}\t{(u + i) % 5 + 1}\t{1000 + 10 * u + i}\n" for u in range(6) for i in range(u, u + 10)
)


def _dataset(tmp_path: Path, inter: str = INTER) -> Path:
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy.inter").write_text(inter)
    (folder / "toy.item").write_text(
        "item_id:token\ttitle:token_seq\tyear:float\nA\tToy Story\t1995\nB\tHeat\t1995\n"
    )
    return folder


def test_an_atomic_file_reads_with_its_declared_types(tmp_path: Path) -> None:
    items = read_atomic(_dataset(tmp_path) / "toy.item")
    assert items.column_names == ["item_id", "title", "year"]
    assert items.column("title").to_pylist() == [["Toy", "Story"], ["Heat"]]
    assert items.column("year").to_pylist() == [1995.0, 1995.0]


def test_interactions_get_dense_ids_in_order_of_first_appearance(tmp_path: Path) -> None:
    data = load_interactions(_dataset(tmp_path))
    assert len(data) == 60 and data.n_users == 6 and data.n_items == 15
    assert list(data.user_tokens[:2]) == ["u0", "u1"] and data.item_tokens[0] == "i0"
    assert data.user[:10].tolist() == [0] * 10 and data.item[:3].tolist() == [0, 1, 2]
    assert data.timestamp[1] == 1001.0
    # The user's tokens map back: interaction 15 is u1 with i6.
    assert data.user_tokens[data.user[15]] == "u1" and data.item_tokens[data.item[15]] == "i6"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("user_id\titem_id:token\nu\ti\n", "not name:type"),
        ("user_id:token\titem_id:int\nu\ti\n", "atomic types"),
        ("user_id:token\titem_id:token\nu\ti\textra\n", "Expected 2 columns"),
        ("user_id:token\titem_id:token\trating:float\nu\ti\tgood\n", "rating"),
        ("user:token\titem_id:token\nu\ti\n", "needs a user_id:token"),
    ],
)
def test_a_malformed_file_is_refused_with_what_is_wrong(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(AtomicError, match=match):
        load_interactions(_dataset(tmp_path, text))


def test_side_features_align_with_the_interaction_ids(tmp_path: Path) -> None:
    folder = _dataset(tmp_path)
    (folder / "toy.user").write_text(
        "user_id:token\tgender:token\tage:float\nu1\tF\t30\nu0\tM\t40\nu9\tF\t50\n"
    )
    data = load_interactions(folder)
    users = side_features(folder / "toy.user", "user_id", data.user_tokens)
    assert users.names == ["gender"] and users.cat_sizes == [3]  # F, M and unknown
    # u0 is id 0 (M: code 2), u1 id 1 (F: code 1); u2..u5 are not in the file: unknown (0).
    assert users.cats[:, 0].tolist() == [2, 1, 0, 0, 0, 0]
    items = side_features(folder / "toy.item", "item_id", np.array(["B", "A", "Z"], dtype=object))
    assert items.bag_size == 4 and items.bags.tolist() == [[3, 0], [1, 2], [0, 0]]  # Heat; Toy Story; unknown
    with pytest.raises(AtomicError, match="needs a user_id"):
        side_features(folder / "toy.item", "user_id", data.user_tokens)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AtomicError, match="no such file"):
        load_interactions(tmp_path / "nothing")


def test_the_split_follows_recboles_rounding_and_keeps_every_interaction(tmp_path: Path) -> None:
    assert split_counts(np.array([1, 2, 3, 9, 10, 21]), (0.8, 0.1, 0.1)).tolist() == [
        [1, 0, 0],
        [1, 0, 1],
        [1, 1, 1],
        [7, 1, 1],
        [8, 1, 1],
        [17, 2, 2],
    ]
    data = load_interactions(_dataset(tmp_path))
    split = random_split(data, seed=3)
    assert [len(p[0]) for p in split.parts] == [48, 6, 6]  # 8:1:1 of ten per user
    pairs = [set(zip(*p, strict=True)) for p in split.parts]
    assert pairs[0].isdisjoint(pairs[1]) and pairs[1].isdisjoint(pairs[2])
    assert set().union(*pairs) == set(zip(data.user, data.item, strict=True))
    for p in split.parts:  # every user in every part
        assert np.array_equal(np.unique(p[0]), np.arange(6))
    assert random_split(data, seed=3).parts[2][1].tolist() == split.parts[2][1].tolist()
    assert random_split(data, seed=4).parts[2][1].tolist() != split.parts[2][1].tolist()
    with pytest.raises(ValueError, match="sum to 1"):
        random_split(data, (0.5, 0.1, 0.1))


def test_metrics_on_a_ranking_worked_by_hand() -> None:
    # Two users, six items. User 0 saw item 0; holds out items 1 and 4. User 1 holds out item 5.
    target = sp.csr_matrix(np.array([[0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]], np.float32))
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32))
    scores = torch.tensor([[9.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]])  # user 0's top 2 after masking: 1, 2
    pop = np.array([10, 5, 5, 1, 1, 1])
    got = evaluate(lambda u: scores[torch.from_numpy(u)], target, seen, pop, k=2)
    assert got["recall"] == pytest.approx((1 / 2 + 0) / 2)
    assert got["precision"] == pytest.approx((1 / 2 + 0) / 2)
    assert got["hit"] == pytest.approx(0.5) and got["mrr"] == pytest.approx(0.5)
    assert got["ndcg"] == pytest.approx((1 / (1 + 1 / np.log2(3))) / 2)
    assert got["map"] == pytest.approx((1 / 2) / 2)
    # User 0: positives 1 (rank 5 of 5 unmasked) and 4 (rank 2) against 3 negatives: (3 + 1) / 6 = 2/3.
    # User 1: item 5 scores lowest of six: AUC 0. Weighted by positives: (2/3 · 2 + 0 · 1) / 3.
    assert got["gauc"] == pytest.approx((2 / 3 * 2) / 3)
    assert got["itemcoverage"] == pytest.approx(3 / 6)  # items 1, 2 and 0 are recommended
    assert got["averagepopularity"] == pytest.approx((5 + 5 + 10 + 5) / 4)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(lambda u: scores, target, seen, pop, metrics=["nope"])
