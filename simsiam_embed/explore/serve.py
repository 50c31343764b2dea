"""The local web app and its JSON API (FastAPI) over an index folder.

    $ simsiam-embed serve            # http://127.0.0.1:8765, API docs at /docs

What it promises:
- It listens on loopback unless told otherwise, and then only answers requests addressed to a
  loopback name (a web page elsewhere cannot reach it through DNS rebinding).
- Image files are served only by catalogue id, never by a path from the client, and only while
  their bytes are those the index recorded (a received index's catalog cannot point it elsewhere).
- Uploads are read up to a size limit and decoded by the same safe decoder as every image
  (decompression bombs refused); nothing of an upload is kept after its request.
- ``index`` may update the folder while it serves: each request reads ``CURRENT`` and the new
  generation is picked up; a request in flight keeps the generation it started with.
- Previews are made once and cached in the index folder (:mod:`.thumbnails`).
- Only its own pages and non-browser clients are answered: a page on another site cannot make
  the user's browser start work here (:class:`_SameOriginOnly`), and no request can make it
  write a file for each value it sends (analyses of other settings stay in memory).
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import threading
from collections import OrderedDict
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import Body, FastAPI, File, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.middleware.trustedhost import TrustedHostMiddleware

from simsiam_embed.image_files import UnreadableImage, open_image
from simsiam_embed.inference.embed import Encoder
from simsiam_embed.errors import Report, UserError
from simsiam_embed.explore.duplicates import choose_keepers, confirm_plan
from simsiam_embed.explore.pages import plan_csv, plan_json
from simsiam_embed.explore.results import AnalysisResult
from simsiam_embed.explore.decisions import decide, keep_file, not_a_duplicate
from simsiam_embed.explore.stored import analysis, asks_for_defaults, decided
from simsiam_embed.index.store import LoadedIndex, current_generation, load_index
from simsiam_embed.explore.report import (
    CHART_NAMES, available_charts, build_chart, read_run_metrics, read_run_config, run_dimension, run_summary,
)
from simsiam_embed.index.search import encoder_of_index, nearest_hits
from simsiam_embed.index.thumbnails import cached_thumbnail, indexed_bytes
from simsiam_embed.settings import PLANS
from simsiam_embed.workspace import Workspace

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 200
#: Files a browser shows as they are; any other format is re-encoded as PNG to be shown.
BROWSER_FORMATS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                   ".webp": "image/webp", ".bmp": "image/bmp"}
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
#: Results of settings other than the defaults, kept in memory (the latest this many) and never stored.
MEMORY_ANALYSES = 16
#: Request bodies the API reads; any other (text/plain, a form) is what a page elsewhere can send
#: without the browser asking first.
BODY_TYPES = ("application/json", "multipart/form-data")
#: The page, its script and style, and Swagger UI for /docs: all served from the package, so the
#: app works with no network and no request leaves the machine (FastAPI's /docs uses a CDN).
STATIC = Path(__file__).parent / "static"


class LiveIndex:
    """The index folder's live generation, reloaded when ``CURRENT`` moves on.

    Loading happens under a lock, so a burst of requests after an update loads once; requests
    already holding the previous :class:`LoadedIndex` finish with it (its files are kept until
    the update after next, and what was read stays valid while they run).
    """

    def __init__(self, index_dir: Path, provider: str | None = None, engine_cache: Path | None = None):
        self.index_dir = index_dir
        self.provider = provider
        self.engine_cache = engine_cache
        self._lock = threading.Lock()
        # Analyses take seconds on a large index: under their own lock, so searches go on meanwhile.
        self._analysis_lock = threading.Lock()
        self._loaded: LoadedIndex | None = None
        self._encoder: tuple[str, Encoder] | None = None
        self._positions: tuple[Path, dict[int, int]] | None = None
        self._analyses: OrderedDict[tuple, Any] = OrderedDict()

    def current(self) -> LoadedIndex:
        generation = current_generation(self.index_dir)
        loaded = self._loaded
        if loaded is not None and loaded.generation == generation:
            return loaded
        with self._lock:
            if self._loaded is None or self._loaded.generation != current_generation(self.index_dir):
                self._loaded = load_index(self.index_dir)
                self._analyses = OrderedDict()   # results of the old generation are dropped with it
            return self._loaded

    def encoder(self, loaded: LoadedIndex) -> Encoder:
        with self._lock:
            if self._encoder is None or self._encoder[0] != loaded.manifest.encoder_digest:
                self._encoder = (loaded.manifest.encoder_digest, encoder_of_index(loaded, self.provider, self.engine_cache))
            return self._encoder[1]

    def position_of(self, loaded: LoadedIndex, image_id: int) -> int | None:
        with self._lock:
            if self._positions is None or self._positions[0] != loaded.generation:
                self._positions = (loaded.generation, {int(i): p for p, i in enumerate(loaded.ids)})
            return self._positions[1].get(image_id)

    def analysis(self, loaded: LoadedIndex, kind: str, **asked: Any) -> AnalysisResult:
        """The explore commands' result for this generation (:mod:`.stored`: computed by whoever
        asked first), kept in memory too: every visit of a page asks again. ``asked``: None is the
        analysis's default.

        Only the defaults' result is stored in the index folder, as the explore commands store it:
        a request must not make the server write a file for each value it sends (a GET that
        writes, minutes of CPU each on a large index); other settings stay in memory, a few.
        """
        settings = {name: value for name, value in asked.items() if value is not None}
        with self._analysis_lock:
            cache_key = (loaded.generation, kind, *sorted(settings.items()))
            if cache_key in self._analyses:
                self._analyses.move_to_end(cache_key)
                result = self._analyses[cache_key]
            else:
                result = analysis(loaded, kind, store=asks_for_defaults(kind, settings), with_user_decisions=False,
                                  **settings)
                self._analyses[cache_key] = result
                while len(self._analyses) > MEMORY_ANALYSES:
                    self._analyses.popitem(last=False)
        # The user's decisions change between requests; what was found does not.
        return decided(loaded, result) if kind == "duplicates" else result


def create_app(index_dir: Path, workspace: Workspace | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, allowed_hosts: list[str] | None = None,
               provider: str | None = None):
    """The FastAPI application. ``allowed_hosts``: Host header values answered (None: any)."""

    live = LiveIndex(index_dir, provider, workspace.engine_cache_dir if workspace is not None else None)
    app = FastAPI(title="simsiam-embed", summary="Search, duplicates, clusters and outliers of an image index.",
                  version="1", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(_BodySizeLimit, max_bytes=max_upload_bytes)
    app.add_middleware(_SameOriginOnly)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer quotes each input, which may not be JSON (NaN, an infinity): a 500.
        return JSONResponse({"detail": [{"loc": list(problem["loc"]), "msg": problem["msg"], "type": problem["type"]}
                                        for problem in error.errors()]}, status_code=422)

    @app.exception_handler(UserError)
    async def user_error(_request, error: UserError) -> JSONResponse:
        # What the command line says in one line (an index of one image has no clusters, ...).
        return JSONResponse({"detail": str(error)}, status_code=422)

    def index_now() -> LoadedIndex:
        try:
            return live.current()
        except UserError as error:
            raise HTTPException(503, str(error)) from None

    def entry_or_404(loaded: LoadedIndex, image_id: str):
        # Taken as text and matched against the catalogue: anything else, a path included, is 404
        # (not FastAPI's 422), so no request learns more than "not in the index".
        number = int(image_id) if image_id.isdigit() and image_id.isascii() and len(image_id) <= 19 else -1
        entry = loaded.entries.get(number) if 0 <= number < 2**63 else None   # SQLite's integers are int64
        if entry is None:
            raise HTTPException(404, "no such image in the index")
        return entry

    def known_plan(plan: str) -> None:
        if plan not in PLANS:
            raise HTTPException(422, f"there is no plan {plan!r}: choose one of {', '.join(PLANS)}")

    def hits_for(loaded: LoadedIndex, vector: np.ndarray, k: int, leave_out_id: int | None = None) -> list[dict]:
        leave_out = [lambda entry: entry.id == leave_out_id] if leave_out_id is not None else None
        return [asdict(hit) for hit in nearest_hits(loaded, vector.reshape(1, -1), k, leave_out)[0]]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (STATIC / "app.html").read_text()

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        # validatorUrl None: Swagger UI would otherwise send the schema to validator.swagger.io.
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="simsiam-embed API",
                                   swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/api/status", summary="What the index holds")
    def status() -> dict:
        loaded = index_now()
        manifest = loaded.manifest
        return {"images": loaded.count, "generation": loaded.generation.name, "dim": manifest.dim,
                "index_type": manifest.index_type, "image_dir": manifest.image_dir, "updated": manifest.updated,
                "max_upload_bytes": max_upload_bytes}

    @app.post("/api/search", summary="Search by an uploaded image")
    def search_upload(file: UploadFile = File(..., description="The query image"),
                      k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        loaded = index_now()
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"the image is larger than {max_upload_bytes} bytes")
        try:
            vector = _embed_upload(data, live.encoder(loaded))
        except UnreadableImage as reason:
            raise HTTPException(422, f"cannot read the uploaded image: {reason}") from None
        return {"query": {"upload": file.filename or "upload"}, "hits": hits_for(loaded, vector, k)}

    @app.get("/api/search/{image_id}", summary="Search from an indexed image")
    def search_by_id(image_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        loaded = index_now()
        entry = entry_or_404(loaded, image_id)
        position = live.position_of(loaded, entry.id)
        vector = np.asarray(loaded.vectors[position], dtype=np.float32)
        return {"query": {"id": entry.id, "path": entry.path, "label": entry.label},
                "hits": hits_for(loaded, vector, k, leave_out_id=entry.id)}

    @app.get("/api/images/{image_id}", summary="An indexed image file, by catalogue id")
    def image_file(image_id: str):
        entry = entry_or_404(index_now(), image_id)
        data = indexed_bytes(entry)
        if data is None:
            raise HTTPException(404, f"image {entry.id} is gone or changed since it was indexed: run `simsiam-embed index`")
        media_type = BROWSER_FORMATS.get(Path(entry.path).suffix.lower())
        if media_type is not None:
            return Response(data, media_type=media_type)
        try:
            image = open_image(io.BytesIO(data))
        except UnreadableImage as reason:
            raise HTTPException(404, f"image {entry.id} cannot be read: {reason}") from None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @app.get("/api/images/{image_id}/facts", summary="What the catalogue and the file say about an indexed image")
    def image_facts(image_id: str) -> dict:
        entry = entry_or_404(index_now(), image_id)
        data = indexed_bytes(entry)
        width = height = image_format = None
        if data is not None:
            try:   # the header only: no pixel is decoded
                with Image.open(io.BytesIO(data)) as image:
                    (width, height), image_format = image.size, image.format
            except (OSError, ValueError, Image.DecompressionBombError):
                pass
        try:   # a received catalogue may hold any int64; Windows refuses dates before 1970
            modified = datetime.fromtimestamp(entry.mtime_ns / 1e9, timezone.utc).isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            modified = None
        path = Path(entry.path)
        return {"id": entry.id, "path": entry.path, "name": path.name, "folder": str(path.parent), "label": entry.label,
                "bytes": entry.size, "modified": modified, "width": width, "height": height, "format": image_format,
                "present": data is not None}

    @app.get("/api/thumbnails/{image_id}", summary="A small JPEG preview of an indexed image")
    def thumbnail(image_id: str):
        loaded = index_now()
        preview = cached_thumbnail(loaded.folder, entry_or_404(loaded, image_id))
        if preview is None:
            raise HTTPException(404, "the image cannot be read now")
        return Response(preview, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/duplicates", summary="Near-duplicate and exact duplicate groups")
    def duplicates(threshold: float | None = Query(None, ge=-1.0, le=1.0, allow_inf_nan=False,
                                                   description="default: the calibrated rule"),
                   limit: int = Query(200, ge=1, le=10_000),
                   plan: str | None = Query(None, description=f"order each group's members: {', '.join(PLANS)}")) -> dict:
        loaded = index_now()
        if plan is not None:
            known_plan(plan)
        return live.analysis(loaded, "duplicates", threshold=threshold, plan=plan).to_json(limit)

    @app.post("/api/duplicates/{number}/decision", summary="Keep a file of a group, or say it is not duplicates")
    def dedup_decision(number: int, keep: int | None = Body(None, description="the id of the member to keep"),
                       not_duplicate: bool | None = Body(None, description="true: not copies; false: undo that"),
                       threshold: float | None = Body(None, ge=-1.0, le=1.0, allow_inf_nan=False)) -> dict:
        """Stored by the files' digests in the index folder (dedup-decisions.json), so they hold
        for `dedup`, for an index update and for every plan. Deletes nothing."""
        if (keep is None) == (not_duplicate is None):
            raise HTTPException(422, "give either keep (an image id) or not_duplicate (true or false)")
        loaded = index_now()
        result = live.analysis(loaded, "duplicates", threshold=threshold)
        group = next((g for g in result.groups + result.set_aside if g.number == number), None)
        if group is None:
            raise HTTPException(404, f"there is no duplicate group {number}: reload the duplicates view")
        digests = {member.digest for member in group.members}
        if keep is not None:
            member = next((m for m in group.members if m.id == keep), None)
            if member is None:
                raise HTTPException(404, f"image {keep} is not in duplicate group {number}: reload the duplicates view")
            decisions = decide(loaded.folder, keep_file(member.digest, member.path, digests))
        else:
            decisions = decide(loaded.folder, not_a_duplicate(digests, undo=not not_duplicate))
        return {"group": number, "not_duplicate_sets": len(decisions.not_duplicates), "keepers": len(decisions.keepers)}

    @app.post("/api/plan", summary="The dedup plan as `dedup --plan` writes it, with the user's keepers")
    def dedup_plan(plan: str = Body("keep-original", description=", ".join(PLANS)),
                   keepers: dict[str, int] = Body({}, description="group number -> the id of the member to keep"),
                   threshold: float | None = Body(None, ge=-1.0, le=1.0, allow_inf_nan=False)) -> dict:
        """plan.json's content and plan.csv's text, checked against the disk now (a member gone or
        changed leaves its group, a group with one left is dropped: see ``notes``). Deletes nothing."""
        known_plan(plan)
        if not all(number.isdigit() and number.isascii() for number in keepers):
            raise HTTPException(422, "keepers maps group numbers to image ids")
        result = live.analysis(index_now(), "duplicates", threshold=threshold, plan=plan)
        result = choose_keepers(result, {int(number): member for number, member in keepers.items()})
        result, notes = confirm_plan(result)
        return {"plan": plan_json(result), "csv": plan_csv(result), "notes": notes}

    @app.get("/api/clusters", summary="k-means clusters of the index")
    def clusters(k: int | None = Query(None, ge=1, le=10_000), limit: int = Query(200, ge=1, le=10_000),
                 members: bool = Query(False, description="every member's id too (n ids in all); else left empty")) -> dict:
        loaded = index_now()
        answer = live.analysis(loaded, "clusters", k=k).to_json(limit)
        if not members:   # the listing stays small at a million images; a cluster whole is paged below
            for cluster in answer["clusters"]:
                cluster["member_ids"] = []
        return answer

    @app.get("/api/clusters/{number}", summary="One cluster whole, a page at a time, nearest its centre first")
    def cluster_members(number: int, k: int | None = Query(None, ge=1, le=10_000), offset: int = Query(0, ge=0),
                        limit: int = Query(100, ge=1, le=1_000)) -> dict:
        loaded = index_now()
        result = live.analysis(loaded, "clusters", k=k)
        cluster = next((c for c in result.clusters if c.number == number), None)
        if cluster is None:
            raise HTTPException(404, f"there is no cluster {number}: the index has {len(result.clusters)}")
        page = loaded.entries.many(cluster.member_ids[offset:offset + limit])
        return {"number": number, "size": cluster.size, "offset": offset,
                "members": [{"id": entry.id, "path": entry.path, "label": entry.label} for entry in page]}

    @app.get("/api/outliers", summary="The images least similar to their nearest neighbours")
    def outliers(count: int = Query(50, ge=1, le=10_000)) -> dict:
        loaded = index_now()
        return live.analysis(loaded, "outliers", count=count).to_json()

    @app.get("/api/quality", summary="Image-quality checks: blurry, too dark or bright, tiny, near-uniform, damaged")
    def quality(limit: int = Query(1000, ge=1, le=100_000)) -> dict:
        return live.analysis(index_now(), "quality").to_json(limit)

    @app.get("/api/map", summary="A 2-D projection of the index")
    def map_points() -> dict:
        loaded = index_now()
        return live.analysis(loaded, "map").to_json()

    @app.get("/api/report", summary="The latest pretraining run's curves")
    def run_report() -> dict:
        run_dir = _latest_run(workspace)
        records = read_run_metrics(run_dir)
        charts = available_charts(records)
        return {"run": run_dir.name, "summary": run_summary(read_run_config(run_dir), records), "charts": charts}

    @app.get("/api/report/{chart}.png", summary="One chart of the latest run, as PNG")
    def run_chart(chart: str):
        if chart not in CHART_NAMES:
            raise HTTPException(404, f"no chart {chart!r}: one of {', '.join(CHART_NAMES)}")
        run_dir = _latest_run(workspace)
        drawn = build_chart(read_run_metrics(run_dir), chart, run_dimension(read_run_config(run_dir)))
        if drawn is None:
            raise HTTPException(404, f"the run has no data for the {chart} chart")
        return Response(drawn, media_type="image/png", headers={"Cache-Control": "no-store"})

    return app


def _latest_run(workspace: Workspace | None) -> Path:
    if workspace is None:
        raise HTTPException(404, "no workspace: the app was started without one")
    try:
        return workspace.latest_run_dir()
    except UserError as error:
        raise HTTPException(404, str(error)) from None


def _embed_upload(data: bytes, encoder: Encoder) -> np.ndarray:
    from simsiam_embed.index.search import embed_image

    return embed_image(io.BytesIO(data), encoder)[0]


class _BodySizeLimit:
    """Refuses a request body larger than ``max_bytes`` (plus room for the multipart framing)
    with 413, by its Content-Length or, for a chunked upload, as soon as it streams past it;
    so no upload larger than the limit is ever spooled to disk."""

    FRAMING_BYTES = 64 * 1024

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.limit = max_bytes + self.FRAMING_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_413(send, self.limit)
        received = 0
        too_large = False
        replaced = False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                too_large = True
                raise _TooLarge()
            return message

        async def replacing_send(message):
            # The app may turn the interrupted body into its own error (FastAPI answers 400 "error
            # parsing the body"): whatever it answers, the client is told what happened.
            nonlocal replaced
            if too_large:
                if not replaced:
                    replaced = True
                    await _send_413(send, self.limit)
                return
            await send(message)

        try:
            await self.app(scope, counting_receive, replacing_send)
        except _TooLarge:
            if not replaced:
                await _send_413(send, self.limit)


class _SameOriginOnly:
    """Answers only the app's own pages and clients that are not browsers (curl, scripts).

    A page on another site can make the user's browser send requests here: a GET by an image
    tag, a POST of a form or of text/plain, neither asking first. Such a request carries an
    ``Origin`` of the other site, or ``Sec-Fetch-Site: cross-site`` / ``same-site`` (another port
    of localhost is same-site): refused with 403, before any work starts. A body of any type but
    JSON or an upload is refused with 415.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers") or []}
        origin, host = headers.get("origin"), headers.get("host", "")
        foreign_origin = origin is not None and origin.split("://", 1)[-1] != host
        if foreign_origin or headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return await _send_json_error(send, 403, "requests from other sites are refused: open the app's own page")
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if scope.get("method") in ("POST", "PUT", "PATCH") and content_type not in BODY_TYPES:
            return await _send_json_error(send, 415, "send JSON (application/json) or an upload (multipart/form-data)")
        return await self.app(scope, receive, send)


async def _send_json_error(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def _send_413(send, limit: int) -> None:
    await _send_json_error(send, 413, f"the request is larger than {limit} bytes")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(index_dir: Path, workspace: Workspace | None, host: str = "127.0.0.1", port: int = 8765,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, report: Report = print) -> None:
    """Serve the app until Ctrl-C. The index must exist; the socket is bound and listening before
    the URL is printed, so the printed port is the real one (also with ``port=0``) and answers."""
    loaded = load_index(index_dir)   # a missing or damaged index is one line now, not a 503 later
    loopback = is_loopback(host)
    if not loopback:
        report(f"warning: listening on {host}: anyone who can reach this machine can search and view your "
               "indexed images; use --host 127.0.0.1 to keep it local")
    app = create_app(index_dir, workspace, max_upload_bytes, LOOPBACK_NAMES if loopback else None)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}): choose another --port") from None
    # Listening before the URL is printed: a client that connects as soon as it reads the URL
    # waits in the backlog until uvicorn accepts, instead of being refused.
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    report(f"serving {loaded.count} images of {index_dir} at http://{shown}:{bound_port}/ "
           f"(API docs: /docs); Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
