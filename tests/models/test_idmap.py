"""Id maps: hash and qr rows, the managed table's admissions and evictions, state, collisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanrec.models.idmap import EMPTY, HASH_STD, IdEmbedding, MapSpec, mix64

EXTREMES = np.array([2**63 - 1, 2**63 - 2, -(2**63), -(2**63) + 1, -2, 0, 1, 123456789], dtype=np.int64)


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _managed(rows: int = 4, **kw: object) -> IdEmbedding:
    # rows = 4: 4 slots (rows 0..3) and one residual row beside them (4 // 8 = 0, at least 1): row 4
    torch.manual_seed(0)
    return IdEmbedding(MapSpec("managed", rows, decay=1.0, **kw), dim=4)


def _rows(m: IdEmbedding, *values: int) -> list[int]:
    return m.rows_of(np.array(values, dtype=np.int64)).tolist()


def test_mix64_is_the_splitmix64_finalizer() -> None:
    def reference(x: int) -> int:  # Python ints, masked to 64 bits
        mask = 2**64 - 1
        z = x & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    got = mix64(EXTREMES)
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == [reference(int(x)) for x in EXTREMES]
    assert EXTREMES[0] == 2**63 - 1  # the input is not changed in place


@pytest.mark.parametrize("kind", ["hash", "qr"])
def test_stateless_rows_are_deterministic_and_in_range(kind: str) -> None:
    spec = MapSpec(kind, 1_001)
    torch.manual_seed(0)
    a = IdEmbedding(spec, dim=8)
    torch.manual_seed(1)
    b = IdEmbedding(spec, dim=8)
    rng = np.random.default_rng(0)
    ids = np.concatenate([EXTREMES, rng.integers(-(2**63), 2**63 - 1, size=5_000, dtype=np.int64)])
    rows = a.rows_of(ids)
    np.testing.assert_array_equal(rows, b.rows_of(ids))  # a function of the id, not of the module
    np.testing.assert_array_equal(rows, a.rows_of(ids.copy()))
    if kind == "hash":
        assert rows.shape == ids.shape
        assert rows.min() >= 0 and rows.max() < 1_001
        np.testing.assert_array_equal(rows, (mix64(ids) % np.uint64(1_001)).astype(np.int64))
    else:
        assert rows.shape == (*ids.shape, 2)
        assert a.q_rows == 501 and a.r_rows == 500
        assert rows[:, 0].min() >= 0 and rows[:, 0].max() < 501
        assert rows[:, 1].min() >= 0 and rows[:, 1].max() < 500
        h = (mix64(ids) % np.uint64(501 * 500)).astype(np.int64)
        np.testing.assert_array_equal(rows[:, 0] * 500 + rows[:, 1], h)
    out = a(torch.from_numpy(EXTREMES))
    assert out.shape == (len(EXTREMES), 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out != 0).any(dim=1).all()


@pytest.mark.parametrize("kind", ["hash", "qr", "managed"])
def test_padding_reads_zeros_and_sends_no_gradient(kind: str) -> None:
    torch.manual_seed(0)
    m = IdEmbedding(MapSpec(kind, 64), dim=4)
    ids = torch.tensor([[5, -1, 7], [-1, -1, 2**63 - 1]])
    out = m(ids)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out[ids == -1], torch.zeros(3, 4))
    assert (out[ids != -1] != 0).all()

    out = m(torch.full((3, 2), -1, dtype=torch.int64))
    (out * 3.0).sum().backward()
    for p in m.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p.grad))

    # with real ids beside, only the rows they read get gradient
    m.zero_grad()
    m(ids).sum().backward()
    real = m.rows_of(ids.numpy())[ids.numpy() != -1]
    if kind == "qr":
        touched = {"weight_q": set(real[:, 0].tolist()), "weight_r": set(real[:, 1].tolist())}
    else:
        touched = {"weight": set(real.tolist())}
    for name, p in m.named_parameters():
        assert set(torch.nonzero(p.grad.abs().sum(1)).reshape(-1).tolist()) == touched[name]


def test_qr_collides_far_less_than_hash_for_the_same_memory() -> None:
    rng = np.random.default_rng(7)
    ids = np.unique(rng.integers(-(2**63), 2**63 - 1, size=20_000, dtype=np.int64))
    counts = np.ones(len(ids), dtype=np.int64)
    hashed = IdEmbedding(MapSpec("hash", 2_000), dim=4).collisions(ids, counts)
    qr = IdEmbedding(MapSpec("qr", 2_000), dim=4).collisions(ids, counts)
    assert hashed["ids_seen"] == qr["ids_seen"] == len(ids)
    # 10 ids a row: almost every id shares; 1e6 (q, r) pairs for 20k ids: about 2% share
    assert hashed["collided"] > 0.99 * len(ids)
    assert qr["collided"] < 0.05 * len(ids)
    assert hashed["rows_in_use"] > 1_990  # a row is empty with chance e**-10
    assert qr["rows_in_use"] > 1_990  # quotient rows plus remainder rows, 20 ids each


def test_managed_lfu_admits_free_slots_then_evicts_the_least_frequent() -> None:
    m = _managed(admit=2.0)
    assert (m.slots, m.residual) == (4, 1) and m.weight.shape == (5, 4)
    assert (m.slot_ids == EMPTY).all() and (m.cand_ids == EMPTY).all()
    assert _rows(m, 10, 11, 12, 13) == [4, 4, 4, 4]  # all share residual row 4
    before = m.weight.detach().clone()
    assert m.observe(_ids(10, 11, 12, 13)).tolist() == [0, 1, 2, 3]  # seen once: free slots
    assert _rows(m, 10, 11, 12, 13) == [0, 1, 2, 3]
    assert torch.equal(m.weight.detach(), before)  # first sightings keep the slots' initial draws
    assert m.counters() == {"rows": 4, "rows_in_use": 5, "admissions": 4, "evictions": 0}

    assert m.observe(_ids(10, 10, 11, 12)).tolist() == []  # scores 10: 3, 11: 2, 12: 2, 13: 1
    assert m.observe(_ids(99)).tolist() == []  # 99 has 1 < admit
    assert _rows(m, 99) == [4]
    residual = m.weight[4].detach().clone()
    with torch.no_grad():
        m.weight[3] += 1.0  # what the table learnt of 13, soon evicted
    assert m.observe(_ids(99)).tolist() == [3]  # 99 has 2 >= admit and beats 13's 1
    assert _rows(m, 99, 13) == [3, 4]
    assert torch.equal(m.weight[3].detach(), residual)  # 99's row starts from the residual it read
    assert torch.equal(m.weight[:3].detach(), before[:3])  # the other slots are kept
    assert torch.equal(m.weight[4].detach(), before[4])  # and so is the residual row
    assert m.counters()["admissions"] == 5 and m.counters()["evictions"] == 1

    # 77 reaches admit but only ties the lowest slot (2): it must beat it strictly
    assert m.observe(_ids(77, 77)).tolist() == []
    assert _rows(m, 77) == [4]
    # 77 at 3 beats the lowest slots (11, 12, 99 at 2): 11 and 12 were seen least recently, 11 first
    assert m.observe(_ids(77)).tolist() == [1]
    assert _rows(m, 77, 11, 12, 99) == [1, 4, 2, 3]
    assert torch.equal(m.weight[1].detach(), residual)  # 77's row: the residual row it read
    # the evicted 11 waits among the candidates with its 2, so one more sighting (3) beats 12's 2
    with torch.no_grad():
        m.weight[2] += 1.0  # what the table learnt of 12, soon evicted
    assert m.observe(_ids(11)).tolist() == [2]
    assert _rows(m, 11, 12) == [2, 4]
    assert torch.equal(m.weight[2].detach(), residual)  # 11 read the residual row while it waited
    assert torch.equal(m.weight[0].detach(), before[0]) and torch.equal(m.weight[4].detach(), before[4])
    assert m.counters() == {"rows": 4, "rows_in_use": 5, "admissions": 7, "evictions": 3}


def test_managed_lfu_pairs_best_candidates_with_worst_victims() -> None:
    m = _managed(admit=2.0)
    m.observe(_ids(1, 2, 3, 4))
    m.observe(_ids(1, 1, 1, 2, 2))  # 1: 4, 2: 3, 3: 1, 4: 1
    before = m.weight.detach().clone()
    # 50 (3) takes the worst victim 3 (row 2), 60 (2) the next, 4 (row 3)
    assert m.observe(_ids(50, 50, 50, 60, 60)).tolist() == [2, 3]
    assert _rows(m, 50, 60, 3, 4) == [2, 3, 4, 4]
    assert torch.equal(m.weight[2:4].detach(), before[4].expand(2, -1))  # both read residual row 4
    assert torch.equal(m.weight[:2].detach(), before[:2])
    # 70 (4) beats 60 (2); 80 (2) does not beat the next victim, 2 (3)
    assert m.observe(_ids(70, 70, 70, 70, 80, 80)).tolist() == [3]
    assert _rows(m, 70, 80, 60, 1, 2, 50) == [3, 4, 4, 0, 1, 2]
    assert m.counters()["evictions"] == 3


def test_managed_scores_decay() -> None:
    torch.manual_seed(0)
    m = IdEmbedding(MapSpec("managed", 4, admit=2.0, decay=0.5), dim=4)  # 4 slots
    m.observe(_ids(1, 2, 3, 4))
    # 9 sighted three times in a row: 1, 1.5, 1.75 never reaches admit 2
    for _ in range(3):
        assert m.observe(_ids(9)).tolist() == []
    assert m.observe(_ids(9, 9)).tolist() == [0]  # 0.875 + 2 >= 2 beats the slots' 1/16
    np.testing.assert_allclose(m.slot_score.numpy(), [2.875, 1 / 16, 1 / 16, 1 / 16])


def test_managed_candidate_buffer_keeps_the_highest_scores() -> None:
    m = _managed(admit=10.0)
    m.observe(_ids(1, 2, 3, 4))
    m.observe(_ids(20, 20, 20, 21, 21, 22, 23, 24, 25))  # 4 candidate places for 6 newcomers
    kept = sorted(m.cand_ids.tolist())
    assert kept == [20, 21, 22, 23]  # 3 and 2, then ties at 1 by lowest id
    assert dict(zip(m.cand_ids.tolist(), m.cand_score.tolist(), strict=True)) == {
        20: 3.0,
        21: 2.0,
        22: 1.0,
        23: 1.0,
    }


def test_reset_row_is_the_residual_row_each_id_read() -> None:
    torch.manual_seed(0)
    m = IdEmbedding(MapSpec("managed", 40, admit=2.0, decay=1.0), dim=6)  # 40 slots, 5 residual rows
    assert (m.slots, m.residual) == (40, 5) and m.weight.shape == (45, 6)
    rng = np.random.default_rng(3)
    first = rng.integers(-(2**63), 2**63 - 1, size=40, dtype=np.int64)
    assert (m.rows_of(first) >= 40).all()
    before = m.weight.detach().clone()
    # first sightings in free slots keep the slots' initial draws
    assert m.observe(torch.from_numpy(first)).tolist() == list(range(40))
    assert sorted(m.rows_of(first).tolist()) == list(range(40))
    assert torch.equal(m.weight.detach(), before)

    # 20 newcomers seen twice beat 20 of the slots (1 each): each row handed over takes the value of
    # the residual row its new id read
    newcomers = rng.integers(-(2**63), 2**63 - 1, size=20, dtype=np.int64)
    residual_rows = m.rows_of(newcomers)
    assert (residual_rows >= 40).all() and len(set(residual_rows.tolist())) > 1
    with torch.no_grad():
        m.weight[:40] += 1.0  # what the table learnt of the ids in it
    before = m.weight.detach().clone()
    reset = m.observe(torch.from_numpy(np.repeat(newcomers, 2)))
    assert len(reset) == 20
    rows = m.rows_of(newcomers)
    assert sorted(rows.tolist()) == reset.tolist() and (rows < 40).all()
    assert torch.equal(m.weight[torch.from_numpy(rows)].detach(), before[torch.from_numpy(residual_rows)])
    kept = np.setdiff1d(np.arange(45), rows)
    assert torch.equal(m.weight[torch.from_numpy(kept)].detach(), before[torch.from_numpy(kept)])
    assert m.counters() == {"rows": 40, "rows_in_use": 45, "admissions": 60, "evictions": 20}


def test_never_admitted_id_reads_its_residual_row() -> None:
    torch.manual_seed(0)
    m = IdEmbedding(MapSpec("managed", 40, admit=100.0), dim=4)
    m.observe(torch.arange(40))  # every slot taken, and admit is out of reach
    outsiders = np.array([10**12, -(10**12), 2**63 - 1, -(2**63)], dtype=np.int64)
    assert m.observe(torch.from_numpy(np.repeat(outsiders, 5))).tolist() == []
    expected = 40 + (mix64(outsiders) % np.uint64(5)).astype(np.int64)
    np.testing.assert_array_equal(m.rows_of(outsiders), expected)
    out = m(torch.from_numpy(outsiders))
    assert torch.equal(out, m.weight[torch.from_numpy(expected)])
    assert m.counters() == {"rows": 40, "rows_in_use": 45, "admissions": 40, "evictions": 0}


def test_reset_optimizer_rows_zeroes_adamw_moments_of_exactly_those_rows() -> None:
    m = _managed(admit=2.0)
    m.observe(_ids(1, 2, 3, 4))
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    m(_ids(1, 2, 3, 4, 50)).pow(2).sum().backward()  # every slot and the residual row get gradient
    opt.step()
    state = opt.state[m.weight]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (5, 4)
    assert (state["exp_avg"].abs().sum(1) > 0).all() and (state["exp_avg_sq"].sum(1) > 0).all()
    step = state["step"].clone()

    reset = m.observe(_ids(50, 50))  # 50 (2) beats the slots' 1; ties go to the lowest row, 1's
    assert reset.tolist() == [0]
    assert torch.equal(m.weight[0].detach(), m.weight[4].detach())  # 50 read residual row 4
    m.reset_optimizer_rows(opt, reset)
    assert torch.equal(state["exp_avg"][0], torch.zeros(4))
    assert torch.equal(state["exp_avg_sq"][0], torch.zeros(4))
    assert (state["exp_avg"][1:].abs().sum(1) > 0).all() and (state["exp_avg_sq"][1:].sum(1) > 0).all()
    assert torch.equal(state["step"], step)
    opt.zero_grad()
    m(_ids(50)).sum().backward()
    opt.step()  # the optimizer still runs on the reset state
    assert (state["exp_avg"][0] != 0).all()


def test_managed_lru_evicts_the_least_recently_seen_never_one_seen_in_the_call() -> None:
    m = _managed(evict="lru", admit=2.0)
    m.observe(_ids(1, 2, 3, 4))  # rows 0..3, all seen at step 1
    m.observe(_ids(3))
    m.observe(_ids(2))
    m.observe(_ids(1))  # last seen: 1 at 4, 2 at 3, 3 at 2, 4 at 1
    # 4 is the least recently seen but is seen now: the victim is 3
    assert m.observe(_ids(4, 7, 7)).tolist() == [2]
    assert _rows(m, 7, 3, 4) == [2, 4, 3]
    # only 7 (row 2) is unseen in this call: 9 (best, 3) takes it, 8 (2) waits
    assert m.observe(_ids(8, 8, 9, 9, 9, 1, 2, 4)).tolist() == [2]
    assert _rows(m, 9, 8, 7) == [2, 4, 4]
    # 10 seen once is below admit, though slots are unseen
    assert m.observe(_ids(10)).tolist() == []
    # 1, 2 and 9 were last seen at step 6, all with score 3: the tie goes to the lowest row, 1's
    assert m.observe(_ids(11, 11, 4)).tolist() == [0]
    assert _rows(m, 11, 1) == [0, 4]
    assert m.counters() == {"rows": 4, "rows_in_use": 5, "admissions": 7, "evictions": 3}


@pytest.mark.parametrize("kind", ["hash", "qr", "managed"])
def test_state_dict_restores_the_map_exactly(kind: str) -> None:
    spec = MapSpec(kind, 40, admit=2.0, decay=0.9)
    torch.manual_seed(0)
    m = IdEmbedding(spec, dim=4)
    rng = np.random.default_rng(5)
    vocab = rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64)
    batches = [torch.from_numpy(vocab[rng.zipf(1.3, size=64) % 200]) for _ in range(8)]
    for b in batches[:6]:
        m.observe(b)
    if kind == "managed":
        assert m.counters()["evictions"] > 0  # the state is not trivial

    torch.manual_seed(1)
    fresh = IdEmbedding(spec, dim=4)
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(fresh.rows_of(vocab), m.rows_of(vocab))
    assert torch.equal(fresh(torch.from_numpy(vocab)), m(torch.from_numpy(vocab)))
    assert fresh.counters() == m.counters()
    assert fresh.memory_bytes == m.memory_bytes
    for b in batches[6:]:  # the next observes behave the same
        assert torch.equal(fresh.observe(b), m.observe(b))
    for (name, a), b in zip(m.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_memory_bytes_counts_parameters_and_state() -> None:
    assert IdEmbedding(MapSpec("hash", 100), dim=8).memory_bytes == 100 * 8 * 4
    assert IdEmbedding(MapSpec("qr", 100), dim=8).memory_bytes == 100 * 8 * 4
    # 100 slots and 12 residual rows beside them; per slot: ids, score, last-seen, candidate ids and
    # scores, sorted ids and rows, 8 bytes each; then step, admissions and evictions
    managed = IdEmbedding(MapSpec("managed", 100), dim=8)
    assert managed.weight.shape == (112, 8)
    assert managed.memory_bytes == 112 * 8 * 4 + 100 * 7 * 8 + 3 * 8


def test_observe_is_for_training_only_and_a_no_op_for_stateless_maps() -> None:
    m = _managed()
    m.eval()
    with pytest.raises(RuntimeError, match="training mode"):
        m.observe(_ids(1))
    assert _rows(m, 1) == [4]  # serving lookups do not admit
    h = IdEmbedding(MapSpec("hash", 10), dim=4)
    out = h.observe(_ids(1, 2))
    assert out.dtype == torch.int64 and out.numel() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "managed", "rows": 0}, "a managed map needs rows >= 1, got 0"),
        ({"kind": "managed", "rows": -3}, "a managed map needs rows >= 1, got -3"),
        ({"kind": "hash", "rows": 0}, "a hash map needs rows >= 1, got 0"),
        ({"kind": "qr", "rows": 1}, "a qr map needs rows >= 2, got 1"),
        ({"kind": "bloom", "rows": 10}, "unknown map kind 'bloom'"),
        ({"kind": "managed", "rows": 10, "evict": "fifo"}, "unknown eviction 'fifo'"),
        ({"kind": "managed", "rows": 10, "decay": 0.0}, r"decay must be in \(0, 1\], got 0.0"),
        ({"kind": "managed", "rows": 10, "decay": 1.5}, r"decay must be in \(0, 1\], got 1.5"),
    ],
)
def test_mapspec_refuses_with_a_message_naming_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MapSpec(**kwargs)


def test_collisions_head_and_rest_on_a_managed_map() -> None:
    m = _managed()
    m.observe(_ids(1, 2, 3, 4))
    ids = np.array([5, 1, 6, 2, 3, 4])
    counts = np.array([2, 100, 1, 90, 80, 70])
    # head: the 3 most frequent (1, 2, 3) hold slots; rest: 4 holds one, 5 and 6 share residual row 4
    got = m.collisions(ids, counts, head=0.5)
    assert got == {
        "ids_seen": 6,
        "collided": 2,
        "collision_rate_head": 0.0,
        "collision_rate_rest": pytest.approx(2 / 3),
        "rows_in_use": 5,
    }
    # alone in the residual row, 5 collides with nothing
    assert m.collisions(ids[:2], counts[:2])["collided"] == 0
    # the head has at least one id: the most frequent, 5 here, which shares row 4 with 6
    got = m.collisions(np.array([5, 6, 1]), np.array([9, 1, 3]), head=0.0)
    assert got["collision_rate_head"] == 1.0 and got["collision_rate_rest"] == 0.5


def test_collisions_none_among_admitted_ids() -> None:
    m = IdEmbedding(MapSpec("managed", 40), dim=4)
    ids = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, size=30, dtype=np.int64)
    m.observe(torch.from_numpy(ids))
    got = m.collisions(ids, np.arange(30, 0, -1), head=0.1)
    assert got["collided"] == 0 and got["rows_in_use"] == 30
    assert got["collision_rate_head"] == 0.0 and got["collision_rate_rest"] == 0.0
    # the same ids in a hash map of the same memory do collide (30 ids into 40 rows)
    assert IdEmbedding(MapSpec("hash", 40), dim=4).collisions(ids, np.ones(30))["collided"] > 0


def test_managed_rows_equal_to_distinct_ids_is_collisionless() -> None:
    m = IdEmbedding(MapSpec("managed", 50), dim=4)  # 50 slots, 6 residual rows beside
    ids = np.random.default_rng(2).integers(-(2**63), 2**63 - 1, size=50, dtype=np.int64)
    assert len(np.unique(ids)) == 50
    for part in np.array_split(ids, 3):  # over several batches, each id seen once
        m.observe(torch.from_numpy(part))
    assert sorted(m.rows_of(ids).tolist()) == list(range(50))  # each id has a slot of its own
    assert m.counters() == {"rows": 50, "rows_in_use": 56, "admissions": 50, "evictions": 0}
    got = m.collisions(ids, np.ones(50))
    assert got["ids_seen"] == 50 and got["collided"] == 0 and got["rows_in_use"] == 50
    assert got["collision_rate_head"] == 0.0 and got["collision_rate_rest"] == 0.0


def test_init_std_is_small_and_qr_parts_share_it() -> None:
    # Small, as TorchRec's tables start: with nn.Embedding's 1.0, Adam's steps of about lr move a
    # row by a few percent in an epoch, so ids learn next to nothing.
    assert HASH_STD == 0.05
    torch.manual_seed(0)
    for kind in ("hash", "managed"):
        w = IdEmbedding(MapSpec(kind, 4_000), dim=64).weight.detach()
        assert abs(w.std().item() - HASH_STD) < 0.001 and abs(w.mean().item()) < 0.001
    qr = IdEmbedding(MapSpec("qr", 8_000), dim=64)
    for w in (qr.weight_q.detach(), qr.weight_r.detach()):
        assert abs(w.std().item() - HASH_STD**0.5) < 0.005
    ids = torch.from_numpy(np.random.default_rng(4).integers(0, 2**62, size=20_000, dtype=np.int64))
    assert abs(qr(ids).std().item() - HASH_STD) < 0.0015  # the product has the others' std


def test_collisions_refuses_repeated_ids() -> None:
    with pytest.raises(ValueError, match="distinct"):
        IdEmbedding(MapSpec("hash", 10), dim=4).collisions(np.array([3, 3]), np.array([1, 1]))
