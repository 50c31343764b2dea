"""Embedding in shards: bounded memory, a killed run resumes where it stopped, nothing stale or
damaged is trusted (simsiam_embed/inference/shards.py, and embed and index through it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from simsiam_embed.inference.embed import EmbedResult, embed_folder
from simsiam_embed.inference.shards import ShardedEmbedding, embed_in_shards

from conftest import PixelEncoder, make_image_folder, pixel_identity

DIM = 4


class SliceEmbedder:
    """Stands in for embed_paths: a vector from each name's number, "bad" names unreadable;
    raises after ``fail_after`` slices, as a kill would stop a run."""

    def __init__(self, fail_after: int | None = None, most_paths: int | None = None):
        self.slices: list[list[str]] = []
        self.fail_after, self.most_paths = fail_after, most_paths

    def __call__(self, paths, bar) -> EmbedResult:
        if self.fail_after is not None and len(self.slices) == self.fail_after:
            raise KeyboardInterrupt
        assert self.most_paths is None or len(paths) <= self.most_paths
        self.slices.append([str(path) for path in paths])
        kept = [i for i, path in enumerate(paths) if "bad" not in str(path)]
        vectors = np.array([[float(str(paths[i]).split("-")[1]), 1.0, 0.0, 0.0] for i in kept], dtype=np.float32)
        bar.update(len(paths))
        return EmbedResult(vectors.reshape(-1, DIM), np.array(kept, dtype=np.int64),
                           [(i, "truncated") for i, path in enumerate(paths) if "bad" in str(path)])


PATHS = [Path(f"{'bad' if i % 7 == 3 else 'img'}-{i}") for i in range(23)]


def _shards(folder: Path, embed: SliceEmbedder, job=None, paths=PATHS) -> ShardedEmbedding:
    return embed_in_shards(paths, embed, folder, DIM, job or {"encoder": "a"}, show_progress=False, shard_rows=5)


def _contents(shards: ShardedEmbedding) -> tuple[list[int], np.ndarray, list]:
    read = list(shards)
    return ([int(row) for shard in read for row in shard.rows], np.concatenate([shard.vectors for shard in read]),
            [failure for shard in read for failure in shard.failures])


def test_a_killed_run_resumes_at_the_first_missing_shard_and_ends_as_an_uninterrupted_one(tmp_path):
    whole = _contents(_shards(tmp_path / "whole", SliceEmbedder(most_paths=5)))
    assert whole[0] == [i for i in range(23) if i % 7 != 3] and whole[2] == [(3, "truncated"), (10, "truncated"),
                                                                             (17, "truncated")]
    killed = SliceEmbedder(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        _shards(tmp_path / "halves", killed)
    assert sorted(path.name for path in (tmp_path / "halves").glob("shard-*")) == ["shard-000000.npz", "shard-000001.npz"]
    again = SliceEmbedder()
    resumed = _shards(tmp_path / "halves", again)
    assert resumed.resumed == 2
    assert again.slices == [[str(path) for path in PATHS[10:15]], [str(path) for path in PATHS[15:20]],
                            [str(path) for path in PATHS[20:]]]   # only what was not finished
    rows, vectors, failures = _contents(resumed)
    assert rows == whole[0] and np.array_equal(vectors, whole[1]) and failures == whole[2]


def test_shards_of_another_job_or_another_file_list_are_never_reused(tmp_path):
    _shards(tmp_path / "s", SliceEmbedder())
    other_encoder = SliceEmbedder()
    _shards(tmp_path / "s", other_encoder, job={"encoder": "b"})
    assert len(other_encoder.slices) == 5
    other_files = SliceEmbedder()
    _shards(tmp_path / "s", other_files, job={"encoder": "b"}, paths=PATHS[1:])
    assert len(other_files.slices) == 5 and other_files.slices[0][0] == str(PATHS[1])
    same = SliceEmbedder()
    _shards(tmp_path / "s", same, job={"encoder": "b"}, paths=PATHS[1:])
    assert same.slices == []


def _write_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def test_a_damaged_or_doctored_shard_is_embedded_again_never_trusted(tmp_path):
    folder = tmp_path / "s"
    _shards(folder, SliceEmbedder())
    good = dict(np.load(folder / "shard-000002.npz"))
    (folder / "shard-000000.npz").write_bytes((folder / "shard-000000.npz").read_bytes()[:100])   # truncated
    _write_npz(folder / "shard-000001.npz", **dict(good))                                          # another slice's rows
    _write_npz(folder / "shard-000003.npz", rows=np.array([15, 16, 18, 19], dtype=np.int64),
               vectors=np.zeros((4, DIM), np.float32), failed_rows=np.array([17], dtype=np.int64),
               failure_reasons=np.array([object()], dtype=object))                                # pickled field
    nan = dict(np.load(folder / "shard-000004.npz"))
    nan["vectors"] = np.full_like(nan["vectors"], np.nan)
    _write_npz(folder / "shard-000004.npz", **nan)                                                 # not finite
    again = SliceEmbedder()
    _shards(folder, again)
    assert [paths[0] for paths in again.slices] == [str(PATHS[0]), str(PATHS[5]), str(PATHS[15]), str(PATHS[20])]
    assert _contents(ShardedEmbedding(folder, PATHS, 5, DIM))[0] == [i for i in range(23) if i % 7 != 3]


def test_a_shard_whose_vectors_were_replaced_is_embedded_again(tmp_path):
    """Every field well-formed, the files unchanged: only the digest of its arrays tells."""
    folder = tmp_path / "s"
    _shards(folder, SliceEmbedder())
    doctored = dict(np.load(folder / "shard-000001.npz"))
    doctored["vectors"] = doctored["vectors"][::-1].copy()
    _write_npz(folder / "shard-000001.npz", **doctored)
    again = SliceEmbedder()
    _shards(folder, again)
    assert again.slices == [[str(path) for path in PATHS[5:10]]]


def test_links_among_the_shards_are_never_read_or_written_through(tmp_path):
    folder = tmp_path / "s"
    _shards(folder, SliceEmbedder())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(folder / "shard-000002.npz", elsewhere / "planted.npz")
    (folder / "shard-000002.npz").unlink()
    (folder / "shard-000002.npz").symlink_to(elsewhere / "planted.npz")   # a sound shard, behind a link
    again = SliceEmbedder()
    _shards(folder, again)
    assert again.slices == [[str(path) for path in PATHS[10:15]]]
    assert not (folder / "shard-000002.npz").is_symlink()
    # The whole folder a link: removed and started afresh, nothing written into its target.
    shutil.rmtree(folder)
    folder.symlink_to(elsewhere, target_is_directory=True)
    _shards(folder, SliceEmbedder())
    assert not folder.is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == ["planted.npz"]


def test_a_killed_writers_temporary_files_are_cleared_on_resume(tmp_path):
    folder = tmp_path / "s"
    _shards(folder, SliceEmbedder())
    (folder / ".shard-000001.npz.x1y2.tmp").write_bytes(b"half a shard")
    _shards(folder, SliceEmbedder())
    assert not list(folder.glob("*.tmp"))


class _KillAfter(PixelEncoder):
    def __init__(self, batches: int | None):
        super().__init__()
        self.batches, self.calls = batches, 0

    def __call__(self, images):
        if self.batches is not None and self.calls == self.batches:
            raise KeyboardInterrupt
        self.calls += 1
        return super().__call__(images)


@pytest.mark.parametrize("file_format", ["npy", "parquet"])
def test_embed_resumes_after_a_kill_and_writes_what_an_uninterrupted_run_does(tmp_path, monkeypatch, file_format):
    if file_format == "parquet":
        pytest.importorskip("pyarrow")
    import simsiam_embed.inference.shards as shards_module

    monkeypatch.setattr(shards_module, "SHARD_BYTES", 4 * 12 * 4)   # 4 images a shard (12-d vectors)
    folder = make_image_folder(tmp_path / "images", per_class=5)    # 15 images
    (folder / "disc" / "broken.png").write_bytes(b"")
    quiet = dict(batch_size=2, workers=0, show_progress=False, file_format=file_format, encoder_digest="pixels")
    embed_folder(folder, PixelEncoder(), tmp_path / "whole", **quiet)
    with pytest.raises(KeyboardInterrupt):
        embed_folder(folder, _KillAfter(batches=5), tmp_path / "halves", **quiet)
    assert len(list((tmp_path / "halves" / ".embedding").glob("shard-*.npz"))) == 2
    resumed = _KillAfter(batches=None)
    result = embed_folder(folder, resumed, tmp_path / "halves", **quiet)
    assert resumed.calls == 4   # shards 2 and 3 of 4 (4 files each, 2 a batch) are all that was left
    assert result.count == 15 and [Path(path).name for path, _ in result.failures] == ["broken.png"]
    for name in ("paths.jsonl", "skipped.jsonl", "embeddings.npy", "embeddings.parquet"):
        if (tmp_path / "whole" / name).exists():
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "halves" / name).read_bytes(), name
    assert not (tmp_path / "halves" / ".embedding").exists()


def test_an_index_update_killed_while_embedding_resumes_with_the_files_it_had_not_embedded(tmp_path, monkeypatch):
    import simsiam_embed.inference.shards as shards_module
    from simsiam_embed.index.store import load_index, update_index

    monkeypatch.setattr(shards_module, "SHARD_BYTES", 4 * 12 * 4)
    folder = make_image_folder(tmp_path / "images", per_class=4)    # 12 images: 3 shards
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    quiet = dict(report=lambda _m: None, show_progress=False, workers=0, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        update_index(folder, _KillAfter(batches=4), pixel_identity(model_file), tmp_path / "index", **quiet)
    assert not (tmp_path / "index" / "CURRENT").exists()
    resumed = _KillAfter(batches=None)
    update = update_index(folder, resumed, pixel_identity(model_file), tmp_path / "index", **quiet)
    assert resumed.calls == 2 and update.count == 12   # the third shard only
    update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "fresh", **quiet)
    resumed_index, fresh_index = load_index(tmp_path / "index"), load_index(tmp_path / "fresh")
    assert [entry.path for entry in resumed_index.entries.values()] == [entry.path for entry in fresh_index.entries.values()]
    assert np.array_equal(resumed_index.vectors, fresh_index.vectors)
    assert not (tmp_path / "index" / ".embedding").exists()
    # A file changed since the kill is embedded anew, with the rest of its shard, not read back
    # from its old shard; the other finished shard is kept.
    with pytest.raises(KeyboardInterrupt):
        update_index(folder, _KillAfter(batches=4), pixel_identity(model_file), tmp_path / "third", **quiet)
    changed = sorted(folder.rglob("*.png"))[0]
    shutil.copy(sorted(folder.rglob("*.png"))[-1], changed)
    counting = _KillAfter(batches=None)
    update_index(folder, counting, pixel_identity(model_file), tmp_path / "third", **quiet)
    assert counting.calls == 4   # shard 0 again, and shard 2
    third = load_index(tmp_path / "third")
    position = [entry.path for entry in third.entries.values()].index(str(changed))
    assert np.allclose(third.vectors[position], third.vectors[-1])   # the new content's vector


def test_a_folder_is_cut_so_that_eight_ranks_each_embed_some():
    """Under 262k images at 2048-d, 8 ranks shared one shard: seven waited at the barrier."""
    from simsiam_embed.inference.shards import rows_per_shard

    for count in (10_000, 100_000, 262_000):
        rows = rows_per_shard(2048, count)
        assert -(-count // rows) >= 8, count
    assert rows_per_shard(2048, 10_000_000) == 32_768   # large folders: the memory bound
    assert rows_per_shard(2048, 500) >= 500             # small ones: one slice, one loader
