"""dedup, clusters, outliers, map and report: on images the tests draw, through the library and the CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import build_pixel_index, distinct_images, invoke
from PIL import Image, ImageEnhance

from simsiam_embed.explore import neighbours, projection
from simsiam_embed.explore.analyses import (
    CentredVectors, default_cluster_count, find_clusters, find_duplicates, find_outliers, neighbour_graph, project_to_map,
)
from simsiam_embed.index.store import load_index
from simsiam_embed.explore.report import read_run_metrics, write_run_report


@pytest.fixture
def planted(tmp_path: Path):
    """40 distinct images, and near-duplicates of four of them made as people's copies are made."""
    images = tmp_path / "images"
    originals = distinct_images(images / "originals", 40)
    copies = images / "z-copies"   # sorts after the originals, for keep-first
    copies.mkdir()
    shutil.copyfile(originals[0], copies / "exact-copy.png")
    Image.open(originals[1]).convert("RGB").save(copies / "re-encoded.jpg", quality=40)
    Image.open(originals[2]).resize((16, 16), Image.BICUBIC).save(copies / "half-size.png")
    ImageEnhance.Brightness(Image.open(originals[3]).convert("RGB")).enhance(1.05).save(copies / "brighter.png")
    shutil.copyfile(originals[3], copies / "second-copy.png")
    build_pixel_index(images, tmp_path / "index")
    expected = [{str(originals[0]), str(copies / "exact-copy.png")},
                {str(originals[1]), str(copies / "re-encoded.jpg")},
                {str(originals[2]), str(copies / "half-size.png")},
                {str(originals[3]), str(copies / "brighter.png"), str(copies / "second-copy.png")}]
    return tmp_path, expected


def groups_as_sets(result) -> list[set[str]]:
    return [{member.path for member in group.members} for group in result.groups]


def test_planted_duplicates_are_grouped_and_distinct_images_kept_apart(planted):
    workspace, expected = planted
    result = find_duplicates(load_index(workspace / "index", for_search=False))
    found = groups_as_sets(result)
    assert sorted(map(sorted, found)) == sorted(map(sorted, expected))
    exact = next(group for group in result.groups if any(m.path.endswith("exact-copy.png") for m in group.members))
    assert exact.exact and exact.min_score == 1.0
    near = next(group for group in result.groups if any(m.path.endswith("re-encoded.jpg") for m in group.members))
    assert not near.exact and result.rule.threshold <= near.min_score < 1.0
    assert result.duplicate_files == 5


def test_identical_bytes_group_whatever_the_threshold(planted):
    workspace, _ = planted
    result = find_duplicates(load_index(workspace / "index", for_search=False), threshold=1.0)
    # At cosine 1.0 only byte-identical files (and the copy that was identical) remain.
    assert all(group.exact for group in result.groups)
    assert any(any(m.path.endswith("exact-copy.png") for m in g.members) for g in result.groups)


@pytest.mark.parametrize("plan, kept", [("keep-largest", "half-size.png"), ("keep-oldest", "half-size.png"),
                                        ("keep-first", "image-002.png"), ("keep-original", "image-002.png")])
def test_a_plan_names_the_file_to_keep_and_never_deletes(planted, plan, kept):
    workspace, _ = planted
    copy = workspace / "images" / "z-copies" / "half-size.png"
    original = workspace / "images" / "originals" / "image-002.png"
    # The copy is made larger and older than its original, so each plan picks its own file;
    # keep-original keeps the original still, by its pixels (the copy is half its size).
    copy.write_bytes(copy.read_bytes() + b"\0" * 20_000)
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    build_pixel_index(workspace / "images", workspace / "index", workspace / "pixel-encoder.onnx")
    before = sorted(p for p in (workspace / "images").rglob("*") if p.is_file())

    result = invoke("dedup", "--plan", plan, "--json", cwd=workspace)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    group = next(g for g in answer["groups"] if any(m["path"] == str(original) for m in g["members"]))
    assert group["members"][0]["path"].endswith(kept) and group["members"][0]["action"] == "keep"
    assert [m["action"] for m in group["members"][1:]] == ["remove"]

    plan_file = json.loads((workspace / "explore" / "plan.json").read_text())
    assert plan_file["plan"] == plan and any(path.endswith(kept) for path in plan_file["keep"])
    removed = {row["path"] for row in plan_file["remove"]}
    assert len(removed) == answer["duplicate_files"] == 5
    with open(workspace / "explore" / "plan.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["path"] for row in rows if row["action"] == "remove"} == removed
    assert sorted(p for p in (workspace / "images").rglob("*") if p.is_file()) == before   # nothing deleted


def test_dedup_writes_json_csv_and_a_page_with_the_groups(planted):
    workspace, expected = planted
    result = invoke("dedup", cwd=workspace)
    assert result.exit_code == 0, result.output
    assert "4 duplicate groups among 45 images" in result.stdout
    folder = workspace / "explore"
    groups = json.loads((folder / "duplicates.json").read_text())["groups"]
    assert len(groups) == 4
    with open(folder / "duplicates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["path"] for row in rows} == set().union(*expected)
    page = (folder / "duplicates.html").read_text()
    assert page.count("<section>") == 4 and page.count("data:image/jpeg;base64,") == 9
    assert not (folder / "plan.json").exists()


def test_the_approximate_neighbour_search_finds_the_same_duplicates(planted, monkeypatch):
    """Past EXACT_NEIGHBOURS_MAX the k-NN graph comes from an IVF index, not all pairs."""
    workspace, expected = planted
    monkeypatch.setattr(neighbours, "EXACT_NEIGHBOURS_MAX", 10)
    messages = []
    result = find_duplicates(load_index(workspace / "index", for_search=False), report=messages.append)
    assert "IVF" in result.method and "IVF" in messages[0]
    assert sorted(map(sorted, groups_as_sets(result))) == sorted(map(sorted, expected))


def test_the_neighbour_graph_leaves_each_image_out_of_its_own_neighbours():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    vectors[10] = vectors[11]   # an exact copy ties with the query itself
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    graph = neighbour_graph(CentredVectors(vectors), 5)
    assert graph.positions.shape == (50, 5)
    assert not (graph.positions == np.arange(50)[:, None]).any()
    assert graph.positions[10, 0] == 11 and graph.positions[11, 0] == 10
    assert np.all(np.diff(graph.scores, axis=1) <= 1e-6)


def test_clusters_separate_three_kinds_of_image(tmp_path):
    images = tmp_path / "images"
    rng = np.random.default_rng(3)
    for name, colour in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 210))):
        (images / name).mkdir(parents=True)
        for number in range(12):
            jitter = rng.integers(-20, 20, 3)
            Image.new("RGB", (16, 16), tuple(int(c + j) for c, j in zip(colour, jitter))).save(
                images / name / f"{number}.png")
    build_pixel_index(images, tmp_path / "index")
    result = find_clusters(load_index(tmp_path / "index", for_search=False), k=3)
    assert sorted(cluster.size for cluster in result.clusters) == [12, 12, 12]
    assert all(len(cluster.labels) == 1 for cluster in result.clusters)   # each cluster is one colour
    assert all(len(cluster.nearest) == 8 for cluster in result.clusters)
    assert all(a.score >= b.score for c in result.clusters for a, b in zip(c.nearest, c.nearest[1:]))

    answer = invoke("clusters", "-k", "3", "--json", cwd=tmp_path)
    assert answer.exit_code == 0, answer.output
    assert [c["size"] for c in json.loads(answer.stdout)["clusters"]] == [12, 12, 12]
    assert json.loads(answer.stdout)["k_reason"] == "the number asked for"   # it read "(k = 3: -k)"
    assert (tmp_path / "explore" / "clusters.html").read_text().count("<section>") == 3


def test_the_default_cluster_count_grows_with_the_index():
    assert [default_cluster_count(n) for n in (2, 3, 50, 1_000, 100_000, 10_000_000)] == [1, 2, 5, 22, 224, 1000]


def test_outliers_rank_the_odd_images_first(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(4)
    for number in range(30):   # variations on one grey picture
        grey = int(120 + rng.integers(-25, 25))
        Image.new("RGB", (16, 16), (grey, grey, grey)).save(images / f"usual-{number:02d}.png")
    Image.new("RGB", (16, 16), (250, 20, 20)).save(images / "odd-red.png")
    Image.new("RGB", (16, 16), (20, 20, 250)).save(images / "odd-blue.png")
    build_pixel_index(images, tmp_path / "index")
    result = find_outliers(load_index(tmp_path / "index", for_search=False), count=5)
    assert {Path(o.path).name for o in result.outliers[:2]} == {"odd-red.png", "odd-blue.png"}
    assert result.outliers[0].score <= result.outliers[1].score < result.median_score

    answer = invoke("outliers", "-n", "2", "--json", cwd=tmp_path)
    assert answer.exit_code == 0, answer.output
    assert {Path(o["path"]).name for o in json.loads(answer.stdout)["outliers"]} == {"odd-red.png", "odd-blue.png"}


def test_the_map_says_it_fell_back_to_pca_and_samples_large_indexes(planted, monkeypatch):
    workspace, _ = planted
    monkeypatch.setattr(projection, "umap_available", lambda: False)
    loaded = load_index(workspace / "index", for_search=False)
    result = project_to_map(loaded, max_points=20)
    assert result.method == "PCA" and "umap-learn is not installed" in result.note and "20 of the 45" in result.note
    assert len(result.points) == 20 and len({p.id for p in result.points}) == 20
    assert np.std([p.x for p in result.points]) > 0
    answer = invoke("map", cwd=workspace)
    assert answer.exit_code == 0, answer.output
    page = (workspace / "explore" / "map.html").read_text()
    assert page.count('"src": "data:image/jpeg;base64,') == 45


def test_umap_is_refused_in_one_line_when_absent(planted, monkeypatch):
    workspace, _ = planted
    monkeypatch.setattr(projection, "umap_available", lambda: False)
    answer = invoke("map", "--method", "umap", cwd=workspace)
    assert answer.exit_code != 0 and "pip install 'simsiam-embed[map]'" in answer.output


def test_explore_commands_without_an_index_say_how_to_make_one(tmp_path):
    for command in ("dedup", "clusters", "outliers", "map"):
        answer = invoke(command, cwd=tmp_path)
        assert answer.exit_code != 0 and "simsiam-embed index" in answer.output, command


def test_file_names_cannot_break_out_of_the_map_page(tmp_path):
    images = tmp_path / "images"
    distinct_images(images, 3)
    (images / "image-000.png").rename(images / "<!--<script>alert(1)<b>.png")
    build_pixel_index(images, tmp_path / "index")
    assert invoke("map", cwd=tmp_path).exit_code == 0
    page = (tmp_path / "explore" / "map.html").read_text()
    script = page[page.index("const points"):]
    assert "<!--" not in script and "<script>alert" not in script and "<b>" not in script
    points = json.loads(script[len("const points = "):script.index(";\n")])
    assert "<!--<script>alert(1)<b>.png" in {point["name"] for point in points}


# --------------------------------------------------------------------------------------------
# The run report


def write_metrics(run: Path, knn: bool, torn: bool = False) -> None:
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dim": 64, "backbone": "resnet18", "batch_size": 8}))
    lines = []
    if knn:
        lines.append({"step": 0, "knn_top1_random_init": 0.3})
    for step in range(1, 21):
        lines.append({"step": step, "epoch": step / 10, "lr": 0.05 * (1 - step / 20), "loss": -0.2 - step / 40,
                      "z_std": 0.12, "z_std_reference": 0.125})
        if step % 10 == 0:
            lines.append({"step": step, "epoch_end": step // 10, "loss": -0.3, "z_std": 0.12,
                          **({"knn_top1": 0.4 + step / 100} if knn else {})})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + ('{"step": 21, "lo' if torn else ""))


def test_the_report_draws_each_curve_and_a_page(tmp_path):
    run = tmp_path / "runs" / "images"
    write_metrics(run, knn=True, torn=True)
    report = write_run_report(run)
    assert [path.name for path in report.charts] == ["report-loss.png", "report-lr.png", "report-z_std.png",
                                                     "report-knn.png"]
    assert report.steps == 20   # the torn last line is left out
    for chart in report.charts:
        with Image.open(chart) as image:
            assert image.size == (760, 360)
            assert image.info["Software"].startswith("Matplotlib")   # a plotting library's, not hand-drawn
            # Drawn, not blank: the lines put several colours on the white canvas.
            assert len(image.convert("RGB").getcolors(100_000)) > 10
    page = report.page.read_text()
    assert all(f'src="{chart.name}"' in page for chart in report.charts)
    assert "healthy" in page


def test_the_z_std_chart_draws_the_reference_and_the_collapse_line(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, knn=False)
    write_run_report(run)
    with Image.open(run / "report-z_std.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    green, red = np.array([0x2A, 0x9D, 0x3A]), np.array([0xC0, 0x39, 0x2B])
    assert (np.abs(pixels - green).sum(axis=2) < 10).sum() > 100   # 1/sqrt(dim)
    assert (np.abs(pixels - red).sum(axis=2) < 10).sum() > 100     # the collapse level
    assert not (run / "report-knn.png").exists()   # no --val-dir, no kNN chart


def test_report_command_defaults_to_the_latest_run(tmp_path):
    write_metrics(tmp_path / "runs" / "images", knn=False)
    (tmp_path / "runs" / "images" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "runs" / "LATEST").write_text("images\n")
    answer = invoke("report", "--json", cwd=tmp_path)
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.stdout)["page"] == str(tmp_path / "runs" / "images" / "report.html")


def test_metrics_records_that_are_not_objects_are_left_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('[1, 2]\n{"step": "x"}\n{"step": 3, "loss": NaN}\n{"step": 4, "loss": -0.5}\n')
    assert [record.step for record in read_run_metrics(run)] == [3, 4]
    write_run_report(run)   # NaN values are skipped when drawing, not an error


@pytest.mark.parametrize("args, fragment", [
    (["dedup", "--threshold", "1.5"], "--threshold"),
    (["dedup", "--threshold", "nan"], "nan"),
    (["dedup", "--plan", "keep-all"], "--plan"),
    (["clusters", "-k", "0"], "-k"),
    (["clusters", "-k", "500"], "-k 500 is more than the 45 images"),
    (["outliers", "-n", "0"], "--count"),
    (["map", "--method", "tsne"], "--method"),
    (["map", "--max-points", "1"], "--max-points"),
    (["dedup", "--index-dir", "nowhere"], "no index in nowhere"),
    (["report", "images"], "has no metrics.jsonl"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--host", "203.0.113.77", "--port", "0"], "cannot listen on 203.0.113.77"),
])
def test_bad_input_to_the_explore_commands_is_one_line(planted, args, fragment):
    from conftest import assert_one_line_error_in_process

    workspace, _ = planted
    assert_one_line_error_in_process(invoke(*args, cwd=workspace), fragment)


def test_an_output_folder_that_cannot_be_written_is_one_line(planted):
    from conftest import assert_one_line_error_in_process

    workspace, _ = planted
    (workspace / "a-file").write_text("")
    assert_one_line_error_in_process(invoke("dedup", "-o", "a-file/explore", cwd=workspace), "cannot write")


def test_the_map_uses_umap_when_the_extra_is_installed(planted):
    pytest.importorskip("umap", reason="umap-learn (the [map] extra) is not installed; the PCA path is tested above")
    workspace, _ = planted
    result = project_to_map(load_index(workspace / "index", for_search=False))
    assert result.method == "UMAP" and result.note == "" and len(result.points) == 45
    assert np.std([p.x for p in result.points]) > 0


def test_a_group_of_many_copies_shows_a_bounded_page(tmp_path, monkeypatch):
    from simsiam_embed.explore import pages as explore_outputs

    monkeypatch.setattr(explore_outputs, "PAGE_MAX_MEMBERS", 4)
    images = tmp_path / "images"
    first = distinct_images(images, 3)[0]
    for number in range(9):
        shutil.copyfile(first, images / f"copy-{number}.png")
    build_pixel_index(images, tmp_path / "index")
    assert invoke("dedup", cwd=tmp_path).exit_code == 0
    page = (tmp_path / "explore" / "duplicates.html").read_text()
    assert page.count("<figure") == 4 and "and 6 more (duplicates.csv lists them)" in page
    with open(tmp_path / "explore" / "duplicates.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 10


def test_look_alikes_whose_pictures_differ_are_not_duplicates(tmp_path):
    """Same mean colour in every quadrant (identical vectors for the pixel-means encoder), different
    pictures: the encoder pairs them, the pixel check does not."""
    images = tmp_path / "images"
    distinct_images(images, 12)
    plain = Image.new("RGB", (32, 32), (120, 120, 120))
    plain.save(images / "grey.png")
    stripes = np.zeros((32, 32, 3), dtype=np.uint8)
    stripes[:, ::2] = 240   # columns of 240 and 0: mean 120, as the plain grey
    Image.fromarray(stripes).save(images / "stripes.png")
    build_pixel_index(images, tmp_path / "index")
    loaded = load_index(tmp_path / "index", for_search=False)

    unchecked = find_duplicates(loaded, pixel_check=False)
    assert {Path(m.path).name for g in unchecked.groups for m in g.members} == {"grey.png", "stripes.png"}
    checked = find_duplicates(loaded)
    assert checked.groups == [] and checked.failed_pixel_check == 1 and checked.unreadable_pairs == 0

    answer = invoke("dedup", "--json", cwd=tmp_path)
    assert answer.exit_code == 0 and json.loads(answer.stdout)["failed_pixel_check"] == 1
    assert "pixel check: 0 of 1 candidate pairs confirmed" in answer.stderr
    assert len(json.loads(invoke("dedup", "--json", "--no-pixel-check", cwd=tmp_path).stdout)["groups"]) == 1


def test_a_candidate_whose_file_changed_since_indexing_is_not_grouped(planted):
    workspace, _ = planted
    (workspace / "images" / "z-copies" / "re-encoded.jpg").write_bytes(
        (workspace / "images" / "z-copies" / "re-encoded.jpg").read_bytes() + b"\0")
    result = find_duplicates(load_index(workspace / "index", for_search=False))
    assert result.unreadable_pairs == 1
    assert not any(m.path.endswith("re-encoded.jpg") for g in result.groups for m in g.members)


@pytest.mark.parametrize("side, grouped_by_default", [(32, False), (128, True)])
def test_small_pictures_need_the_stricter_threshold(tmp_path, side, grouped_by_default):
    """A copy with one quadrant brightened (centred cosine 0.91, pixels agree at 0.95): a pair of
    copies among photos, but at 64 px or less pixels cannot vouch for it, so 0.93 is needed."""
    images = tmp_path / "images"
    original = distinct_images(images, 12, size=side)[0]
    pixels = np.asarray(Image.open(original).convert("RGB")).astype(int)
    pixels[:side // 2, :side // 2] = np.clip(pixels[:side // 2, :side // 2] + 70, 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(images / "variant.png")
    build_pixel_index(images, tmp_path / "index")
    loaded = load_index(tmp_path / "index", for_search=False)

    def grouped(result) -> bool:
        return any({Path(m.path).name for m in g.members} == {original.name, "variant.png"} for g in result.groups)

    assert grouped(find_duplicates(loaded)) == grouped_by_default
    assert grouped(find_duplicates(loaded, threshold=0.8))   # an explicit threshold holds for every pair
    assert not grouped(find_duplicates(loaded, pixel_check=False))   # 0.95 without the pixel check


@pytest.mark.parametrize("copies", [1, 2])
def test_a_plan_never_marks_the_last_copy_for_removal(tmp_path, copies):
    """A keeper deleted between `index` and `dedup --plan` was still kept by the plan, and its
    only remaining copy marked for removal (rc 0, no warning)."""
    import shutil

    from conftest import distinct_images

    paths = distinct_images(tmp_path / "images", 12)
    for number in range(copies):
        shutil.copyfile(paths[0], tmp_path / "images" / f"z-copy-{number}.png")
    build_pixel_index(tmp_path / "images", tmp_path / "index")
    first = json.loads(invoke("dedup", "--plan", "keep-first", "--json", cwd=tmp_path).stdout)
    group = next(g for g in first["groups"] if len(g["members"]) == copies + 1)
    keeper = Path(group["members"][0]["path"])
    keeper.unlink()

    result = invoke("dedup", "--plan", "keep-first", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "explore" / "plan.json").read_text())
    left = sorted(str(p) for p in (tmp_path / "images").glob("z-copy-*.png"))
    assert str(keeper) not in plan["keep"] and str(keeper) not in {row["path"] for row in plan["remove"]}
    if copies == 1:   # one copy left: nothing to remove, the group is left out and said so
        assert all(row["path"] not in left for row in plan["remove"])
        assert "left out of the plan" in result.stderr
    else:             # the next member keeps the picture, the other is removed
        assert left[0] in plan["keep"] and [row["path"] for row in plan["remove"]] == [left[1]]
        assert f"keeping {Path(left[0]).name} instead" in result.stderr


def test_explore_commands_print_no_faiss_chatter_and_no_note_twice(tmp_path, capfd):
    """clusters printed FAISS's C++ "WARNING clustering 21 points..." on stderr; map printed its
    note on stdout and stderr both."""
    from conftest import indexed_folder_with_a_copy

    indexed_folder_with_a_copy(tmp_path, 20)
    assert invoke("clusters", "-k", "3", cwd=tmp_path).exit_code == 0
    assert "WARNING clustering" not in capfd.readouterr().err
    mapped = invoke("map", "--method", "pca", "--max-points", "10", cwd=tmp_path)
    assert mapped.exit_code == 0, mapped.output
    assert "random 10" in mapped.stderr and "random 10" not in mapped.stdout


def test_the_workspace_may_come_before_the_command(tmp_path):
    from conftest import indexed_folder_with_a_copy

    indexed_folder_with_a_copy(tmp_path / "ws", 6)
    result = invoke("--workspace", str(tmp_path / "ws"), "outliers", "-n", "2", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ws" / "explore" / "outliers.json").is_file()


def test_a_report_draws_only_what_was_logged_and_never_an_empty_chart(tmp_path):
    """A short run stopped before its first log_every step, as older versions logged it: only
    epoch records. The z-std the summary quotes is drawn; the lr, never logged, has no empty frame."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dim": 64}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 6, "epoch_end": 1, "loss": -0.3, "z_std": 0.12}) + "\n")
    report = write_run_report(run)
    assert [path.name for path in report.charts] == ["report-loss.png", "report-z_std.png"]
    with Image.open(run / "report-z_std.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    # The epoch mean is drawn (a dot in the second palette colour), not "no data yet".
    assert (np.abs(pixels - np.array([0xD0, 0x58, 0x2A])).sum(axis=2) < 10).sum() > 10
    assert "0.1200" in report.page.read_text()


def test_each_plan_orders_the_stored_groups_and_finds_them_once(tmp_path, monkeypatch):
    """The app found the groups again for each plan rule (24-36 s each, a stored file each): a
    plan only orders them. `dedup` and every plan read one stored result; each plan's keeper is
    first and the scores are against it."""
    import functools
    import time as clock

    from simsiam_embed.explore import stored

    paths = distinct_images(tmp_path / "images", 8)
    copy = paths[0].parent / "copy-of-first.png"
    shutil.copyfile(paths[0], copy)
    os.utime(copy, ns=(clock.time_ns() - 10**12,) * 2)   # the copy is the older file
    build_pixel_index(tmp_path / "images", tmp_path / "index")
    calls = []
    compute, result_type = stored.ANALYSES["duplicates"]

    @functools.wraps(compute)
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return compute(*args, **kwargs)

    monkeypatch.setitem(stored.ANALYSES, "duplicates", (counted, result_type))
    loaded = load_index(tmp_path / "index", for_search=False)
    first = stored.analysis(loaded, "duplicates", plan="keep-first")
    oldest = stored.analysis(loaded, "duplicates", plan="keep-oldest")
    plain = stored.analysis(loaded, "duplicates")
    assert len(calls) == 1 and calls[0].get("plan") is None
    assert len(list((loaded.generation / stored.STORE_FOLDER).glob("duplicates-*.json"))) == 1
    assert stored.asks_for_defaults("duplicates", {"plan": "keep-oldest"})   # the app may read what dedup stored
    [group_first], [group_oldest], [group_plain] = first.groups, oldest.groups, plain.groups
    assert [m.path for m in group_first.members] == sorted(str(p) for p in (paths[0], copy))
    assert group_oldest.members[0].path == str(copy) and oldest.plan == "keep-oldest"
    assert [m.action for m in group_oldest.members] == ["keep", "remove"] and plain.plan is None
    assert all(m.action == "" for m in group_plain.members)
    assert group_oldest.members[0].score == 1.0


def test_dedup_records_the_users_decisions_from_the_command_line(tmp_path):
    from conftest import indexed_folder_with_a_copy

    paths = indexed_folder_with_a_copy(tmp_path, 12)
    copy = paths[0].parent / "copy-of-first.png"
    kept = invoke("dedup", "--plan", "keep-first", "--keep", str(paths[0]), "--json", cwd=tmp_path)
    assert kept.exit_code == 0, kept.output
    assert json.loads((tmp_path / "explore" / "plan.json").read_text())["keep"] == [str(paths[0])]
    assert "keeping" in kept.stderr and json.loads(kept.stdout)["groups"][0]["members"][0]["chosen"]
    assert str(copy) < str(paths[0])   # keep-first alone would keep the copy

    set_aside = invoke("dedup", "--not-duplicate", "1", "--json", cwd=tmp_path)
    assert set_aside.exit_code == 0 and json.loads(set_aside.stdout)["groups"] == []
    assert invoke("dedup", "--json", cwd=tmp_path).stdout.count('"set_aside"') == 1
    assert len(json.loads(invoke("dedup", "--json", cwd=tmp_path).stdout)["set_aside"]) == 1
    back = invoke("dedup", "--is-duplicate", "1", "--json", cwd=tmp_path)
    assert len(json.loads(back.stdout)["groups"]) == 1

    for args, words in ((["--not-duplicate", "9"], "no duplicate group 9"),
                        (["--keep", str(paths[5])], "is in no duplicate group")):
        wrong = invoke("dedup", *args, cwd=tmp_path)
        assert wrong.exit_code != 0 and words in wrong.output
        assert len([line for line in wrong.output.splitlines() if line.startswith("Error")]) == 1
