"""Token cache: memory-mapped reads, schema/policy checks, resume, and kill -9 safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest

from neurovfm.errors import SchemaMismatchError
from neurovfm.ingest.pipeline import IngestOptions, run_ingest
from neurovfm.ingest.policy import PreprocessPolicy
from neurovfm.privacy.keys import Keyer
from neurovfm.synth.dicom_writer import Identity
from neurovfm.tokens.cache import TokenCache
from neurovfm.tokens.windows import window_to_uint8

from neurovfm.synth.phantom import write_phantom_series


def _tree(root, n_series, modality="CT", n=16):
    for s in range(n_series):
        write_phantom_series(str(root / f"st{s}" / "ser"), "axial", n=n, rows=128, cols=120, ps=(1.6, 1.6), step=5.0,
                             modality=modality, identity=Identity(patient_id=f"P{s:04d}", study_uid=pydicom.uid.generate_uid()),
                             seed=s)


def test_hu16_views_match_direct_windows(tmp_path, keyer):
    """Windows made at read time from fixed-point HU equal windows of the float volume (+-1 level)."""
    _tree(tmp_path / "src", 1)
    run_ingest(str(tmp_path / "src"), str(tmp_path / "c"), IngestOptions(progress=False), keyer=keyer)
    c = TokenCache(str(tmp_path / "c"))
    (e,) = c.series()
    assert e.storage == "hu16" and e.modality == "CT"
    views, coords, names = c.views(e)
    assert names == ("brain", "blood", "bone") and views.dtype == np.uint8
    raw, _ = c.raw(e)
    assert isinstance(raw.base, np.memmap) or isinstance(raw, np.memmap) or raw.base is not None
    hu = raw[:, 0].astype(np.float32) / c.policy.hu16_scale
    for i, w in enumerate(c.policy.ct_windows):
        direct = window_to_uint8(hu, w)
        assert np.abs(direct.astype(int) - views[:, i].astype(int)).max() <= 1
    # coordinates are unique, inside the grid, and tokens are foreground (HU > -500 everywhere)
    grid = np.array(eval(e.grid_shape))
    assert (coords >= 0).all() and (coords < grid).all()
    assert len({tuple(r) for r in coords}) == len(coords)
    assert hu.min() > -500


def test_views8_storage_gives_same_views(tmp_path, keyer):
    _tree(tmp_path / "src", 1)
    run_ingest(str(tmp_path / "src"), str(tmp_path / "a"), IngestOptions(progress=False), keyer=keyer)
    pol = PreprocessPolicy(ct_storage="views8")
    run_ingest(str(tmp_path / "src"), str(tmp_path / "b"), IngestOptions(progress=False, policy=pol), keyer=keyer)
    va, ca, _ = TokenCache(str(tmp_path / "a")).views(TokenCache(str(tmp_path / "a")).series()[0])
    cb = TokenCache(str(tmp_path / "b"))
    vb, cb_coords, _ = cb.views(cb.series()[0])
    np.testing.assert_array_equal(ca, cb_coords)
    assert np.abs(va.astype(int) - vb.astype(int)).max() <= 1


def test_policy_and_secret_mismatch_refused(tmp_path, keyer):
    _tree(tmp_path / "src", 1)
    run_ingest(str(tmp_path / "src"), str(tmp_path / "c"), IngestOptions(progress=False), keyer=keyer)
    with pytest.raises(SchemaMismatchError):
        TokenCache(str(tmp_path / "c"), policy=PreprocessPolicy(slice_spacing_mm=3.0))
    with pytest.raises(SchemaMismatchError):
        run_ingest(str(tmp_path / "src"), str(tmp_path / "c"), IngestOptions(progress=False), keyer=Keyer(b"other"))
    c = TokenCache(str(tmp_path / "c"))
    with pytest.raises(SchemaMismatchError):
        c.check(policy_hash="0" * 16)
    c.check(policy_hash=PreprocessPolicy().hash())


def test_rerun_skips_and_appends(tmp_path, keyer):
    _tree(tmp_path / "src", 2)
    s1 = run_ingest(str(tmp_path / "src"), str(tmp_path / "c"), IngestOptions(progress=False), keyer=keyer)
    assert s1.ingested == 2
    shards = set(os.listdir(tmp_path / "c" / "shards"))
    s2 = run_ingest(str(tmp_path / "src"), str(tmp_path / "c"), IngestOptions(progress=False), keyer=keyer)
    assert s2.ingested == 0 and s2.cached == 2
    assert set(os.listdir(tmp_path / "c" / "shards")) == shards  # nothing rewritten
    write_phantom_series(str(tmp_path / "src" / "new" / "ser"), "coronal", n=16, rows=128, cols=120, ps=(1.6, 1.6),
                         step=5.0, identity=Identity(study_uid=pydicom.uid.generate_uid()))
    s3 = run_ingest(str(tmp_path / "src"), str(tmp_path / "c"), IngestOptions(progress=False), keyer=keyer)
    assert s3.ingested == 1 and s3.cached == 2
    assert len(TokenCache(str(tmp_path / "c"))) == 3


def test_sharded_runs_partition_by_study(tmp_path, keyer):
    _tree(tmp_path / "src", 6)
    total = 0
    for i in range(3):
        s = run_ingest(str(tmp_path / "src"), str(tmp_path / "c"), IngestOptions(progress=False, shard=(i, 3)), keyer=keyer)
        total += s.ingested
    assert total == 6 and len(TokenCache(str(tmp_path / "c"))) == 6


def test_parallel_workers_same_tokens(tmp_path, keyer):
    _tree(tmp_path / "src", 3)
    run_ingest(str(tmp_path / "src"), str(tmp_path / "a"), IngestOptions(progress=False), keyer=keyer)
    run_ingest(str(tmp_path / "src"), str(tmp_path / "b"), IngestOptions(progress=False, workers=2), keyer=keyer)
    a, b = TokenCache(str(tmp_path / "a")), TokenCache(str(tmp_path / "b"))
    assert [e.series_key for e in a.series()] == [e.series_key for e in b.series()]
    for ea, eb in zip(a.series(), b.series()):
        np.testing.assert_array_equal(a.raw(ea)[0], b.raw(eb)[0])


@pytest.mark.slow
def test_kill_9_leaves_a_consistent_cache_and_resumes(tmp_path):
    """SIGKILL mid-run: every indexed series is readable, no temp file is visible as a shard,
    and a rerun finishes the rest while skipping what was committed."""
    n_series = 10
    _tree(tmp_path / "src", n_series, n=24)
    cache = tmp_path / "cache"
    env = dict(os.environ, NEUROVFM_SITE_SECRET="kill-test")
    cmd = [sys.executable, "-m", "neurovfm", "ingest", str(tmp_path / "src"), str(cache), "--quiet",
           "--series-per-shard", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = cache / "index.sqlite"
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline:
        if index.exists():
            try:
                with sqlite3.connect(str(index), timeout=5) as db:
                    committed = db.execute("SELECT COUNT(*) FROM series").fetchone()[0]
            except sqlite3.Error:
                committed = 0
            if committed >= 2:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= committed < n_series, "kill must land mid-run"
    c = TokenCache(str(cache))
    done = c.series()
    assert len(done) >= 2
    for e in done:
        toks, coords = c.raw(e)
        assert toks.shape[0] == e.n_tokens and np.asarray(toks).size
    listed = set(os.listdir(cache / "shards"))
    referenced = {e.shard for e in done}
    assert referenced <= listed
    c.close()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "in cache" in res.stdout
    c = TokenCache(str(cache))
    assert len(c) == n_series
    assert not [f for f in os.listdir(cache / "shards") if f.startswith(".tmp-")]  # stale temp removed
    cached_line = [ln for ln in res.stdout.splitlines() if "in cache" in ln][0]
    assert int(cached_line.split()[2]) >= len(done)
