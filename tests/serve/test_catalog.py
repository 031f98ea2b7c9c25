"""``/v1/rank`` on a user's own catalog: features loaded from Parquet, retrieval or given candidates,
a trained late ranker, a pruned FeatureSet served beside its parent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from tests.conftest import Shop

from leanrec.cli import main
from leanrec.featurefile import load_featureset, parse_featureset
from leanrec.ids import string_ids
from leanrec.retrieval.index import RetrievalIndex, save_index
from leanrec.schema import FeatureSet, Owner
from leanrec.serve.app import create_app
from leanrec.serve.config import ConfigError, ServeConfig
from leanrec.stores.loading import open_catalog_store

N_USERS, N_ITEMS = 60, 120


def _column(values: np.ndarray) -> pa.Array:
    """A column of numbers, or a fixed-size list column for ``(rows, size)`` values."""
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def write_catalog(folder: Path, fs: FeatureSet, seed: int = 0, extra: bool = True) -> dict[str, np.ndarray]:
    """users.parquet and items.parquet of every feature of ``fs`` (role ids left to the id column).

    Returns:
        The values written, by feature name.

    """
    rng = np.random.default_rng(seed)
    written: dict[str, np.ndarray] = {}
    for owner, n, name in ((Owner.USER, N_USERS, "users"), (Owner.ITEM, N_ITEMS, "items")):
        cols = {f"{owner.value}_id": pa.array(np.arange(n))}
        for f in fs.of(owner):
            if f.role in ("user_id", "item_id"):
                continue
            if f.is_float:
                v = rng.normal(size=(n, f.size)).astype(np.float32)
            else:
                v = rng.integers(0, f.rows, (n, f.size)).astype(np.int32)
            v = v[:, 0] if f.size == 1 else v
            written[f.name] = v
            cols[f.name] = _column(v)
        if extra:
            cols["not_a_feature"] = pa.array(np.zeros(n))  # columns the FeatureSet does not name are not read
        pq.write_table(pa.table(cols), folder / f"{name}.parquet")
    return written


def load(featureset: Path, url: str, users: Path | None = None, items: Path | None = None) -> int:
    """``leanrec features load`` of the given files; its exit code."""
    files = [*(["--users", str(users)] if users else []), *(["--items", str(items)] if items else [])]
    return main(["features", "load", "--featureset", str(featureset), *files, "--store-url", url])


@pytest.fixture
def catalog(tmp_path: Path, shop: Shop, redis_url: str) -> tuple[Path, FeatureSet, dict[str, np.ndarray]]:
    """A shop's FeatureSet file, its catalog loaded into the dedicated Redis, and a retrieval index."""
    (tmp_path / "fs.toml").write_text(shop.toml())
    fs = load_featureset(tmp_path / "fs.toml")
    written = write_catalog(tmp_path, fs)
    assert load(tmp_path / "fs.toml", redis_url, tmp_path / "users.parquet", tmp_path / "items.parquet") == 0
    rng = np.random.default_rng(1)
    seen = (np.array([0, 0, 0]), np.array([5, 6, 7]))
    save_index(
        tmp_path / "index.npz", rng.normal(size=(N_USERS, 4)), rng.normal(size=(N_ITEMS, 4)), seen=seen
    )
    return tmp_path, fs, written


def _client(folder: Path, redis_url: str, **settings: object) -> TestClient:
    config = ServeConfig(featureset=str(folder / "fs.toml"), features_url=redis_url, **settings)
    return TestClient(create_app(config))


def test_features_load_writes_every_entity_as_the_featureset_lays_it_out(catalog, redis_url: str) -> None:
    _folder, fs, written = catalog
    store = open_catalog_store(redis_url, fs)
    users = np.array([0, 17, N_USERS - 1])
    block = store.get_many(Owner.USER, users)
    slots = fs.owner_slots(Owner.USER)
    np.testing.assert_array_equal(
        block.floats[:, slots["taste"].offset : slots["taste"].stop], written["taste"][users]
    )
    np.testing.assert_array_equal(block.ints[:, slots["buyer"].offset], users)  # the role id is the row's id
    items = store.get_feature(Owner.ITEM, "price", np.arange(N_ITEMS))
    np.testing.assert_array_equal(items[:, 0], written["price"])


def test_features_load_refuses_a_file_without_a_features_column(
    tmp_path: Path, shop: Shop, redis_url: str, capsys
) -> None:
    (tmp_path / "fs.toml").write_text(shop.toml())
    pq.write_table(pa.table({"user_id": [0, 1], "budget": [1.0, 2.0]}), tmp_path / "users.parquet")
    code = load(tmp_path / "fs.toml", redis_url, users=tmp_path / "users.parquet")
    err = capsys.readouterr().err
    assert code == 2 and "recent" in err and "users.parquet" in err and "Traceback" not in err


def test_rank_retrieves_scores_and_masks_what_retrieval_was_trained_on(catalog, redis_url: str) -> None:
    folder, _fs, _ = catalog
    index = RetrievalIndex.load(folder / "index.npz")
    with _client(folder, redis_url, retrieval=str(folder / "index.npz"), n_retrieve=50, n_rank=20) as client:
        out = client.post("/v1/rank", json={"user_id": 0, "context": {"weekday": 3}})
        assert out.status_code == 200, out.text
        items = out.json()["items"]
        want, _ = index.top(np.array([0]), 20)
        assert items == want[0].tolist()  # without a model, retrieval's order
        assert not {5, 6, 7} & set(items)
        state = client.app.state.leanrec
        assert state.logger.stats.entries_written > 0


def test_rank_takes_the_callers_candidates_and_checks_the_request(catalog, redis_url: str) -> None:
    folder, _, _ = catalog
    with _client(folder, redis_url, n_retrieve=50, n_rank=20) as client:
        ok = client.post("/v1/rank", json={"user_id": 4, "context": {"weekday": 1}, "candidates": [9, 3, 11]})
        assert ok.status_code == 200 and ok.json()["items"] == [9, 3, 11]
        cases = {
            "weekday": {"user_id": 4, "candidates": [1, 2]},  # context missing
            "candidates": {"user_id": 4, "context": {"weekday": 1}},  # no retrieval, none given
        }
        for feature, body in cases.items():
            r = client.post("/v1/rank", json=body)
            assert r.status_code == 422 and r.json()["feature"] == feature, r.text
        refusals = {
            "[1, 1]": "candidates: an item is listed twice",
            "[]": "candidates: expected a non-empty list of item ids",
            "[3, -1]": "candidates: -1 is the padding id, not an item",
            '["sku-3"]': 'string ids need an item_id feature declared with dtype = "string"',
            f"[{2**63}, {2**63 + 1}]": "candidates: ids are int64, got 9223372036854775809",
        }
        for bad, message in refusals.items():
            r = client.post(
                "/v1/rank",
                content=f'{{"user_id": 4, "context": {{"weekday": 1}}, "candidates": {bad}}}',
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 422 and r.json()["feature"] == "candidates", (bad, r.text)
            assert message in r.json()["error"], (bad, r.text)
        # Any int64 is an id; one the catalog's store does not hold is named.
        for unknown in (N_ITEMS + 3, 2**63 - 1, -(2**63)):
            body = {"user_id": 4, "context": {"weekday": 1}, "candidates": [3, unknown]}
            r = client.post("/v1/rank", json=body)
            assert r.status_code == 422, r.text
            assert f"no item features for 1 id(s): [{unknown}]" in r.json()["error"], r.text
        r = client.post(
            "/v1/rank", json={"user_id": 4, "context": {"weekday": 1}, "candidates": list(range(51))}
        )
        assert r.status_code == 413
        r = client.post(
            "/v1/rank", json={"user_id": N_USERS + 5, "context": {"weekday": 1}, "candidates": [1]}
        )
        assert r.status_code == 422 and str(N_USERS + 5) in r.json()["error"]


def test_a_catalog_of_string_ids_ranks_string_users_and_candidates(
    tmp_path: Path, shop: Shop, redis_url: str
) -> None:
    """Users, items and histories named by strings: loaded, ranked and logged as their 64-bit hashes."""
    text = shop.toml()
    for role in ("user_id", "item_id", "history"):
        text = text.replace(f'role = "{role}"', f'role = "{role}"\ndtype = "string"')
    (tmp_path / "fs.toml").write_text(text)
    fs = load_featureset(tmp_path / "fs.toml")
    assert fs["buyer"].string_ids and fs["product"].string_ids and fs["recent"].string_ids
    rng = np.random.default_rng(3)
    skus = np.array([f"sku-{k:04d}" for k in range(N_ITEMS)])
    names = np.array([f"shopper-{k}" for k in range(N_USERS)])
    recent = skus[rng.integers(0, N_ITEMS, (N_USERS, 6))]
    written = write_catalog(tmp_path, fs, extra=False)
    for name, ids, extra in (("users", names, {"recent": recent}), ("items", skus, {})):
        table = pq.read_table(tmp_path / f"{name}.parquet")
        table = table.set_column(0, table.schema.field(0).name, pa.array(ids))
        for col, values in extra.items():
            table = table.set_column(table.column_names.index(col), col, _column(values))
        pq.write_table(table, tmp_path / f"{name}.parquet")
    assert load(tmp_path / "fs.toml", redis_url, tmp_path / "users.parquet", tmp_path / "items.parquet") == 0
    store = open_catalog_store(redis_url, fs)
    block = store.get_many(Owner.USER, string_ids(names[[4]]))
    slots = fs.owner_slots(Owner.USER)
    assert block.ints[0, slots["buyer"].offset] == string_ids(names[[4]])[0]  # the id is the hash
    np.testing.assert_array_equal(
        block.ints[0, slots["recent"].offset : slots["recent"].stop], string_ids(recent[4])
    )
    assert written["budget"][4] == block.floats[0, slots["budget"].offset]
    with _client(tmp_path, redis_url, n_retrieve=50, n_rank=20) as client:
        body = {"user_id": "shopper-4", "context": {"weekday": 1}, "candidates": ["sku-0009", "sku-0003"]}
        r = client.post("/v1/rank", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["items"] == string_ids(["sku-0009", "sku-0003"]).tolist()
        ref = client.app.state.leanrec.signer.check(r.json()["token"], r.json()["request_id"], 0)
        assert ref.user_id == string_ids(["shopper-4"])[0]  # logged under the user's hash
        r = client.post("/v1/rank", json={**body, "candidates": ["sku-0009", "nope"]})
        assert r.status_code == 422 and str(string_ids(["nope"])[0]) in r.json()["error"], r.text
        r = client.post("/v1/rank", json={**body, "user_id": "nobody"})
        assert r.status_code == 422 and str(string_ids(["nobody"])[0]) in r.json()["error"], r.text


def test_a_world_service_refuses_candidates_rather_than_ignore_them() -> None:
    with TestClient(create_app(ServeConfig(n_users=200, n_items=2_000))) as client:
        r = client.post("/v1/rank", json={"user_id": 1, "candidates": [1, 2, 3]})
        assert r.status_code == 422 and "catalog" in r.json()["error"]


def test_catalog_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="featureset"):
        ServeConfig(features_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match="features_url"):
        ServeConfig(featureset="fs.toml", model="m.pt")
    with pytest.raises(ConfigError, match="n_rank"):
        ServeConfig(n_retrieve=10, n_rank=20)


def test_a_trained_ranker_orders_the_list_and_a_pruned_one_serves_its_own_version(
    catalog, tmp_path: Path, shop: Shop, redis_url: str
) -> None:
    """The checkpoint's scores order the list; a model of the pruned version serves on either version."""
    pytest.importorskip("torch")
    from leanrec.models.scorer import ModelScorer
    from leanrec.train.trainer import load_checkpoint

    folder, fs, _ = catalog
    pruned_text = shop.toml(drop=("recent_aisle", "badges"), version=2)
    pruned = parse_featureset(pruned_text)
    (folder / "pruned.toml").write_text(pruned_text)
    for version, wh_fs in (("v1", fs), ("v2", pruned)):
        shop.write(tmp_path / f"wh-{version}", wh_fs, requests=300)
        args = [
            "train",
            "--warehouse",
            str(tmp_path / f"wh-{version}"),
            "--out",
            str(tmp_path / f"{version}.pt"),
        ]
        assert main([*args, "--epochs", "1"]) == 0
    candidates = list(range(0, N_ITEMS, 3))
    body = {"user_id": 2, "context": {"weekday": 5}, "candidates": candidates}
    with _client(folder, redis_url, model=str(tmp_path / "v1.pt"), n_rank=10) as client:
        items = client.post("/v1/rank", json=body).json()["items"]
    funnel = client.app.state.leanrec.funnel
    request = funnel.store.get_many(Owner.USER, np.array([2]))
    # The same scores computed outside the service.
    model = load_checkpoint(tmp_path / "v1.pt")
    ctx = np.array([[5]], np.int32)
    from leanrec.schema import FeatureBlock

    req = FeatureBlock.hstack([request, FeatureBlock(np.zeros((1, 0), np.float32), ctx)])
    scores = ModelScorer(model).score(
        req, funnel.store.get_many(Owner.ITEM, np.array(candidates)), len(candidates)
    )
    assert items == np.array(candidates)[np.argsort(-scores[0], kind="stable")[:10]].tolist()
    # The pruned model on the parent's served features (its retired columns cut), and on its own version.
    with _client(folder, redis_url, model=str(tmp_path / "v2.pt"), n_rank=10) as client:
        assert client.post("/v1/rank", json=body).status_code == 200
    assert load(folder / "pruned.toml", redis_url, folder / "users.parquet", folder / "items.parquet") == 0
    config = ServeConfig(
        featureset=str(folder / "pruned.toml"), features_url=redis_url, model=str(tmp_path / "v2.pt")
    )
    with TestClient(create_app(config)) as client:
        out = client.post("/v1/rank", json=body)
        assert out.status_code == 200 and len(out.json()["items"]) == len(candidates)
        assert client.get("/healthz").json()["catalog"]["version"] == 2
    # A model of the parent cannot serve the pruned version: it needs the retired features.
    with pytest.raises(Exception, match="cannot read"):
        create_app(
            ServeConfig(
                featureset=str(folder / "pruned.toml"), features_url=redis_url, model=str(tmp_path / "v1.pt")
            )
        )


def test_replay_drives_a_catalog_service_and_refuses_another_featureset(
    catalog, redis_url: str, shop: Shop
) -> None:
    """Sessions replayed through /v1/rank, paginate and events, fast scrolls too; every event accepted."""
    import httpx

    from leanrec.sim.client import TargetError
    from leanrec.sim.replay import replay

    folder, _, _ = catalog
    rng = np.random.default_rng(5)
    sessions = pa.table(
        {
            "user_id": rng.integers(1, N_USERS, 40),
            "items": pa.array([rng.choice(N_ITEMS, 8, replace=False).tolist() for _ in range(40)]),
            "weekday": rng.integers(0, 7, 40),
        }
    )
    pq.write_table(sessions, folder / "sessions.parquet")
    config = ServeConfig(
        featureset=str(folder / "fs.toml"),
        features_url=redis_url,
        retrieval=str(folder / "index.npz"),
        n_retrieve=60,
        n_rank=40,
        store_url=redis_url.replace("/0", "/1"),
        bus_url=redis_url.replace("/0", "/1"),
    )
    app = create_app(config)

    def run(featureset: Path) -> object:
        return replay(
            "http://127.0.0.1",
            folder / "sessions.parquet",
            str(featureset),
            concurrency=3,
            fast_scroll_share=0.5,
            transport=httpx.ASGITransport(app=app),
        )

    report = run(folder / "fs.toml")
    assert report.sessions == 40 and report.failed == 0
    assert report.signals_lost > 0 and report.events_accepted == report.events_sent
    state = app.state.leanrec
    state.lane.drain()
    assert state.logger.stats.pages_on_touch > 0  # fast scrolls: pages logged because events touched them
    assert state.ranked == 40
    (folder / "other.toml").write_text(shop.toml(drop=("badges",), version=2))
    with pytest.raises(TargetError, match="not"):
        run(folder / "other.toml")
