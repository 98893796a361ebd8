import numpy as np
import polars as pl
import pytest

from equipipe.data.splits import assign_splits, make_split, make_subset, subset_size
from equipipe.store import Store, StoreWriter, TooManyBadRecords


def _write(path, n=10, bad=0, max_bad=0.5):
    rng = np.random.default_rng(0)
    with StoreWriter(
        path, per_atom=["pos", "z"], per_example=["energy"], max_bad_fraction=max_bad
    ) as w:
        for i in range(n):
            k = 3 + i % 4
            w.add(f"m{i // 2}/{i}", f"m{i // 2}", {"pos": rng.normal(size=(k, 3)).astype(np.float32),
                  "z": np.full(k, 6, np.int16), "energy": np.float64(i)}, source="test")  # fmt: skip
        for j in range(bad):
            w.quarantine(f"bad{j}", "non-finite energy", source="test")
    return Store(path)


def test_store_roundtrip_memmap_and_index(tmp_path):
    s = _write(tmp_path / "store", bad=2)
    assert len(s) == 10
    assert isinstance(s.atom["pos"], np.memmap)
    ex = s.get(3)
    assert ex["pos"].shape == (6, 3) and ex["z"].dtype == np.int16 and float(ex["energy"]) == 3.0
    assert s.index.columns[:3] == ["id", "key", "n_atoms"] and s.index["source"][0] == "test"
    assert s.quarantine.height == 2 and s.quarantine["reason"][0] == "non-finite energy"
    got = s.load(["m1/3", "m0/0"])
    assert float(got[0]["energy"]) == 3.0 and float(got[1]["energy"]) == 0.0
    with pytest.raises(KeyError, match="nope"):
        s.rows(["nope"])
    assert not (tmp_path / "store.partial").exists()


def test_store_fails_clearly_when_too_many_bad(tmp_path):
    with pytest.raises(TooManyBadRecords, match="max_bad_fraction"):
        _write(tmp_path / "store", n=2, bad=3, max_bad=0.5)
    assert not (tmp_path / "store").exists()


def test_store_writer_cleans_up_after_itself(tmp_path):
    """The writer, not each dataset, removes a failed store's partial folder; only a store
    refused for too many bad records keeps it (its quarantine table is named in the error)."""
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(tmp_path / "store", per_atom=["z"]) as w:
            w.add("a", "a", {"z": np.zeros(3)})
            raise KeyboardInterrupt  # a corrupt raw file, a killed job, ...
    assert not (tmp_path / "store.partial").exists() and not (tmp_path / "store").exists()
    with pytest.raises(TooManyBadRecords, match="store.partial/quarantine.parquet"):
        _write(tmp_path / "store", n=1, bad=3, max_bad=0.5)
    kept = pl.read_parquet(tmp_path / "store.partial" / "quarantine.parquet")
    assert kept.height == 3 and not (tmp_path / "store").exists()


def test_store_rejects_inconsistent_examples(tmp_path):
    w = StoreWriter(tmp_path / "s", per_atom=["pos", "z"])
    with pytest.raises(ValueError, match="rows"):
        w.add("a", "a", {"pos": np.zeros((3, 3)), "z": np.zeros(2)})
    w.add("b", "b", {"pos": np.zeros((3, 3)), "z": np.zeros(3)})
    with pytest.raises(ValueError, match="duplicate"):
        w.add("b", "b", {"pos": np.zeros((3, 3)), "z": np.zeros(3)})


def test_split_by_key_no_leakage_and_deterministic():
    keys = [f"mol{i % 37}" for i in range(400)]
    index = pl.DataFrame({"id": [f"x{i}" for i in range(400)], "key": keys, "n_atoms": [5] * 400})
    a = make_split(index, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    b = make_split(index.reverse(), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert a.sort("id").equals(b.sort("id"))
    per_key = a.group_by("key").agg(pl.col("split").n_unique())
    assert per_key["split"].max() == 1  # no molecule in two splits
    counts = dict(a.group_by("split").agg(pl.col("key").n_unique()).iter_rows())
    assert counts == {"train": 30, "val": 4, "test": 3} or sum(counts.values()) == 37
    assert set(counts) == {"train", "val", "test"}
    c = make_split(index, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1)
    assert not c.sort("id")["split"].equals(a.sort("id")["split"])


def test_every_split_gets_a_key_when_possible():
    m = assign_splits(["a", "b", "c"], {"train": 0.98, "val": 0.019, "test": 0.001}, 0)
    assert sorted(m.values()) == ["test", "train", "val"]


def test_subsets_are_nested_and_sized():
    index = pl.DataFrame(
        {
            "id": [f"x{i}" for i in range(500)],
            "key": [f"k{i}" for i in range(500)],
            "n_atoms": [5] * 500,
        }
    )
    split = make_split(index, {"train": 0.9, "val": 0.1}, seed=0)
    s10 = set(make_subset(split, 10, "conformers")["id"])
    s100 = set(make_subset(split, 100, "conformers")["id"])
    half = set(make_subset(split, 0.5, "fraction")["id"])
    full = set(make_subset(split, 1.0, "fraction")["id"])
    assert len(s10) == 10 and len(s100) == 100 and s10 < s100 < half < full
    assert len(make_subset(split, 0.0001, "fraction")) == 1  # at least one example
    assert full == set(split.filter(pl.col("split") == "train")["id"])
    with pytest.raises(ValueError, match="unit"):
        subset_size(5, "atoms", 10)
    with pytest.raises(ValueError):
        subset_size(0, "conformers", 10)


def test_molecule_counts_are_distinct_keys_nested_and_never_clamped():
    # 40 molecules x 5 conformers
    index = pl.DataFrame(
        {
            "id": [f"x{i}" for i in range(200)],
            "key": [f"k{i // 5}" for i in range(200)],
            "n_atoms": [5] * 200,
        }
    )
    split = make_split(index, {"train": 0.8, "val": 0.2}, seed=0)
    train = split.filter(pl.col("split") == "train")
    n_keys = train["key"].n_unique()
    by_id = dict(split.select("id", "key").iter_rows())
    m3, m10 = (set(make_subset(split, n, "molecules")["id"]) for n in (3, 10))
    assert len({by_id[i] for i in m3}) == 3 and len({by_id[i] for i in m10}) == 10
    assert len(m3) == 15 and len(m10) == 50  # every conformer of each chosen molecule
    assert m3 < m10 < set(make_subset(split, n_keys, "molecules")["id"]) == set(train["id"])
    for unit in ("conformers", "chains", "examples"):
        assert len(make_subset(split, 10, unit)) == 10  # rows
    with pytest.raises(
        ValueError, match=rf"subset 'big'.*1000 conformers.*only {train.height} conformers"
    ):
        make_subset(split, 1000, "conformers", "big")
    with pytest.raises(ValueError, match=rf"subset 'm99'.*99 molecules.*only {n_keys} molecules"):
        make_subset(split, 99, "molecules", "m99")


def test_predefined_split_keeps_release_split():
    index = pl.DataFrame({"id": [f"x{i}" for i in range(20)], "key": [f"k{i % 5}" for i in range(20)],
                          "n_atoms": [3] * 20, "source": ["maceoff23/train"] * 15 + ["maceoff23/test"] * 5})  # fmt: skip
    split = make_split(
        index,
        {"train": 0.9, "val": 0.1},
        0,
        {"column": "source", "values": {"maceoff23/train": "train", "maceoff23/test": "val"}},
    )
    got = dict(zip(split["id"], split["split"]))
    assert all(got[f"x{i}"] == "train" for i in range(15)) and all(
        got[f"x{i}"] == "val" for i in range(15, 20)
    )
    with pytest.raises(ValueError, match="not an index column"):
        make_split(index, {"train": 1.0}, 0, {"column": "nope", "values": {}})


def test_per_key_sampling_draws_one_example_per_cluster_each_epoch(tmp_path):
    from equipipe.loader import RunData

    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "s", per_atom=["pos"]) as w:
        for i in range(30):
            w.add(f"c{i % 7}/{i}", f"c{i % 7}", {"pos": rng.normal(size=(3, 3)).astype(np.float32)})
    store = Store(tmp_path / "s")
    data = RunData(store, np.arange(30), np.arange(2), batch_size=3, seed=0, per_key=True)
    assert data.epoch_size == 7 and data.steps_per_epoch == 3
    keys = store.index["key"].to_list()
    picks = []
    for epoch in range(6):
        order = data._epoch_order(epoch)
        assert sorted(keys[r] for r in order) == sorted(set(keys))  # every cluster exactly once
        picks.append(tuple(sorted(order)))
    assert len(set(picks)) > 1  # a different chain of each cluster in different epochs
    again = RunData(store, np.arange(30), np.arange(2), batch_size=3, seed=0, per_key=True)
    assert np.array_equal(again._epoch_order(3), data._epoch_order(3))  # resumable
    plain = RunData(store, np.arange(30), np.arange(2), batch_size=3, seed=0)
    assert plain.epoch_size == 30 and sorted(plain._epoch_order(0)) == list(range(30))
