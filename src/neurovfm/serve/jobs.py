"""Jobs: a bounded pool of workers with a queue in front, each worker analysing one study at a
time with one shared model (loaded on the first job, so the page answers at once).

Job ids are random (uuid4), never derived from names. A job's folder holds ``upload/`` (the
originals, deleted as soon as the analysis has read them, whether it succeeded or not) and
``out/`` (the analysis outputs, kept for the retention time or until deleted). ``status.json`` holds
states and counts only: a study picked under ``--root`` is remembered in memory until it runs.
The log gets job ids, counts and error types, never a path or a message that may quote one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from neurovfm.errors import NeuroVFMError
from neurovfm.serve.settings import ServeSettings
from neurovfm.serve.uploads import remove_tree

log = logging.getLogger("neurovfm.serve")

JOB_ID = re.compile(r"[0-9a-f]{32}")
STATES = ("receiving", "queued", "running", "done", "failed")
SWEEP_EVERY_S = 60.0


class JobError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Job:
    id: str
    kind: str  # "upload" | "folder"
    created: float
    state: str = "receiving"
    submitted: float | None = None
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    files: int = 0
    bytes: int = 0
    seq: int = 0  # order in the queue
    step: str | None = None  # what the analysis is doing now (from Analyzer.run's progress)
    fraction: float | None = None
    study: str | None = field(default=None, repr=False)  # in memory only
    delete_study: bool = False
    future: Future | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, "created": self.created,
                "submitted": self.submitted, "started": self.started, "finished": self.finished,
                "error": self.error, "files": self.files, "bytes": self.bytes}


def _clean_message(message: str, study: str | None) -> str:
    """An error message without the study's path or the names of files inside it."""
    if study:
        message = re.sub(re.escape(study.rstrip(os.sep)) + r"[^\s:;,'\"]*", "<study>", message)
    return message[:500]


class JobManager:
    def __init__(self, settings: ServeSettings, analyzer_factory: Callable[[], Any] | None = None):
        self.settings = settings
        self.folder = os.path.join(settings.data, "jobs")
        os.makedirs(self.folder, exist_ok=True)
        self._factory = analyzer_factory or self._default_factory
        self._analyzer: Any = None
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self._seq = 0
        self.running = 0
        self.max_running = 0
        self.durations: list[float] = []
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="neurovfm-job")
        self._stop = threading.Event()
        self._restore()
        self._janitor = threading.Thread(target=self._sweep_loop, name="neurovfm-janitor", daemon=True)
        self._janitor.start()

    # -- the model, once -------------------------------------------------------------------------
    def _default_factory(self) -> Any:
        from neurovfm.analyze.config import AnalyzeConfig
        from neurovfm.analyze.pipeline import Analyzer

        reporter = None
        if self.settings.report or self.settings.report_model:
            from neurovfm.report.generate import Reporter

            reporter = Reporter(self.settings.report_model)
        return Analyzer(self.settings.model, AnalyzeConfig(), reporter)

    def analyzer(self) -> Any:
        with self._load_lock:
            if self._analyzer is None:
                t = time.perf_counter()
                self._analyzer = self._factory()
                log.info("model loaded in %.1f s", time.perf_counter() - t)
            return self._analyzer

    @property
    def model_loaded(self) -> bool:
        return self._analyzer is not None

    # -- folders ---------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.folder, job_id)

    def upload_dir(self, job_id: str) -> str:
        return os.path.join(self.job_dir(job_id), "upload")

    def out_dir(self, job_id: str) -> str:
        return os.path.join(self.job_dir(job_id), "out")

    def _save(self, job: Job) -> None:
        path = os.path.join(self.job_dir(job.id), "status.json")
        if not os.path.isdir(os.path.dirname(path)):
            return  # deleted meanwhile
        with open(path + ".part", "w") as fh:
            json.dump(job.public(), fh)
        os.replace(path + ".part", path)

    def _restore(self) -> None:
        """Keep finished jobs of an earlier run that are still within the retention time; a job
        that a restart interrupted is failed and its originals deleted."""
        now = time.time()
        for name in sorted(os.listdir(self.folder)):
            d = os.path.join(self.folder, name)
            if not JOB_ID.fullmatch(name) or not os.path.isdir(d):
                continue
            remove_tree(os.path.join(d, "upload"))
            try:
                with open(os.path.join(d, "status.json")) as fh:
                    st = json.load(fh)
                job = Job(name, st["kind"], float(st["created"]), st["state"], st.get("submitted"), st.get("started"),
                          st.get("finished"), st.get("error"), int(st.get("files", 0)), int(st.get("bytes", 0)))
            except (OSError, ValueError, KeyError, TypeError):
                remove_tree(d)
                continue
            if job.state not in ("done", "failed"):
                job.state, job.finished = "failed", now
                job.error = "the server stopped before this analysis finished"
            if self._expired(job, now):
                remove_tree(d)
                continue
            self.jobs[job.id] = job
            self._save(job)
        if self.jobs:
            log.info("kept %d job(s) from an earlier run", len(self.jobs))

    # -- life of a job ---------------------------------------------------------------------------
    def new_job(self, kind: str) -> Job:
        job = Job(uuid.uuid4().hex, kind, time.time())
        os.makedirs(self.upload_dir(job.id) if kind == "upload" else self.job_dir(job.id))
        with self._lock:
            self.jobs[job.id] = job
        return job

    def discard(self, job: Job) -> None:
        """Forget a job whose upload was refused: nothing of it stays on disk."""
        with self._lock:
            self.jobs.pop(job.id, None)
        remove_tree(self.job_dir(job.id))

    def submit(self, job: Job, study: str, delete_study: bool) -> Job:
        with self._lock:
            self._seq += 1
            job.seq, job.study, job.delete_study = self._seq, study, delete_study
            job.state, job.submitted = "queued", time.time()
        self._save(job)
        log.info("job %s queued (%s, %d files, %d bytes)", job.id, job.kind, job.files, job.bytes)
        job.future = self._pool.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.state != "queued":  # deleted while queued
                return
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            job.state, job.started = "running", time.time()
        self._save(job)
        log.info("job %s started (%d running)", job.id, self.running)
        try:
            self.analyzer().run(job.study, self.out_dir(job.id),
                                progress=lambda step, frac: (setattr(job, "step", step), setattr(job, "fraction", frac)))
            state, error = "done", None
        except NeuroVFMError as e:
            state, error = "failed", _clean_message(str(e), job.study)
            log.warning("job %s failed: %s", job.id, type(e).__name__)
        except Exception as e:  # noqa: BLE001 - a bug must fail the job, not the worker
            state, error = "failed", f"internal error ({type(e).__name__})"
            log.error("job %s failed: internal error %s", job.id, type(e).__name__)
        finally:
            if job.delete_study:
                remove_tree(self.upload_dir(job.id))
            job.study = None
        with self._lock:
            self.running -= 1
            job.state, job.error, job.finished = state, error, time.time()
            if state == "done":
                self.durations.append(job.finished - (job.started or job.finished))
        self._save(job)
        log.info("job %s %s in %.1f s", job.id, state, job.finished - (job.started or job.finished))

    # -- what the page sees ----------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if JOB_ID.fullmatch(job_id or "") else None
        if job is None or job.state == "receiving":
            raise JobError(404, "no such job (it may have been deleted or have expired)")
        return job

    def status(self, job: Job) -> dict[str, Any]:
        out = job.public()
        now = time.time()
        if job.state == "queued":
            with self._lock:
                out["queue_position"] = 1 + sum(1 for j in self.jobs.values() if j.state == "queued" and j.seq < job.seq)
        if job.state == "running" and job.started:
            out["elapsed_s"] = round(now - job.started, 1)
            if job.step is not None:  # reported by the analysis itself
                out["step"], out["progress"] = job.step, round(float(job.fraction or 0.0), 2)
            elif self.durations:  # an estimate from the jobs done so far
                typical = sum(self.durations[-20:]) / len(self.durations[-20:])
                out["progress"] = round(min(0.95, (now - job.started) / max(typical, 1e-3)), 2)
        if job.state in ("done", "failed"):
            out["progress"] = 1.0
            out["expires"] = (job.finished or now) + self.settings.retention_hours * 3600
        return out

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = sorted((j for j in self.jobs.values() if j.state != "receiving"), key=lambda j: -j.created)
        return [self.status(j) for j in jobs]

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        with self._lock:
            if job.state == "running":
                raise JobError(409, "the job is running; delete it once it has finished")
            if job.state == "queued" and job.future is not None:
                job.future.cancel()
            job.state = "failed"  # a queued job that a worker picks up now is skipped
            self.jobs.pop(job.id, None)
        remove_tree(self.job_dir(job.id))
        log.info("job %s deleted", job.id)

    # -- retention -------------------------------------------------------------------------------
    def _expired(self, job: Job, now: float) -> bool:
        return job.state in ("done", "failed") and (job.finished or job.created) + self.settings.retention_hours * 3600 < now

    def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            old = [j for j in self.jobs.values() if self._expired(j, now)]
            for j in old:
                self.jobs.pop(j.id, None)
        for j in old:
            remove_tree(self.job_dir(j.id))
        if old:
            log.info("retention: deleted %d expired job(s)", len(old))
        return len(old)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(min(SWEEP_EVERY_S, self.settings.retention_hours * 3600 / 4)):
            try:
                self.sweep()
            except Exception as e:  # noqa: BLE001 - the janitor must not die
                log.error("retention sweep failed: %s", type(e).__name__)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
