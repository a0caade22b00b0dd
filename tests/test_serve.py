"""``neurovfm serve``: the local web viewer, end to end in a real headless browser (Debian's
chromium driven by Playwright) against the real server started by the real command line, and its
safety rules over plain HTTP (limits, zip slip, the root, the token, identifiers, concurrency).

The model is small and untrained (tests/analyze_support.py): these tests check the viewer's
plumbing, never what a model learned. A missing chromium or playwright fails the test (run
scripts/ensure_chromium.sh and install the ``test`` extra); it is never skipped.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from analyze_support import head_volume, make_model, reorient, write_nifti_study
from neurovfm.cli import main as cli_main
from neurovfm.serve import slices as S
from neurovfm.serve.app import create_app
from neurovfm.serve.jobs import JobManager
from neurovfm.serve.png import encode_png
from neurovfm.serve.settings import ServeConfigError, ServeSettings
from neurovfm.serve.uploads import SafeNames

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "t0ken-for-the-tests-0123456789"
HDR = {"X-NeuroVFM": "1"}
WORKERS = 2
N_CONCURRENT = 20


# -- shared fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("serve_model")))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """One synthetic CT study (DICOM, one file per slice) and the identifying values in its headers."""
    root = tmp_path_factory.mktemp("serve_archive")
    p = subprocess.run([sys.executable, "-m", "neurovfm", "synth", str(root), "--studies", "1", "--seed", "1",
                        "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((root / "records.jsonl").read_text().splitlines()[0])
    assert rec["modality"] == "CT", "seed 1 must give a CT study; change the seed"
    study = root / os.path.dirname(rec["series"][0]["path"])
    first = sorted((root / rec["series"][0]["path"]).iterdir())[0]
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    needles = {str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber), str(ds.StudyInstanceUID)}
    needles |= {part for part in str(ds.PatientName).split("^") if len(part) >= 4}
    needles = {n for n in needles if len(n) >= 4}
    assert len(needles) >= 4
    # the archive named after the patient: the name must not leak from the upload either
    zpath = tmp_path_factory.mktemp("serve_zip") / f"{str(ds.PatientName).replace('^', '_')}.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for f in sorted(study.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(study.parent.parent))  # P.../S.../SE.../file: names from the archive
    return {"root": str(root), "study": str(study), "zip": str(zpath), "needles": needles,
            "patient_name": str(ds.PatientName)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model, archive, tmp_path_factory):
    """The real server, started by the real command line (uvicorn, its logging and our access log)."""
    data = tmp_path_factory.mktemp("serve_data")
    log_path = data.parent / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "NEUROVFM_SERVE_TOKEN"}
    cmd = [sys.executable, "-m", "neurovfm", "serve", "--model", model, "--port", str(port), "--data", str(data),
           "--root", archive["root"], "--workers", str(WORKERS)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            if httpx.get(base + "/api/info", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() - t0 > 90:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    yield {"base": base, "data": str(data), "log": log_path, "proc": proc, "urls": []}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_done(base: str, job_id: str, timeout: float = 240) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = httpx.get(f"{base}/api/jobs/{job_id}", timeout=10).json()
        if st["state"] in ("done", "failed"):
            return st
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def browser_tools():
    """Playwright and Debian's chromium, or a failure that says how to install them (never a skip)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `.venv/bin/pip install -e '.[test]'` (make test does it)")
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if not exe:
        pytest.fail("Debian's chromium is not installed: run `bash scripts/ensure_chromium.sh` "
                    "(apt-get install -y chromium; make test and .ci/run call it)")
    return sync_playwright, exe


# -- 1. the page -------------------------------------------------------------------------------------
def test_page_is_local_and_says_research_only(tmp_path, model):
    app = create_app(ServeSettings(model=model, data=str(tmp_path / "d")))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        page = c.get("/")
        assert page.status_code == 200
        assert "Research use only. Not a medical device." in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("/static/app.js", "/static/app.css"):
            r = c.get(asset)
            assert r.status_code == 200 and r.text
            assert "http://" not in r.text and "https://" not in r.text  # no CDN, no external font
        assert "http://" not in page.text and "https://" not in page.text


# -- 2. the browser, end to end ----------------------------------------------------------------------
def canvas_data(page, canvas) -> str:
    return page.evaluate("c => c.toDataURL()", canvas.element_handle())


def wait_rendered(page, canvas, not_key: str | None = None, timeout: float = 30_000) -> str:
    handle = canvas.element_handle()
    page.wait_for_function("([c, k]) => c.dataset.rendered && c.dataset.rendered !== k", arg=[handle, not_key],
                           timeout=timeout)
    return canvas.get_attribute("data-rendered")


def test_browser_upload_view_scroll_map_triage(server, archive):
    sync_playwright, exe = browser_tools()
    base, urls = server["base"], server["urls"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            # the page's CSP forbids eval; Playwright's wait_for_function needs it (the test's code, not the page's)
            page = browser.new_page(viewport={"width": 1300, "height": 1100}, bypass_csp=True)
            page.on("request", lambda r: urls.append(r.url))
            page.goto(base + "/")
            assert "Research use only. Not a medical device." in page.inner_text("#disclaimer")
            page.set_input_files("#files", archive["zip"])
            page.click("#upload-btn")
            page.wait_for_function("location.hash.startsWith('#job=')", timeout=120_000)
            job_id = page.evaluate("location.hash.slice(5)")
            page.wait_for_selector("#job-state[data-state=done]", timeout=240_000)

            # triage on the page = triage in result.json
            result = httpx.get(f"{base}/api/jobs/{job_id}/files/result.json").json()
            ex = result["exams"][0]
            page.wait_for_selector(".triage[data-modality=CT] .triage-level")
            assert page.inner_text(".triage[data-modality=CT] .triage-level").strip() == ex["triage"]["level"]
            rows = page.locator(".findings-table[data-modality=CT] tbody tr")
            assert rows.count() == len(ex["labels"])
            assert page.locator("#downloads a", has_text="result.json").count() == 1
            assert page.locator("#downloads a", has_text="_map_").count() >= 1

            # scroll: the slice index and the pixels change
            viewer = page.locator(".series-viewer").first
            canvas = viewer.locator("canvas")
            key0 = wait_rendered(page, canvas)
            assert canvas.get_attribute("data-marks") == "R,L,A,P"  # axial: patient's right on the left
            idx0, pix0 = viewer.locator(".slice-index").inner_text(), canvas_data(page, canvas)
            canvas.hover()
            page.mouse.wheel(0, 120)
            key1 = wait_rendered(page, canvas, key0)
            idx1, pix1 = viewer.locator(".slice-index").inner_text(), canvas_data(page, canvas)
            assert idx1 != idx0 and pix1 != pix0

            # the map overlay: on and off on the same slice
            viewer.locator(".map-toggle").check()
            key2 = wait_rendered(page, canvas, key1)
            assert not key2.endswith(":")
            with_map = canvas_data(page, canvas)
            viewer.locator(".map-toggle").uncheck()
            key3 = wait_rendered(page, canvas, key2)
            assert key3.rsplit(":", 1)[0] == key2.rsplit(":", 1)[0] and key3.endswith(":")
            assert canvas_data(page, canvas) != with_map

            # the other planes, L/R (or A/P) marked on each
            for plane, marks in (("coronal", "R,L,S,I"), ("sagittal", "A,P,S,I")):
                viewer.locator(f".plane-btn[data-plane={plane}]").click()
                page.wait_for_function(f"c => (c.dataset.rendered || '').startsWith('{plane}:')",
                                       arg=canvas.element_handle(), timeout=30_000)
                assert canvas.get_attribute("data-marks") == marks
            viewer.locator(".plane-btn[data-plane=axial]").click()
            page.wait_for_function("c => (c.dataset.rendered || '').startsWith('axial:')", arg=canvas.element_handle())
            before = canvas.get_attribute("data-rendered")
            viewer.locator(".map-toggle").check()
            wait_rendered(page, canvas, before)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_viewer.png"), full_page=True)

            # no report in the result: nothing shown for it; an exam with one (`--report`): findings, what
            # the guard added, its flags
            assert page.inner_text("#report").strip() == ""
            res_path = Path(server["data"]) / "jobs" / job_id / "out" / "result.json"
            rep = {"report": {"exam_type": "CT head", "impression": "Left subdural hematoma.",
                              "findings": [{"label": "acute_subdural_hematoma", "side": "left", "size_mm": 7,
                                            "description": "left convexity"},
                                           {"label": "midline_shift", "side": "midline", "size_mm": 0,
                                            "description": "added", "added_by_guard": True}]},
                   "guard_flags": [{"kind": "omitted_finding", "label": "midline_shift", "side": "midline"}],
                   "triage": "Urgent"}
            with_report = json.loads(json.dumps(result))
            with_report["exams"][0]["report"] = rep
            res_path.write_text(json.dumps(with_report))
            page.reload()
            page.wait_for_selector("#report .report")
            text = page.inner_text("#report")
            assert "acute_subdural_hematoma" in text and "Left subdural hematoma." in text and "triage Urgent" in text
            assert page.locator("#report li.added").count() == 1
            assert "added by guard" in page.inner_text("#report li.added")
            assert "omitted_finding: midline_shift" in page.inner_text("#report .flags")
            res_path.write_text(json.dumps(result))
        finally:
            browser.close()
    assert (ARTIFACTS / "serve_viewer.png").stat().st_size > 10_000

    server["job"] = job_id
    # the uploaded originals are gone; only outputs and the job's status remain
    job_dir = Path(server["data"]) / "jobs" / job_id
    assert sorted(os.listdir(job_dir)) == ["out", "status.json"]
    assert not [f for f in (job_dir / "out").iterdir() if f.suffix == ".dcm" or f.is_dir()]


def test_viewer_api_refuses_bad_requests(server):
    base, job = server["base"], server.get("job")
    assert job, "needs the browser test's job"
    st = httpx.get(f"{base}/api/jobs/{job}").json()
    name = st["result"]["exams"][0]["series"][0]["name"]
    sl = f"{base}/api/jobs/{job}/series/{name}/slice"
    assert httpx.get(sl, params={"plane": "axial", "index": 0, "window": "bone"}).headers["content-type"] == "image/png"
    assert httpx.get(sl, params={"plane": "oblique", "index": 0}).status_code == 400
    assert httpx.get(sl, params={"plane": "axial", "index": 10_000}).status_code == 400
    assert httpx.get(sl, params={"plane": "axial", "index": 0, "window": "lung"}).status_code == 400
    assert httpx.get(f"{base}/api/jobs/{job}/series/s99_nope/slice").status_code == 404
    assert httpx.get(f"{base}/api/jobs/{job}/series/{name}/map/not_a_label").status_code == 404
    assert httpx.get(f"{base}/api/jobs/{job}/files/..%2Fstatus.json").status_code == 404
    assert httpx.get(f"{base}/api/jobs/{job}/files/status.json").status_code == 404  # outputs only
    assert httpx.get(f"{base}/api/jobs/{'f' * 32}").status_code == 404
    assert httpx.get(f"{base}/api/jobs/not-a-job-id").status_code == 404
    assert httpx.delete(f"{base}/api/jobs/{job}").status_code == 403  # no X-NeuroVFM header


# -- 3. many users at once -----------------------------------------------------------------------------
def small_study(folder: Path, i: int) -> list[tuple[str, bytes]]:
    vol, aff = head_volume(shape=(32, 40, 28), spacing=(5.0, 5.0, 5.5), modality="MR", seed=i)
    path = write_nifti_study(str(folder / f"study{i}"), vol, aff, "MR", name="T1w",
                             sidecar={"PatientName": "ROE^RICHARD^CONCURRENT"})
    side = path[:-7] + ".json"
    return [(os.path.basename(path), Path(path).read_bytes()), (os.path.basename(side), Path(side).read_bytes())]


def test_concurrent_submissions_queued_none_lost(server, archive, tmp_path):
    """19 uploads and one folder picked under --root, all at once, with 2 workers."""
    base = server["base"]
    studies: list = [small_study(tmp_path, i) for i in range(N_CONCURRENT - 1)]
    picked = Path(archive["root"]) / "picked_study"
    for name, data in small_study(tmp_path / "picked", 99):
        picked.mkdir(exist_ok=True)
        (picked / name).write_bytes(data)
    studies.append("picked_study")

    def submit(files):
        with httpx.Client(timeout=60) as c:
            if isinstance(files, str):
                return c.post(base + "/api/jobs/from-root", headers=HDR, json={"path": files})
            return c.post(base + "/api/jobs", headers=HDR, files=[("files", (n, b)) for n, b in files])

    with ThreadPoolExecutor(N_CONCURRENT) as pool:
        answers = list(pool.map(submit, studies))
    assert [a.status_code for a in answers] == [202] * N_CONCURRENT, [a.text for a in answers if a.status_code != 202]
    ids = [a.json()["id"] for a in answers]
    assert len(set(ids)) == N_CONCURRENT
    assert any(a.json()["state"] == "queued" for a in answers)  # more jobs than workers: they wait
    final = [wait_done(base, i) for i in ids]
    assert [f["state"] for f in final] == ["done"] * N_CONCURRENT, [f.get("error") for f in final]
    listed = {j["id"]: j for j in httpx.get(base + "/api/jobs").json()["jobs"]}
    assert set(ids) <= set(listed)
    # at most `workers` analyses ran at once: from the server's counter and from the jobs' own times
    stats = httpx.get(base + "/api/jobs").json()
    assert 1 <= stats["max_running"] <= WORKERS
    events = sorted([(listed[i]["started"], 1) for i in ids] + [(listed[i]["finished"], -1) for i in ids],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak <= WORKERS
    assert sorted(os.listdir(picked)) == ["sub-01_T1w.json", "sub-01_T1w.nii.gz"]  # a picked folder is not deleted
    # deleted on request: gone from the API and from the disk
    for i in ids:
        assert httpx.delete(f"{base}/api/jobs/{i}", headers=HDR).status_code == 200
        assert httpx.get(f"{base}/api/jobs/{i}").status_code == 404
        assert not (Path(server["data"]) / "jobs" / i).exists()


# -- 4. limits, zip slip, the root, the token ----------------------------------------------------------
def client(tmp_path, model, **kw) -> tuple[TestClient, ServeSettings]:
    st = ServeSettings(model=model, data=str(tmp_path / "data"), **kw)
    return TestClient(create_app(st), base_url="http://127.0.0.1"), st


def job_dirs(st: ServeSettings) -> list[str]:
    d = os.path.join(st.data, "jobs")
    return os.listdir(d) if os.path.isdir(d) else []


def test_oversize_and_too_many_files_refused(tmp_path, model):
    c, st = client(tmp_path, model, max_upload_bytes=2000, max_files=2)
    with c:
        r = c.post("/api/jobs", headers=HDR, files=[("files", ("a.dcm", b"x" * 10_000))])  # refused while streaming
        assert r.status_code == 413 and "too large" in r.json()["error"]
        r = c.post("/api/jobs", headers=HDR, files=[("files", ("a.dcm", b"x" * (1_100_000 + 2000)))])  # by its length
        assert r.status_code == 413 and "too large" in r.json()["error"]
        r = c.post("/api/jobs", headers=HDR, files=[("files", (f"{i}.dcm", b"x")) for i in range(3)])
        assert r.status_code == 413 and "too many files" in r.json()["error"]
        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("big.dcm", b"\0" * 1_000_000)  # ~1 kB packed, 1 MB unpacked
        r = c.post("/api/jobs", headers=HDR, files=[("files", ("s.zip", bomb.getvalue()))])
        assert r.status_code == 413 and "unpacked" in r.json()["error"]
        assert job_dirs(st) == []  # nothing of a refused upload stays
        assert c.get("/api/jobs").json()["jobs"] == []


def zip_bytes(entries: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_zip_slip_refused(tmp_path, model):
    c, st = client(tmp_path, model)
    evil = [[("ok.dcm", b"x"), ("../evil.txt", b"owned")],
            [("/tmp/evil_abs.txt", b"owned")],
            [("a/../../evil2.txt", b"owned")],
            [("a\\..\\..\\evil3.txt", b"owned")]]
    with c:
        for entries in evil:
            r = c.post("/api/jobs", headers=HDR, files=[("files", ("study.zip", zip_bytes(entries)))])
            assert r.status_code == 400, r.text
            assert "zip archive refused" in r.json()["error"]
        r = c.post("/api/jobs", headers=HDR, files=[("files", ("study.zip", zip_bytes([("a.dcm", b"x")], "link")))])
        assert r.status_code == 400 and "symbolic link" in r.json()["error"]
    written = [p for p in tmp_path.rglob("evil*")] + [p for p in Path("/tmp").glob("evil_abs.txt")]
    assert written == []
    assert job_dirs(st) == []


def test_root_paths_stay_inside(tmp_path, model):
    root = tmp_path / "root"
    (root / "studyA" / "series1").mkdir(parents=True)
    (root / "studyA" / "series1" / "x.dcm").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link_out")
    c, st = client(tmp_path, model, root=str(root))
    with c:
        ok = c.post("/api/root/list", headers=HDR, json={"path": ""}).json()
        assert ok["folders"] == ["studyA"]  # the link pointing out is not offered
        assert c.post("/api/root/list", headers=HDR, json={"path": "studyA"}).json()["folders"] == ["series1"]
        for bad, status in (("../", 403), ("studyA/../../outside", 403), ("link_out", 403), ("/etc", 400),
                            (str(outside), 400)):
            r = c.post("/api/root/list", headers=HDR, json={"path": bad})
            assert r.status_code == status, (bad, r.text)
            r = c.post("/api/jobs/from-root", headers=HDR, json={"path": bad})
            assert r.status_code == status, (bad, r.text)
        assert job_dirs(st) == []


def test_token_required_beyond_loopback(tmp_path, model, monkeypatch):
    monkeypatch.delenv("NEUROVFM_SERVE_TOKEN", raising=False)
    with pytest.raises(ServeConfigError, match="token"):
        ServeSettings(model=model, host="0.0.0.0", data=str(tmp_path / "d"))
    # the command line refuses to start (exit 2, one line) before binding anything
    assert cli_main(["serve", "--model", model, "--host", "0.0.0.0", "--data", str(tmp_path / "d")]) == 2

    c, _ = client(tmp_path, model, host="0.0.0.0", token=TOKEN)
    with c:
        assert c.get("/api/jobs").status_code == 401
        assert c.get("/api/jobs", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        assert c.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        r = c.post("/api/jobs", files=[("files", ("a.dcm", b"x"))], headers=HDR)
        assert r.status_code == 401  # uploads too
        assert c.get("/", params={"token": "wrong-token-wrong-token"}, follow_redirects=False).status_code == 401
        r = c.get("/", params={"token": TOKEN}, follow_redirects=False)  # one login: a cookie, then a clean URL
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "httponly" in r.headers["set-cookie"].lower()
        assert c.get("/api/jobs").status_code == 200  # the cookie now carries it
        assert c.delete("/api/jobs/" + "0" * 32).status_code == 403  # no X-NeuroVFM header: refused
    # on loopback, a foreign Host header (DNS rebinding) is refused
    c, _ = client(tmp_path, model)
    with c:
        assert c.get("/api/jobs", headers={"Host": "evil.example"}).status_code == 400
        assert c.get("/api/jobs").status_code == 200


# -- 5. slices, names, retention ----------------------------------------------------------------------
def test_slices_oriented_by_affine(tmp_path):
    """However the voxels are stored, the axial cut is the same image, with the patient's left
    (where the lesion is) on the screen's right."""
    import nibabel as nib

    vol, aff = head_volume(shape=(40, 48, 36), spacing=(4.0, 4.0, 4.0), lesion_side="left", modality="MR", seed=5)
    cuts = []
    for plane in ("axial", "coronal", "sagittal"):
        v, a = reorient(vol, aff, plane)
        path = tmp_path / f"{plane}.nii.gz"
        nib.save(nib.Nifti1Image(v, a), str(path))
        cv = S.load(str(path))
        assert np.all(np.diag(cv.affine[:3, :3]) > 0)  # RAS+ voxel order
        lesion = np.abs(cv.data - 150) < 20  # the MR lesion's value; head 300, brain 500, air 0
        for view, axes in (("axial", (0, 1)), ("coronal", (0, 2))):
            k = int(np.argmax(lesion.sum(axis=axes)))
            img = S.cut(cv, view, k)
            cols = np.nonzero(np.abs(img - 150) < 20)[1]
            assert cols.size and cols.mean() > img.shape[1] / 2, \
                f"stored {plane}, {view} view: the left-sided lesion must show on the screen's right"
            if view == "axial":
                cuts.append(img)
    assert all(np.array_equal(cuts[0], c) for c in cuts[1:])


def test_png_and_safe_names():
    import zlib

    png = encode_png(np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert png.startswith(b"\x89PNG") and zlib.decompress(png[png.index(b"IDAT") + 4:-16])[:5] == b"\0\0\1\2\3"
    n = SafeNames()
    a = n.path_for("DOE^JOHN/sub-DOE_ce-gd_T1w.nii.gz")
    b = n.path_for("DOE^JOHN/sub-DOE_ce-gd_T1w.json")
    c = n.path_for("DOE^JOHN/IM0001")
    d = n.path_for("../../etc/passwd")
    assert a.endswith("_ce-x_t1w.nii.gz") and b == a.replace(".nii.gz", ".json")
    assert all("DOE" not in p and ".." not in p for p in (a, b, c, d))


def test_retention_sweep(tmp_path, model):
    st = ServeSettings(model=model, data=str(tmp_path / "d"), retention_hours=1)
    jm = JobManager(st, analyzer_factory=lambda: None)
    try:
        job = jm.new_job("folder")
        job.state, job.finished = "done", time.time()
        assert jm.sweep(now=time.time() + 1800) == 0
        assert jm.sweep(now=time.time() + 3601) == 1
        assert not os.path.exists(jm.job_dir(job.id))
    finally:
        jm.close()


# -- 6. privacy: last, over everything the server did above --------------------------------------------
def test_no_identifiers_in_log_or_urls(server, archive):
    text = server["log"].read_text(errors="replace")
    assert "queued" in text and "POST /api/jobs 202" in text  # the log is the real one
    assert "token=" not in text and "?" not in "".join(line for line in text.splitlines() if " /api/" in line)
    needles = archive["needles"] | {"ROE^RICHARD", "RICHARD", os.path.basename(archive["zip"])}
    urls = server["urls"]
    assert urls, "the browser test recorded no URL"
    for n in needles:
        assert n not in text, "an identifying value from the uploaded headers is in the server log"
        assert not [u for u in urls if n in u], "an identifying value is in a URL the page requested"
    # nothing under the data folder either
    for f in Path(server["data"]).rglob("*"):
        if f.is_file() and f.suffix in (".json", ".html"):
            body = f.read_text(errors="replace")
            assert not [n for n in needles if n in body], f.name
