"""The catalog read on demand: lookups, pages, damage found where it is read, threads, a removed file."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from simsiam_embed.errors import UserError
from simsiam_embed.index.catalog import Catalog, CatalogEntry, write_catalog
from simsiam_embed.index.search import search_images
from simsiam_embed.index.store import load_index

from conftest import assert_one_line_error_in_process, build_pixel_index, invoke, make_image_folder


def _entry(image_id: int) -> CatalogEntry:
    return CatalogEntry(image_id, f"/photos/{image_id:07d}.jpg", 1000 + image_id, image_id, f"class-{image_id % 3}",
                        f"{image_id:064x}")


@pytest.fixture(scope="module")
def big_catalog(tmp_path_factory) -> Path:
    """25,000 rows, ids with gaps (every third id): more than two pages, more than a query's ids."""
    path = tmp_path_factory.mktemp("catalog") / "catalog.sqlite"
    write_catalog(path, (_entry(image_id) for image_id in range(0, 75_000, 3)))
    return path


def test_lookups_answer_like_a_dict_of_entries(big_catalog):
    catalog = Catalog(big_catalog)
    assert len(catalog) == 25_000 and catalog.id_range() == (0, 74_997)
    assert catalog[300] == _entry(300) and catalog.get(301) is None and catalog.get(301, "none") == "none"
    assert 300 in catalog and np.int64(300) in catalog and 301 not in catalog and "300" not in catalog
    with pytest.raises(UserError, match="has no image 301, though its index names it"):
        catalog[301]


def test_every_entry_comes_back_once_in_id_order_across_pages(big_catalog):
    catalog = Catalog(big_catalog)
    assert [entry.id for entry in catalog.values()] == list(range(0, 75_000, 3))
    assert list(catalog)[:3] == [0, 3, 6]


def test_many_keeps_the_order_asked_for_across_queries_and_repeats(big_catalog):
    catalog = Catalog(big_catalog)
    wanted = [int(i) for i in np.random.default_rng(0).choice(np.arange(0, 75_000, 3), 2_000)] + [9, 9, 0]
    assert [entry.id for entry in catalog.many(wanted)] == wanted
    assert catalog.many([]) == []
    with pytest.raises(UserError, match="no image 4,"):
        catalog.many([3, 4])
    order = np.array([74_997, 0, 3], dtype=np.int64)
    assert [entry.id for entry in catalog.in_order(order)] == order.tolist()


def test_threads_share_one_catalog(big_catalog):
    """A server answers requests and runs analyses in threads, all on one loaded index."""
    catalog = Catalog(big_catalog)
    errors: list[BaseException] = []

    def look_up(seed: int) -> None:
        try:
            for image_id in np.random.default_rng(seed).choice(np.arange(0, 75_000, 3), 300):
                assert catalog[int(image_id)].id == image_id
            assert sum(1 for _ in catalog.values()) == 25_000
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            errors.append(error)

    threads = [threading.Thread(target=look_up, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_catalog_removed_while_open_still_answers(tmp_path):
    """A generation's folder goes two updates later, perhaps while a server still answers from it."""
    path = tmp_path / "catalog.sqlite"
    write_catalog(path, [_entry(1), _entry(2)])
    catalog = Catalog(path)
    path.unlink()
    assert catalog[2] == _entry(2) and [entry.id for entry in catalog.values()] == [1, 2]


def test_a_search_reads_the_rows_of_its_hits_and_damage_is_refused_where_it_is_read(tmp_path):
    """Opening an index read its whole catalog (6 s and ~1 GB a million images) before any search:
    now a search reads its hits' rows. A damaged row elsewhere does not stop it; reading that row
    (an analysis reads them all) refuses the index in one line."""
    folder = make_image_folder(tmp_path / "images", per_class=2)
    build_pixel_index(folder, tmp_path / "index")
    live = tmp_path / "index" / (tmp_path / "index" / "CURRENT").read_text().strip()
    query = folder / "disc" / "disc-00.png"
    connection = sqlite3.connect(live / "catalog.sqlite")
    connection.execute("UPDATE images SET size = 'not a size' WHERE path != ?", (str(query),))
    connection.commit()
    connection.close()
    hits = search_images(tmp_path / "index", [query], k=1, report=lambda _message: None)[0].hits
    assert hits[0].path == str(query) and hits[0].score > 0.999
    with pytest.raises(UserError, match="values of the wrong type"):
        load_index(tmp_path / "index").entries.in_order(load_index(tmp_path / "index").ids)
    assert_one_line_error_in_process(invoke("outliers", "--index-dir", str(tmp_path / "index")),
                                     "wrong type", "--rebuild")


def test_the_folder_is_compared_with_the_previous_catalog_in_sqlite(tmp_path):
    """Unchanged rows are kept by id; changed, new and wrongly typed ones are embedded again;
    deleted ones counted; unreadable links listed; the scratch database removed."""
    from simsiam_embed.index.changes import folder_changes

    files = {name: tmp_path / "images" / f"{name}.png" for name in ("a", "b", "c", "d", "f")}
    files["a"].parent.mkdir()
    for path in files.values():
        path.write_bytes(b"x" * 10)
    stat = {name: path.stat() for name, path in files.items()}
    previous = tmp_path / "catalog.sqlite"
    write_catalog(previous, [
        CatalogEntry(4, str(files["a"]), 10, stat["a"].st_mtime_ns, "images", "d" * 64),
        CatalogEntry(7, str(files["b"]), 11, stat["b"].st_mtime_ns, "images", "d" * 64),   # its size changed
        CatalogEntry(9, str(tmp_path / "gone.png"), 10, 0, "images", "d" * 64),              # deleted since
        CatalogEntry(12, str(files["f"]), 10, stat["f"].st_mtime_ns, "images", "d" * 64),
    ])
    connection = sqlite3.connect(previous)
    connection.execute("UPDATE images SET label = X'05' WHERE id = 12")   # a damaged row (a blob): embedded again
    connection.commit()
    connection.close()
    dangling = tmp_path / "images" / "e.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    paths = sorted([*files.values(), dangling])
    database = tmp_path / "index" / ".changes.sqlite"
    database.parent.mkdir()
    with folder_changes(paths, previous, database) as changes:
        assert changes.unchanged_ids.tolist() == [4]
        assert changes.to_embed == [files["b"], files["c"], files["d"], files["f"]]
        assert changes.was_indexed.tolist() == [True, False, False, True] and changes.changed == 2
        assert changes.sizes.tolist() == [10] * 4 and changes.mtimes_ns[1] == stat["c"].st_mtime_ns
        assert changes.removed == 1 and [path for path, _ in changes.failures] == [str(dangling)]
        new = tmp_path / "new.sqlite"
        write_catalog(new, [CatalogEntry(13, str(files["d"]), 10, 0, "images", "e" * 64)], kept=changes)
        assert [entry.id for entry in Catalog(new).values()] == [4, 13]
    assert not database.exists()


def test_an_update_reads_no_catalog_entry_into_python(tmp_path, monkeypatch):
    """Building dicts of the previous catalog's entries took ~5.5 GB at 10M images: the update
    compares and copies rows in SQLite, and reads only the catalog's ids."""
    folder = make_image_folder(tmp_path / "images", per_class=2)
    encoder = tmp_path / "pixels.onnx"
    from conftest import write_pixel_onnx

    write_pixel_onnx(encoder)
    build_pixel_index(folder, tmp_path / "index", encoder)
    (folder / "disc" / "disc-00.png").unlink()
    make_image_folder(tmp_path / "more", per_class=1, seed=3)
    (tmp_path / "more" / "square" / "square-00.png").rename(folder / "square" / "extra.png")

    def refused(*_args, **_kwargs):
        raise AssertionError("an update read catalog entries into Python")

    monkeypatch.setattr(Catalog, "values", refused)
    monkeypatch.setattr(Catalog, "get", refused)
    update = build_pixel_index(folder, tmp_path / "index", encoder)
    assert (update.added, update.removed, update.unchanged) == (1, 1, len(list(folder.rglob("*.png"))) - 1)
    monkeypatch.undo()
    loaded = load_index(tmp_path / "index")
    assert sorted(entry.path for entry in loaded.entries.values()) == sorted(str(path) for path in folder.rglob("*.png"))
    assert not (tmp_path / "index" / ".changes.sqlite").exists()


def test_an_update_over_a_catalog_missing_an_id_starts_afresh_and_says_why(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=2)
    encoder = tmp_path / "pixels.onnx"
    from conftest import write_pixel_onnx

    write_pixel_onnx(encoder)
    build_pixel_index(folder, tmp_path / "index", encoder)
    live = tmp_path / "index" / (tmp_path / "index" / "CURRENT").read_text().strip()
    connection = sqlite3.connect(live / "catalog.sqlite")
    connection.execute("DELETE FROM images WHERE id = 3")   # inside the ids' range: opening does not notice
    connection.commit()
    connection.close()
    update = build_pixel_index(folder, tmp_path / "index", encoder)
    assert update.rebuilt_because == "the previous index cannot be used (its ids do not match its catalog)"
    assert update.count == len(list(folder.rglob("*.png")))


def test_search_scores_are_the_centred_cosines_the_explore_layer_uses(tmp_path):
    """Search showed raw cosines (0.96-0.998 for everything) while explore showed centred ones."""
    from conftest import indexed_folder_with_a_copy

    from simsiam_embed.explore.analyses import CentredVectors
    from simsiam_embed.index.search import nearest_hits
    from simsiam_embed.index.store import load_index

    indexed_folder_with_a_copy(tmp_path, 30)
    loaded = load_index(tmp_path / "index")
    query = loaded.vectors_of(loaded.ids[:1])
    hits = nearest_hits(loaded, query, 8)[0]
    centred = CentredVectors(loaded.vectors)
    position = {int(image_id): row for row, image_id in enumerate(loaded.ids)}
    expected = centred.take(np.array([position[hit.id] for hit in hits])) @ centred.take(np.array([0]))[0]
    assert [hit.score for hit in hits] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    raw = (loaded.vectors_of([hit.id for hit in hits]) @ query[0]).min()
    assert raw > 0.85 and hits[-1].score < raw - 0.2   # the raw ones told little apart
