"""An approximate index tuned for a recall target on its own vectors (simsiam_embed/index/tuning.py)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from simsiam_embed.index.store import build_faiss_index, load_index, update_index
from simsiam_embed.index.tuning import held_back_queries, measure_recall, set_search_parameters, tune_for_recall

from conftest import PixelEncoder, make_image_folder, pixel_identity


def clustered(count: int = 4000, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors in noisy clusters: neighbours that an approximate index can miss."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    vectors = centres[rng.integers(0, clusters, count)] + 0.6 * rng.standard_normal((count, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


@pytest.mark.parametrize("factory, knob", [("HNSW8", "efSearch"), ("IVF64,Flat", "nprobe")])
def test_the_fastest_setting_that_meets_the_target_is_chosen_and_set(factory, knob):
    vectors = clustered()
    ids = np.arange(10, 10 + len(vectors), dtype=np.int64)
    index = build_faiss_index(vectors, ids, factory)
    tuned = tune_for_recall(index, vectors, ids, target=0.95)
    assert tuned.met and set(tuned.parameters) == {knob}
    positions = held_back_queries(len(ids))
    # Measured again on the index as it was left: the chosen value is set, and it meets the target...
    assert measure_recall(index, vectors, ids, positions)[0] == pytest.approx(tuned.recall)
    assert tuned.recall >= 0.95
    # ...and the next smaller value does not (so the choice is the fastest that does).
    smaller = tuned.parameters[knob] // 2
    assert smaller >= 1, "the data should need more than the smallest setting"
    set_search_parameters(index, {knob: smaller})
    assert measure_recall(index, vectors, ids, positions)[0] < 0.95


def test_a_target_no_setting_reaches_is_said_and_the_best_setting_is_kept():
    vectors = clustered(count=3000)
    ids = np.arange(len(vectors), dtype=np.int64)
    index = build_faiss_index(vectors, ids, "IVF16,PQ2")   # 2-byte codes: too coarse for 0.999
    tuned = tune_for_recall(index, vectors, ids, target=0.999)
    assert not tuned.met and "misses the target 0.999" in tuned.describe()
    assert measure_recall(index, vectors, ids, held_back_queries(len(ids)))[0] == pytest.approx(tuned.recall)


def test_recall_leaves_each_query_out_of_its_own_answers():
    """A query is a vector of the index: counting itself, a search that found only the query
    would score 0.1 for free. Exact search scores 1, and an index missing everything but the
    query itself scores 0."""
    vectors = clustered(count=500)
    ids = np.arange(len(vectors), dtype=np.int64)
    exact = build_faiss_index(vectors, ids, "Flat")
    positions = held_back_queries(len(ids), queries=100)
    assert measure_recall(exact, vectors, ids, positions)[0] == 1.0

    class OnlyItself:
        def search(self, queries, k):
            found = np.full((len(queries), k), -1, dtype=np.int64)
            found[:, 0] = ids[positions]
            return np.zeros_like(found, dtype=np.float32), found

    assert measure_recall(OnlyItself(), vectors, ids, positions)[0] == 0.0
    assert tune_for_recall(exact, vectors, ids).describe() == "exact search: recall@10 1"


def test_an_index_keeps_its_tuning_and_a_new_target_retunes_without_embedding(tmp_path, monkeypatch):
    import simsiam_embed.index.tuning as tuning

    monkeypatch.setattr(tuning, "TUNING_QUERIES", 40)
    folder = make_image_folder(tmp_path / "images", per_class=20)   # 60 images
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    said: list[str] = []
    quiet = dict(report=said.append, show_progress=False, workers=0)
    first = update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", "hnsw", **quiet)
    assert first.tuning.met and any(line.startswith("search: recall@10") for line in said)
    manifest = load_index(tmp_path / "index").manifest
    assert manifest.recall_target == 0.95 and manifest.recall_at_10 >= 0.95
    assert manifest.search_parameters == first.tuning.parameters
    loaded = load_index(tmp_path / "index")
    hnsw = faiss.downcast_index(faiss.downcast_index(loaded.index.index))
    assert hnsw.hnsw.efSearch == first.tuning.parameters["efSearch"]   # applied when loaded

    class MustNotEmbed(PixelEncoder):
        def __call__(self, images):
            raise AssertionError("a new recall target needs no new vectors")

    again = update_index(folder, MustNotEmbed(), pixel_identity(model_file), tmp_path / "index", recall=0.999, **quiet)
    assert again.tuning.target == 0.999 and load_index(tmp_path / "index").manifest.recall_target == 0.999
    same = update_index(folder, MustNotEmbed(), pixel_identity(model_file), tmp_path / "index", **quiet)
    assert same.tuning is None and "up to date" in same.reason   # the target is kept between updates


def test_an_index_written_before_tuning_loads_with_the_untuned_settings(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=2)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index",
                 report=lambda _m: None, show_progress=False, workers=0)
    manifest_path = next(Path(tmp_path / "index").glob("gen-*/manifest.json"))
    raw = json.loads(manifest_path.read_text())
    for name in ("search_parameters", "recall_target", "recall_at_10"):
        raw.pop(name)
    manifest_path.write_text(json.dumps(raw))
    manifest = load_index(tmp_path / "index").manifest
    assert manifest.search_parameters == {} and manifest.recall_target is None
