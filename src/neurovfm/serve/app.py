"""The web app: a static page (HTML, JS, CSS served from the package: no build step, no CDN)
and a JSON/PNG API over the job pool and the analysis outputs.

URLs carry only random job ids, numbered series names and label names; folder names travel in
request bodies. The access log is written here (uvicorn's own is off) with the path and never the
query string, so a ``?token=`` login cannot end up in a log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from python_multipart.exceptions import FormParserError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from neurovfm import __version__
from neurovfm.serve import slices as S
from neurovfm.serve.auth import COOKIE, guard, is_authenticated, token_ok
from neurovfm.serve.jobs import JobError, JobManager
from neurovfm.serve.png import encode_png
from neurovfm.serve.settings import ServeSettings
from neurovfm.serve.studyroot import RootError, listing, resolve
from neurovfm.serve.uploads import (MULTIPART_OVERHEAD, MultipartReceiver, SafeNames, UploadError, human_size,
                                    unpack_zip)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DISCLAIMER = "Research use only. Not a medical device."
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}")
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
access = logging.getLogger("neurovfm.serve.access")


def _err(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def create_app(settings: ServeSettings, manager: JobManager | None = None) -> FastAPI:
    """The app for ``settings`` (tests pass their own ``manager``, e.g. with a tiny model)."""
    jobs = manager or JobManager(settings)
    volumes = S.VolumeCache()
    results: dict[str, tuple[float, dict]] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        jobs.close()

    app = FastAPI(title="neurovfm serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.settings, app.state.jobs = settings, jobs

    app.middleware("http")(guard(settings))  # registered first: runs inside the log below

    @app.middleware("http")
    async def headers_and_log(request: Request, call_next):
        t = time.perf_counter()
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        access.info("%s %s %d %.0f ms", request.method, request.url.path, response.status_code,
                    1000 * (time.perf_counter() - t))
        return response

    @app.exception_handler(JobError)
    @app.exception_handler(RootError)
    @app.exception_handler(UploadError)
    async def _known(request: Request, e: Any) -> JSONResponse:
        return _err(e.status, e.message)

    # -- page and login ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(request: Request):
        given = request.query_params.get("token")
        if given is not None:  # one-time login: the token goes into a cookie and out of the address bar
            if not token_ok(settings, given):
                return HTMLResponse("<!doctype html><p>Wrong token. Research use only. Not a medical device.</p>", 401)
            r = RedirectResponse("/", 303)
            r.set_cookie(COOKIE, given, httponly=True, samesite="strict", path="/")
            return r
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/auth")
    async def auth_state(request: Request):
        return {"required": settings.token_required, "ok": is_authenticated(settings, request)}

    @app.post("/api/login")
    async def login(request: Request):
        try:
            given = (await request.json()).get("token")
        except (ValueError, AttributeError):
            given = None
        if not token_ok(settings, given if isinstance(given, str) else None):
            return _err(401, "wrong token")
        r = JSONResponse({"ok": True})
        r.set_cookie(COOKIE, given, httponly=True, samesite="strict", path="/")
        return r

    @app.get("/api/info")
    async def info():
        return {"version": __version__, "disclaimer": DISCLAIMER, "root": settings.root is not None,
                "workers": settings.workers, "retention_hours": settings.retention_hours,
                "max_upload_bytes": settings.max_upload_bytes, "max_files": settings.max_files,
                "model_loaded": jobs.model_loaded, "ct_windows": S.CT_WINDOWS}

    # -- submitting --------------------------------------------------------------------------------
    @app.post("/api/jobs", status_code=202)
    async def upload(request: Request):
        cl = request.headers.get("content-length")
        if cl and cl.isdigit() and int(cl) > settings.max_upload_bytes + MULTIPART_OVERHEAD:
            return _err(413, f"upload too large: the limit is {human_size(settings.max_upload_bytes)}")
        job = jobs.new_job("upload")
        names, folder = SafeNames(), jobs.upload_dir(job.id)
        try:
            rx = MultipartReceiver(request.headers.get("content-type", ""), folder, settings.max_upload_bytes,
                                   settings.max_files, names)
            async for chunk in request.stream():
                rx.feed(chunk)
            got = rx.finish()
            for z in got.zips:
                await run_in_threadpool(unpack_zip, z, folder, names, got, settings.max_upload_bytes, settings.max_files)
        except UploadError as e:
            jobs.discard(job)
            access.info("upload refused (%d)", e.status)
            return _err(e.status, e.message)
        except (FormParserError, ClientDisconnect):
            jobs.discard(job)
            return _err(400, "the upload was malformed or interrupted")
        except BaseException:
            jobs.discard(job)
            raise
        job.files, job.bytes = got.files, got.bytes
        jobs.submit(job, folder, delete_study=True)
        return JSONResponse(jobs.status(job), 202)

    async def _body_path(request: Request) -> str:
        try:
            body = await request.json()
        except ValueError:
            raise RootError(400, "send JSON: {\"path\": \"folder/under/root\"}") from None
        path = body.get("path", "") if isinstance(body, dict) else None
        if not isinstance(path, str):
            raise RootError(400, "path must be a string")
        return path

    @app.post("/api/root/list")
    async def root_list(request: Request):
        return listing(settings.root, await _body_path(request))

    @app.post("/api/jobs/from-root", status_code=202)
    async def from_root(request: Request):
        path = resolve(settings.root, await _body_path(request))
        job = jobs.new_job("folder")
        jobs.submit(job, path, delete_study=False)
        return JSONResponse(jobs.status(job), 202)

    # -- jobs ----------------------------------------------------------------------------------------
    @app.get("/api/jobs")
    async def list_jobs():
        return {"jobs": jobs.list(), "running": jobs.running, "max_running": jobs.max_running,
                "workers": settings.workers}

    def result_of(job_id: str) -> dict:
        job = jobs.get(job_id)
        if job.state != "done":
            raise JobError(409, f"the job is {job.state}")
        path = os.path.join(jobs.out_dir(job.id), "result.json")
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            raise JobError(404, "the job's result is gone") from None
        hit = results.get(job.id)
        if hit is None or hit[0] != mtime:
            with open(path) as fh:
                hit = (mtime, json.load(fh))
            results[job.id] = hit
        return hit[1]

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str):
        job = jobs.get(job_id)
        out = jobs.status(job)
        if job.state == "done":
            out["result"] = result_of(job_id)
            out["outputs"] = sorted(f for f in os.listdir(jobs.out_dir(job.id)) if SAFE_NAME.fullmatch(f))
        return out

    @app.delete("/api/jobs/{job_id}")
    def delete_job(job_id: str):
        jobs.delete(job_id)
        results.pop(job_id, None)
        volumes.forget(jobs.job_dir(job_id))
        return {"deleted": job_id}

    @app.get("/api/jobs/{job_id}/files/{name}")
    def download(job_id: str, name: str):
        job = jobs.get(job_id)
        path = os.path.join(jobs.out_dir(job.id), name)
        if not SAFE_NAME.fullmatch(name) or not os.path.isfile(path):
            raise JobError(404, "no such file")
        media = "application/json" if name.endswith(".json") else "image/png" if name.endswith(".png") else \
            "text/html" if name.endswith(".html") else "application/gzip"
        return FileResponse(path, media_type=media, filename=name)

    # -- the viewer ----------------------------------------------------------------------------------
    def series_of(job_id: str, name: str) -> tuple[dict, dict, dict[str, str]]:
        res = result_of(job_id)
        for ex in res.get("exams", []):
            for s in ex.get("series", []):
                if s.get("name") == name:
                    maps = {r["label"]: r["maps"]["nifti"][name] for r in ex.get("labels", [])
                            if name in (r.get("maps") or {}).get("nifti", {})}
                    return ex, s, maps
        raise JobError(404, "no such series in this job")

    def volume(job_id: str, fname: str, kind: str) -> S.Volume:
        path = os.path.join(jobs.out_dir(job_id), fname)
        if not SAFE_NAME.fullmatch(fname) or not os.path.isfile(path):
            raise JobError(404, "the series' volume is gone")
        return volumes.get(path, kind)

    @app.get("/api/jobs/{job_id}/series/{name}")
    def series_info(job_id: str, name: str):
        ex, s, maps = series_of(job_id, name)
        vol = volume(job_id, s["image"], "image")
        planes = {p: i for p in S.PLANES if (i := S.plane_info(vol, p))}
        mid = s.get("midplane") or {}
        if "sagittal" in planes:  # left/right is through this plane: say how far from the head's midline
            sides = []
            for k in range(planes["sagittal"]["count"]):
                x, y, z = S.slice_centre_ras(vol, "sagittal", k)
                d = x - (mid.get("a", 0.0) + mid.get("b", 0.0) * y + mid.get("c", 0.0) * z)
                sides.append(f"{'R' if d >= 0 else 'L'} {abs(d):.0f} mm")
            planes["sagittal"]["sides"] = sides
        map_info = {}
        for label, fn in maps.items():
            mv = volume(job_id, fn, "map")
            map_info[label] = {"file": fn, "peak": S.peak_slices(mv)}
        windows = list(S.CT_WINDOWS) + ["auto"] if ex["modality"] == "CT" else ["auto"]
        return {"name": name, "modality": ex["modality"], "image": s["image"], "planes": planes,
                "default_plane": s.get("plane") if s.get("plane") in planes else next(iter(planes), None),
                "windows": windows, "default_window": windows[0], "maps": map_info}

    def _png(img) -> Response:
        return Response(encode_png(img), media_type="image/png")

    def _plane_index(vol: S.Volume, plane: str, index: int):
        if plane not in S.PLANES:
            raise JobError(400, f"plane must be one of {', '.join(S.PLANES)}")
        try:
            return S.cut(vol, plane, index)
        except IndexError as e:
            raise JobError(400, str(e)) from None

    @app.get("/api/jobs/{job_id}/series/{name}/slice")
    def slice_png(job_id: str, name: str, plane: str = "axial", index: int = 0, window: str = "auto"):
        _, s, _ = series_of(job_id, name)
        vol = volume(job_id, s["image"], "image")
        img = _plane_index(vol, plane, index)
        try:
            lo, hi = S.window_range(vol, window)
        except KeyError:
            raise JobError(400, f"window must be one of {', '.join(list(S.CT_WINDOWS) + ['auto'])}") from None
        return _png(S.window_u8(img, lo, hi))

    @app.get("/api/jobs/{job_id}/series/{name}/map/{label}")
    def map_png(job_id: str, name: str, label: str, plane: str = "axial", index: int = 0):
        _, _, maps = series_of(job_id, name)
        if label not in maps:
            raise JobError(404, "no map of that label on this series")
        mv = volume(job_id, maps[label], "map")
        return _png(S.overlay_rgba(_plane_index(mv, plane, index), mv.peak()))

    return app
