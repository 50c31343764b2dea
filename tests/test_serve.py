"""The web app's JSON API through FastAPI's test client: search, the explore views, and its rules
(catalogue ids only, upload limits, the safe decoder, loopback names, live generations)."""

from __future__ import annotations

import functools
import io
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra (in [dev]) is not installed")
from conftest import build_pixel_index, distinct_images, indexed_folder_with_a_copy, invoke  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from test_explore import write_metrics  # noqa: E402

from simsiam_embed.explore import serve as serve_module  # noqa: E402
from simsiam_embed.explore.serve import LOOPBACK_NAMES, create_app  # noqa: E402
from simsiam_embed.workspace import Workspace  # noqa: E402

UPLOAD_LIMIT = 200_000


@pytest.fixture
def served(tmp_path: Path):
    paths = indexed_folder_with_a_copy(tmp_path, 20)
    app = create_app(tmp_path / "index", Workspace(tmp_path), UPLOAD_LIMIT, LOOPBACK_NAMES)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, tmp_path, paths


def id_of(client: TestClient, path: Path) -> int:
    hits = client.post("/api/search?k=21", files={"file": ("q.png", path.read_bytes(), "image/png")}).json()["hits"]
    return next(hit["id"] for hit in hits if hit["path"] == str(path))


def test_an_uploaded_image_finds_itself_first(served):
    client, _, paths = served
    status = client.get("/api/status").json()
    assert status["images"] == 21 and status["generation"] == "gen-000001"
    answer = client.post("/api/search?k=5", files={"file": ("query.png", paths[3].read_bytes(), "image/png")})
    assert answer.status_code == 200, answer.text
    hits = answer.json()["hits"]
    assert len(hits) == 5 and hits[0]["path"] == str(paths[3]) and hits[0]["score"] > 0.9999
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5]


def test_search_by_id_leaves_the_query_out(served):
    client, _, paths = served
    query = id_of(client, paths[0])
    answer = client.get(f"/api/search/{query}?k=3").json()
    assert answer["query"]["path"] == str(paths[0])
    assert query not in [hit["id"] for hit in answer["hits"]] and len(answer["hits"]) == 3
    assert answer["hits"][0]["path"].endswith("copy-of-first.png") and answer["hits"][0]["score"] > 0.9999
    assert client.get("/api/search/99999").status_code == 404


@pytest.mark.parametrize("url", [
    "/api/images/../../../../etc/passwd", "/api/images/..%2F..%2F..%2Fetc%2Fpasswd", "/api/images/%2Fetc%2Fpasswd",
    "/api/thumbnails/..%2F..%2Fetc%2Fpasswd", "/api/images/-1", "/api/images/99999", "/api/images/1e3",
    "/etc/passwd", "/api/images/0x1",
])
def test_files_are_served_by_catalogue_id_only(served, url):
    client, _, _ = served
    answer = client.get(url)
    assert answer.status_code == 404, (url, answer.status_code)
    assert b"root:" not in answer.content


def test_an_indexed_image_and_its_cached_preview_are_served_by_id(served):
    client, workspace, paths = served
    image_id = id_of(client, paths[2])
    original = client.get(f"/api/images/{image_id}")
    assert original.status_code == 200 and original.content == paths[2].read_bytes()
    assert original.headers["content-type"] == "image/png"
    preview = client.get(f"/api/thumbnails/{image_id}")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
    cached = list((workspace / "index" / "thumbnails").rglob("*.jpg"))
    assert len(cached) == 1
    cached[0].write_bytes(b"from the cache")   # a second request is answered from the file, not made again
    assert client.get(f"/api/thumbnails/{image_id}").content == b"from the cache"


def test_uploads_over_the_limit_are_refused_with_413(served):
    client, _, _ = served
    big = b"\0" * (UPLOAD_LIMIT + 100_000)
    assert client.post("/api/search", files={"file": ("big.png", big, "image/png")}).status_code == 413

    def chunks():   # no Content-Length: refused as the body streams past the limit
        yield (b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(40):
            yield b"\0" * 10_000
        yield b"\r\n--x--\r\n"

    answer = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert answer.status_code == 413


def test_a_decompression_bomb_and_a_non_image_are_refused(served):
    client, _, _ = served
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")   # 400 megapixels in a few kilobytes
    assert len(bomb.getvalue()) < UPLOAD_LIMIT
    answer = client.post("/api/search", files={"file": ("bomb.png", bomb.getvalue(), "image/png")})
    assert answer.status_code == 422 and "too many pixels" in answer.json()["detail"]
    answer = client.post("/api/search", files={"file": ("notes.png", b"not an image at all", "image/png")})
    assert answer.status_code == 422 and "not an image" in answer.json()["detail"]


def test_requests_for_another_host_name_are_refused(served):
    client, _, _ = served
    # A page on evil.example whose name rebinds to 127.0.0.1 sends its own name as Host.
    assert client.get("/api/status", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/api/status", headers={"host": "localhost:8765"}).status_code == 200
    assert client.get("/api/status", headers={"host": "[::1]:8765"}).status_code == 200
    assert client.get("/api/status", headers={"host": "127.0.0.1.evil.example"}).status_code == 400


def test_duplicates_clusters_outliers_and_map(served):
    client, folder, paths = served
    duplicates = client.get("/api/duplicates").json()
    assert duplicates["total_groups"] == 1
    assert {m["path"] for m in duplicates["groups"][0]["members"]} == {str(paths[0]), str(paths[0].parent / "copy-of-first.png")}
    clusters = client.get("/api/clusters?k=3").json()
    assert clusters["k"] == 3 and sum(c["size"] for c in clusters["clusters"]) == 21
    assert client.get("/api/clusters?k=500").status_code == 422
    # Each cluster whole, a page at a time, nearest its centre first: together, every image once.
    assert all(c["member_ids"] == [] for c in clusters["clusters"])   # the listing stays small
    every = []
    for cluster in clusters["clusters"]:
        first = client.get(f"/api/clusters/{cluster['number']}?k=3&limit=5").json()
        rest = client.get(f"/api/clusters/{cluster['number']}?k=3&offset=5&limit=1000").json()
        members = first["members"] + rest["members"]
        assert len(members) == cluster["size"] and len(first["members"]) == min(5, cluster["size"])
        assert [m["id"] for m in members[:len(cluster["nearest"])]] == [image["id"] for image in cluster["nearest"]]
        every += [m["path"] for m in members]
    assert sorted(every) == sorted(str(path) for path in (folder / "images").iterdir())
    assert client.get("/api/clusters/4?k=3").status_code == 404
    whole = client.get("/api/clusters?k=3&members=true").json()
    assert sum(len(c["member_ids"]) for c in whole["clusters"]) == 21
    outliers = client.get("/api/outliers?count=4").json()
    assert len(outliers["outliers"]) == 4 and outliers["images"] == 21
    assert len(client.get("/api/map").json()["points"]) == 21


def test_the_page_and_the_openapi_docs_are_served_from_the_package(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    for asset in ("/static/app.js", "/static/map.js", "/static/app.css"):
        assert client.get(asset).status_code == 200, asset
    assert "function drawMap" in client.get("/static/map.js").text
    schema = client.get("/openapi.json").json()
    for path in ("/api/search", "/api/search/{image_id}", "/api/duplicates", "/api/clusters", "/api/outliers",
                 "/api/images/{image_id}/facts", "/api/plan"):
        assert path in schema["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/swagger-ui/swagger-ui-bundle.js" in docs.text
    # Nothing the pages name lives on another host (Swagger UI's default loads from a CDN).
    assert "http://" not in docs.text and "https://" not in docs.text and '"validatorUrl": null' in docs.text
    assert "https://" not in page.text and client.get("/static/swagger-ui/swagger-ui-bundle.js").status_code == 200
    assert client.get("/redoc").status_code == 404   # ReDoc would load from a CDN too


def test_an_images_facts_come_from_the_catalogue_and_its_header(served):
    client, _, paths = served
    image_id = id_of(client, paths[3])
    facts = client.get(f"/api/images/{image_id}/facts").json()
    assert facts["path"] == str(paths[3]) and facts["name"] == paths[3].name and facts["folder"] == str(paths[3].parent)
    assert (facts["width"], facts["height"], facts["format"]) == (*Image.open(paths[3]).size, "PNG")
    assert facts["bytes"] == paths[3].stat().st_size and facts["present"] and facts["modified"].startswith("20")
    paths[3].write_bytes(b"changed")
    changed = client.get(f"/api/images/{image_id}/facts").json()
    assert not changed["present"] and changed["width"] is None
    assert client.get("/api/images/../../etc/passwd/facts").status_code == 404


def test_the_apps_plan_is_the_dedup_plan_with_the_users_keeper_checked_on_disk(served):
    client, folder, paths = served
    copy = paths[0].parent / "copy-of-first.png"
    plan = client.post("/api/plan", json={"plan": "keep-first"}).json()
    assert plan["plan"] == {"plan": "keep-first", "keep": [str(copy)],
                            "remove": [{"path": str(paths[0]), "duplicate_of": str(copy), "group": 1, "score": 1.0}]}
    assert plan["csv"].splitlines() == ["action,path,group,duplicate_of", f"keep,{copy},1,",
                                        f"remove,{paths[0]},1,{copy}"] and plan["notes"] == []
    # The same files `dedup --plan keep-first` writes.
    assert invoke("dedup", "--plan", "keep-first", "--output", str(folder / "out"), cwd=folder).exit_code == 0
    assert json.loads((folder / "out" / "plan.json").read_text()) == plan["plan"]
    assert (folder / "out" / "plan.csv").read_bytes().decode() == plan["csv"]

    # The user keeps the other one instead.
    chosen = client.post("/api/plan", json={"plan": "keep-first", "keepers": {"1": id_of(client, paths[0])}}).json()
    assert chosen["plan"]["keep"] == [str(paths[0])] and chosen["plan"]["remove"][0]["path"] == str(copy)
    # A keeper deleted since indexing: the plan keeps the copy left and says so; never removes the last one.
    paths[0].unlink()
    checked = client.post("/api/plan", json={"plan": "keep-first", "keepers": {"1": id_of(client, copy)}}).json()
    assert checked["plan"]["keep"] == [] and checked["plan"]["remove"] == []
    assert "left out of the plan" in checked["notes"][0]
    for body, words in (({"plan": "keep-everything"}, "no plan"), ({"keepers": {"7": 1}}, "no duplicate group 7"),
                        ({"keepers": {"1": 99999}}, "not in duplicate group 1"), ({"keepers": {"x": 1}}, "group numbers")):
        answer = client.post("/api/plan", json=body)
        assert answer.status_code == 422 and words in answer.json()["detail"], (body, answer.text)


def test_a_new_generation_is_picked_up_while_searches_go_on(served):
    client, workspace, paths = served
    errors: list[str] = []
    stop = threading.Event()

    def search_until_stopped():
        while not stop.is_set():
            answer = client.post("/api/search?k=3", files={"file": ("q.png", paths[5].read_bytes(), "image/png")})
            if answer.status_code != 200:
                errors.append(f"{answer.status_code} {answer.text}")

    searcher = threading.Thread(target=search_until_stopped)
    searcher.start()
    try:
        for round_number in range(3):   # three updates, each adding images, while searches run
            distinct_images(workspace / "images" / f"added-{round_number}", 4, seed=10 + round_number)
            build_pixel_index(workspace / "images", workspace / "index", workspace / "pixel-encoder.onnx")
    finally:
        stop.set()
        searcher.join()
    assert errors == []
    status = client.get("/api/status").json()
    assert status["generation"] == "gen-000004" and status["images"] == 33
    hits = client.post("/api/search?k=1", files={"file": ("q.png", (workspace / "images" / "added-2" / "image-000.png")
                                                           .read_bytes(), "image/png")}).json()["hits"]
    assert hits[0]["path"].endswith("added-2/image-000.png")


def test_the_latest_runs_report(served):
    client, workspace, _ = served
    assert client.get("/api/report").status_code == 404   # no run yet
    write_metrics(workspace / "runs" / "images", knn=True)
    (workspace / "runs" / "images" / "checkpoint.pt").write_bytes(b"")
    (workspace / "runs" / "LATEST").write_text("images\n")
    report = client.get("/api/report").json()
    assert report["run"] == "images" and report["charts"] == ["loss", "lr", "z_std", "knn"]
    chart = client.get("/api/report/z_std.png")
    assert chart.status_code == 200 and chart.content.startswith(b"\x89PNG")
    assert client.get("/api/report/passwd.png").status_code == 404


def test_serve_warns_in_one_line_when_listening_beyond_loopback(served, monkeypatch, capsys):
    _, workspace, _ = served
    ran = []
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets: ran.append(sockets[0].getsockname()))
    messages: list[str] = []
    serve_module.serve(workspace / "index", Workspace(workspace), host="0.0.0.0", port=0, report=messages.append)
    assert messages[0].startswith("warning: listening on 0.0.0.0") and "\n" not in messages[0]
    assert ran and ran[0][1] > 0 and f":{ran[0][1]}/" in messages[1]
    messages.clear()
    connected = []

    def connect_once_printed(self, sockets):
        # The URL is printed before the server runs: it must already accept connections then.
        with socket.create_connection(sockets[0].getsockname(), timeout=5):
            connected.append(True)

    monkeypatch.setattr("uvicorn.Server.run", connect_once_printed)
    serve_module.serve(workspace / "index", Workspace(workspace), host="127.0.0.1", port=0, report=messages.append)
    assert len(messages) == 1 and messages[0].startswith("serving 21 images") and connected == [True]


def test_serve_without_an_index_says_how_to_make_one(tmp_path):
    answer = invoke("serve", "--port", "0", cwd=tmp_path)
    assert answer.exit_code != 0 and "simsiam-embed index" in answer.output


def test_an_index_of_one_image_answers_422_with_the_reason(tmp_path):
    distinct_images(tmp_path / "images", 1)
    build_pixel_index(tmp_path / "images", tmp_path / "index")
    with TestClient(create_app(tmp_path / "index"), base_url="http://127.0.0.1") as client:
        for url in ("/api/duplicates", "/api/clusters", "/api/outliers"):
            answer = client.get(url)
            assert answer.status_code == 422 and "one image" in answer.json()["detail"], url
        assert client.get("/api/search/0").json()["hits"] == []


def test_a_catalog_naming_another_file_serves_nothing_of_it(served):
    """An index received from someone else can name any path in its catalog: only a file whose
    bytes have the digest the catalog recorded is ever read out (image or preview)."""
    import sqlite3

    client, workspace, paths = served
    secret = workspace / "private" / "secret.png"
    secret.parent.mkdir()
    shutil.copyfile(paths[4], secret)
    secret.write_bytes(secret.read_bytes() + b"not what was indexed")
    image_id = id_of(client, paths[4])
    catalog = sqlite3.connect(workspace / "index" / "gen-000001" / "catalog.sqlite")
    catalog.execute("UPDATE images SET path = ? WHERE id = ?", (str(secret), image_id))
    catalog.commit()
    catalog.close()
    app = create_app(workspace / "index", Workspace(workspace), UPLOAD_LIMIT, LOOPBACK_NAMES)
    with TestClient(app, base_url="http://127.0.0.1") as fresh:
        for url in (f"/api/images/{image_id}", f"/api/thumbnails/{image_id}"):
            answer = fresh.get(url)
            assert answer.status_code == 404 and b"not what was indexed" not in answer.content, url
        assert fresh.get(f"/api/images/{id_of(fresh, paths[2])}").status_code == 200   # the rest still serve


def test_a_file_changed_since_indexing_is_not_served_until_indexed_again(served):
    client, _, paths = served
    image_id = id_of(client, paths[6])
    paths[6].write_bytes(paths[6].read_bytes() + b"\0")
    answer = client.get(f"/api/images/{image_id}")
    assert answer.status_code == 404 and "simsiam-embed index" in answer.json()["detail"]


def test_serve_takes_the_index_folder_as_the_issue_names_it(served, monkeypatch):
    _, workspace, _ = served
    started = []
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets: started.append(True))
    answer = invoke("serve", "--index", str(workspace / "index"), "--port", "0", cwd=workspace.parent)
    assert answer.exit_code == 0, answer.output
    assert started == [True] and "serving 21 images" in answer.stderr


def test_serve_answers_with_what_the_explore_commands_computed(tmp_path, monkeypatch):
    """serve recomputed every analysis and shaped its own JSON: one computation, one shape now."""
    from simsiam_embed.explore import stored

    indexed_folder_with_a_copy(tmp_path, 20)
    from_command = {}
    for command, kind in (("dedup", "duplicates"), ("clusters", "clusters"), ("outliers", "outliers"), ("map", "map")):
        answer = invoke(command, "--json", cwd=tmp_path)
        assert answer.exit_code == 0, answer.output
        from_command[kind] = json.loads(answer.stdout)

    def never(compute):
        @functools.wraps(compute)   # the same signature: the same defaults, the same stored answer
        def computed_again(*_args, **_kwargs):
            raise AssertionError(f"{compute.__name__} computed again")
        return computed_again

    for kind, (compute, result_type) in stored.ANALYSES.items():
        monkeypatch.setitem(stored.ANALYSES, kind, (never(compute), result_type))
    app = create_app(tmp_path / "index", Workspace(tmp_path), UPLOAD_LIMIT, LOOPBACK_NAMES)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        # Clusters with every member's id, as the command writes them (the app's listing leaves them out).
        for kind, route in (("duplicates", "/api/duplicates"), ("clusters", "/api/clusters?members=true"),
                            ("outliers", "/api/outliers"), ("map", "/api/map")):
            answer = client.get(route)
            assert answer.status_code == 200, answer.text
            assert answer.json() == from_command[kind], kind
        listing = client.get("/api/clusters").json()
        for cluster in from_command["clusters"]["clusters"]:
            cluster["member_ids"] = []
        assert listing == from_command["clusters"]


def test_a_stored_result_that_does_not_fit_the_index_is_computed_again(tmp_path, monkeypatch):
    from simsiam_embed.explore import stored
    from simsiam_embed.explore.stored import analysis
    from simsiam_embed.index.store import load_index

    paths = indexed_folder_with_a_copy(tmp_path, 20)
    loaded = load_index(tmp_path / "index", for_search=False)
    first = analysis(loaded, "duplicates")
    (path,) = (loaded.generation / "analyses").glob("duplicates-*.json")
    assert path.is_file() and len(first.groups) == 1
    original = path.read_text()
    # An id not in the catalogue, a value of the wrong type, a file's facts that are not its own.
    for key, value in (("id", 10 ** 9), ("id", "x"), ("mtime_ns", 1)):
        data = json.loads(original)
        data["result"]["groups"][0]["members"][0][key] = value
        path.write_text(json.dumps(data))
        again = analysis(loaded, "duplicates")
        assert [m.path for m in again.groups[0].members] == [m.path for m in first.groups[0].members], key
        assert json.loads(path.read_text())["result"] == json.loads(original)["result"], key
    # A changed file: the stored evidence no longer holds, and the group is found again.
    computed = []
    find, result_type = stored.ANALYSES["duplicates"]
    monkeypatch.setitem(stored.ANALYSES, "duplicates",
                        (functools.wraps(find)(lambda *a, **k: computed.append(1) or find(*a, **k)), result_type))
    analysis(loaded, "duplicates")
    assert computed == []
    paths[0].write_bytes(paths[0].read_bytes() + b"\0")
    analysis(loaded, "duplicates")
    assert computed == [1]


def test_requests_from_other_sites_start_no_work_and_write_nothing(served):
    client, folder, _ = served
    analyses = lambda: sorted(p.name for p in (folder / "index").rglob("analyses/*.json"))  # noqa: E731
    before = analyses()
    for headers in ({"origin": "https://evil.example"}, {"origin": "http://localhost:3000"},
                    {"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}):
        refused = client.get("/api/duplicates?threshold=0.5", headers=headers)
        assert refused.status_code == 403, headers
        assert client.post("/api/plan", json={"plan": "keep-largest"}, headers=headers).status_code == 403
    assert analyses() == before
    # The app's own page (same origin, as a browser sends it) and clients that are not browsers.
    assert client.get("/api/status", headers={"origin": "http://127.0.0.1", "sec-fetch-site": "same-origin"}).status_code == 200
    assert client.get("/api/status").status_code == 200


def test_a_get_with_settings_of_its_own_is_answered_but_stores_nothing(served):
    client, folder, _ = served
    analyses = lambda: sorted(p.name for p in (folder / "index").rglob("analyses/*.json"))  # noqa: E731
    client.get("/api/duplicates")   # the default rule: stored, as `dedup` stores it
    stored = analyses()
    assert len(stored) == 1
    for threshold in (0.5, 0.6, 0.7):
        assert client.get(f"/api/duplicates?threshold={threshold}").status_code == 200
    assert client.get("/api/clusters?k=2").status_code == 200
    assert analyses() == stored


def test_a_body_that_is_not_json_is_refused(served):
    client, _, _ = served
    answer = client.post("/api/plan", content='{"plan": "keep-largest"}', headers={"content-type": "text/plain"})
    assert answer.status_code == 415
    assert client.post("/api/plan", json={"plan": "keep-largest"}).status_code == 200


@pytest.mark.parametrize("threshold", ["NaN", "1e999", "-Infinity"])
def test_a_threshold_that_is_not_a_finite_number_is_422_not_500(served, threshold):
    client, _, _ = served
    answer = client.post("/api/plan", content=f'{{"plan": "keep-largest", "threshold": {threshold}}}',
                         headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert client.get(f"/api/duplicates?threshold={threshold.lower()}").status_code == 422


@pytest.mark.parametrize("url", ["/api/search/{}", "/api/images/{}", "/api/thumbnails/{}", "/api/images/{}/facts"])
def test_an_id_beyond_any_integer_the_catalog_holds_is_404_not_500(served, url):
    client, _, _ = served
    for image_id in ("99999999999999999999999", str(2**63), "9223372036854775807"):
        assert client.get(url.format(image_id)).status_code == 404


def test_decisions_are_kept_by_digest_through_a_rerun_and_an_index_update(served):
    """Nothing let the user say "not a duplicate", and a chosen keeper lived in one page's memory."""
    client, folder, paths = served
    copy = paths[0].parent / "copy-of-first.png"
    group = client.get("/api/duplicates").json()["groups"][0]
    assert {m["path"] for m in group["members"]} == {str(paths[0]), str(copy)}

    # Keep the file the default plan would remove: the app, `dedup --plan` and the exported plan agree.
    default_keeper = client.get("/api/duplicates?plan=keep-first").json()["groups"][0]["members"][0]
    other = next(m for m in group["members"] if m["id"] != default_keeper["id"])
    assert client.post("/api/duplicates/1/decision", json={"keep": other["id"]}).status_code == 200
    shown = client.get("/api/duplicates?plan=keep-first").json()["groups"][0]["members"][0]
    assert shown["path"] == other["path"] and shown["chosen"] and shown["action"] == "keep"
    assert client.post("/api/plan", json={"plan": "keep-first"}).json()["plan"]["keep"] == [other["path"]]
    answer = invoke("dedup", "--plan", "keep-first", "--json", "--output", str(folder / "out"), cwd=folder)
    assert json.loads((folder / "out" / "plan.json").read_text())["keep"] == [other["path"]], answer.output

    # Not a duplicate: set aside everywhere, through a new index generation (new ids) too.
    assert client.post("/api/duplicates/1/decision", json={"not_duplicate": True}).status_code == 200
    distinct_images(folder / "images" / "added", 3, seed=40)
    build_pixel_index(folder / "images", folder / "index", folder / "pixel-encoder.onnx")
    answer = client.get("/api/duplicates?plan=keep-first").json()
    assert answer["groups"] == [] and [len(g["members"]) for g in answer["set_aside"]] == [2]
    result = invoke("dedup", "--plan", "keep-first", "--json", "--output", str(folder / "out"), cwd=folder)
    assert json.loads(result.stdout)["groups"] == [] and "1 group you said is not a duplicate" in result.stderr
    assert json.loads((folder / "out" / "plan.json").read_text())["remove"] == []
    # Undone: the group is back.
    assert client.post("/api/duplicates/1/decision", json={"not_duplicate": False}).status_code == 200
    assert len(client.get("/api/duplicates").json()["groups"]) == 1


def test_a_decision_about_an_unknown_group_or_image_is_4xx_and_a_damaged_file_one_line(served):
    client, folder, paths = served
    for url, body, status, words in (("/api/duplicates/7/decision", {"not_duplicate": True}, 404, "no duplicate group 7"),
                                     ("/api/duplicates/1/decision", {"keep": 99999}, 404, "not in duplicate group 1"),
                                     ("/api/duplicates/1/decision", {}, 422, "either keep"),
                                     ("/api/duplicates/1/decision", {"keep": 1, "not_duplicate": True}, 422, "either keep")):
        answer = client.post(url, json=body)
        assert answer.status_code == status and words in answer.json()["detail"], (body, answer.text)
    (folder / "index" / "dedup-decisions.json").write_text('{"format": 1, "decisions": {"keepers": ["../x"]}}')
    answer = client.get("/api/duplicates")
    assert answer.status_code == 422 and "dedup-decisions.json is damaged" in answer.json()["detail"]
    result = invoke("dedup", cwd=folder)
    assert result.exit_code != 0 and "dedup-decisions.json is damaged" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
