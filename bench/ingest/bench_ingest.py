"""Ingestion benchmark: our pipeline against a SimpleITK reference, side by side, in one run.

    python bench/ingest/bench_ingest.py [--repeats N] [--quick]

Writes synthetic DICOM series into a temporary folder with the project's own writer
(neurovfm.synth.dicom_writer), then for every series runs

  ours       read_header per file -> group_records -> build_stack -> canonicalize -> tokenize
  reference  SimpleITK: ImageSeriesReader -> DICOMOrient RPI -> Resample sitkBSpline -> Extract
             -> windows / percentile scaling -> tokens  (bench/ingest/reference_sitk.py)

interleaved (the order alternates every repeat), and reports the median series/s of each,
their ratio, parity of the canonical grids (shape, affine, uint8 view difference) and the
peak memory growth of one series in a fresh subprocess per pipeline. Results go to
bench/results/ingest.json (ingest_quick.json with --quick). See bench/ingest/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.join(REPO, "src") not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(1, os.path.join(REPO, "src"))

import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------------------
# memory probe (runs in a fresh subprocess; must come before the heavy imports)
# ----------------------------------------------------------------------------------------


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memprobe(pipeline: str, directory: str, modality: str) -> dict:
    """Peak RSS growth of one series, measured from after the imports."""
    import gc
    import resource

    if pipeline == "ours":
        import pydicom  # noqa: F401
        import scipy.ndimage  # noqa: F401
        import scipy.sparse  # noqa: F401
        try:  # pydicom >= 3: decoder modules, otherwise imported lazily on the first pixel_array
            import pydicom.pixels  # noqa: F401
        except ImportError:
            pass

        import neurovfm.ingest.dicom_headers  # noqa: F401
        import neurovfm.ingest.dicom_series  # noqa: F401
        import neurovfm.ingest.geometry  # noqa: F401
        import neurovfm.tokens.patches  # noqa: F401
        run = run_ours
    else:
        import SimpleITK  # noqa: F401

        import reference_sitk
        run = reference_sitk.run_reference
    gc.collect()
    reset = _reset_peak()
    base_kb = _proc_status_kb("VmRSS")
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = run(directory, modality) if pipeline == "ref" else run(directory)
    wall = time.perf_counter() - t0
    hwm_kb = _proc_status_kb("VmHWM")
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    if reset and hwm_kb is not None:
        peak_kb, how = hwm_kb, "VmHWM after reset via /proc/self/clear_refs"
    else:  # ru_maxrss is a lifetime peak; fine as long as the imports peaked lower
        peak_kb, how = maxrss_kb, "ru_maxrss (lifetime peak)"
    return dict(pipeline=pipeline, base_rss_bytes=base_kb * 1024, peak_rss_bytes=peak_kb * 1024,
                growth_bytes=(peak_kb - base_kb) * 1024, method=how, seconds=wall,
                maxrss_before_bytes=maxrss_before_kb * 1024)


# ----------------------------------------------------------------------------------------
# our pipeline
# ----------------------------------------------------------------------------------------


class _TimedSource:
    """A PlaneSource proxy that adds up the time spent decoding planes."""

    def __init__(self, stack):
        self._stack = stack
        self.geometry = stack.geometry
        self.seconds = 0.0
        self.planes = 0

    def plane(self, k: int):
        t0 = time.perf_counter()
        p = self._stack.plane(k)
        self.seconds += time.perf_counter() - t0
        self.planes += 1
        return p


def run_ours(directory: str):
    """One series folder -> (CanonicalVolume, TokenizedSeries, stage seconds)."""
    from neurovfm.ingest.dicom_headers import read_header
    from neurovfm.ingest.dicom_series import build_stack, group_records
    from neurovfm.ingest.geometry import canonicalize
    from neurovfm.ingest.policy import DEFAULT_POLICY
    from neurovfm.tokens.patches import tokenize

    t = {}
    t0 = time.perf_counter()
    paths = sorted(e.path for e in os.scandir(directory) if e.is_file())
    records = []
    for p in paths:
        records.extend(read_header(p))
    t1 = time.perf_counter()
    t["headers"] = t1 - t0
    cands = group_records(records)
    if len(cands) != 1:
        raise RuntimeError(f"{directory}: expected one series, got {len(cands)}")
    stack = build_stack(cands[0], DEFAULT_POLICY)
    t2 = time.perf_counter()
    t["group_stack"] = t2 - t1
    src = _TimedSource(stack)
    cv = canonicalize(src, DEFAULT_POLICY, name=directory)
    t3 = time.perf_counter()
    t["decode"] = src.seconds
    t["resample"] = (t3 - t2) - src.seconds
    ts = tokenize(cv, stack.modality, DEFAULT_POLICY)
    t["tokens"] = time.perf_counter() - t3
    return cv, ts, t


# ----------------------------------------------------------------------------------------
# synthetic inputs
# ----------------------------------------------------------------------------------------


def _ellipsoid_depth(x, y, z, centre, axes):
    """Approximate signed depth (mm, > 0 inside) below the surface of an ellipsoid."""
    r = np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2
                + ((z - centre[2]) / axes[2]) ** 2)
    return (1.0 - r) * min(axes)


def _inside(x, y, z, centre, axes, edge_mm=0.8):
    """Soft membership (0..1) of an ellipsoid, with a ramp of ``edge_mm`` (partial volume)."""
    d = _ellipsoid_depth(x, y, z, centre, axes)
    return np.clip(0.5 + d / edge_mm, 0.0, 1.0).astype(np.float32)


# tissue values (CT: HU; MR: T2-like signal)
_TISSUE = {
    "CT": dict(air=-1000.0, scalp=40.0, skull=None, csf=8.0, grey=40.0, white=27.0, deep_grey=36.0,
               ventricle=5.0, lesion=65.0),
    "MR": dict(air=0.0, scalp=700.0, skull=60.0, csf=1800.0, grey=1100.0, white=780.0, deep_grey=950.0,
               ventricle=1850.0, lesion=1450.0),
}
_HEAD_C = np.array([0.0, 6.0, -6.0])  # LPS mm
_HEAD_AX = np.array([74.0, 94.0, 84.0])


def head_phantom(x, y, z, modality: str) -> np.ndarray:
    """Noise-free head at LPS points (mm): scalp, skull, CSF, cortex, white matter, ventricles."""
    tv = _TISSUE[modality]
    c, ax = _HEAD_C, _HEAD_AX
    v = np.full(np.shape(x), tv["air"], np.float32)

    def put(mask, value):
        nonlocal v
        v = v + mask * (value - v)

    put(_inside(x, y, z, c, ax), tv["scalp"])
    skull_val = tv["skull"]
    if skull_val is None:  # CT bone 1000..1500 HU, varying smoothly over the vault
        skull_val = (1250.0 + 250.0 * np.sin(x / 9.0) * np.cos(y / 11.0) * np.cos(z / 13.0)).astype(np.float32)
    put(_inside(x, y, z, c, ax - 5.0), skull_val)
    put(_inside(x, y, z, c, ax - 12.0), tv["csf"])
    put(_inside(x, y, z, c, ax - 14.0), tv["grey"])
    # white matter: a lobulated core under a 2..7 mm cortex (gyri)
    lob = 2.5 * np.sin(x / 6.0) * np.sin(y / 7.0) * np.cos(z / 5.0)
    put(np.clip(0.5 + (_ellipsoid_depth(x, y, z, c, ax - 18.5) + lob) / 0.8, 0, 1).astype(np.float32),
        tv["white"])
    for sx in (-1.0, 1.0):
        put(_inside(x, y, z, c + [sx * 18.0, -4.0, 2.0], [7.0, 10.0, 8.0]), tv["deep_grey"])
        put(_inside(x, y, z, c + [sx * 9.0, 0.0, 14.0], [5.0, 22.0, 10.0]), tv["ventricle"])
    put(_inside(x, y, z, c + [0.0, 4.0, 2.0], [1.6, 9.0, 7.0]), tv["ventricle"])
    put(_inside(x, y, z, c + [-34.0, 18.0, 24.0], [8.0, 12.0, 10.0]), tv["lesion"])
    return v


def _correlated_noise(rng, shape, sd, sigma_px):
    from scipy import ndimage

    n = rng.standard_normal(shape).astype(np.float32)
    n = ndimage.gaussian_filter(n, sigma_px, mode="wrap")
    return n * np.float32(sd / max(float(n.std()), 1e-6))


def make_series(out_dir: str, *, modality: str, n: int, rows: int, cols: int, pixel_mm: float,
                step_mm: float, plane: str, seed: int, noise_sd: float) -> dict:
    """Write one synthetic series and describe it."""
    from pydicom.uid import generate_uid

    from neurovfm.synth.dicom_writer import Identity, SeriesSpec, axis_aligned_geometry, write_series

    rng = np.random.default_rng(seed)
    positions, row_dir, col_dir = axis_aligned_geometry(n, rows, cols, (pixel_mm, pixel_mm), step_mm,
                                                        plane=plane, center=(0.0, 0.0, 0.0))
    cc, rr = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    planes = np.empty((n, rows, cols), np.float32)
    for k in range(n):
        p = [positions[k][a] + cc * pixel_mm * row_dir[a] + rr * pixel_mm * col_dir[a] for a in range(3)]
        v = head_phantom(p[0], p[1], p[2], modality)
        if modality == "CT":
            v += _correlated_noise(rng, (rows, cols), noise_sd, 0.8)
        else:  # magnitude (Rician) noise
            re = v + _correlated_noise(rng, (rows, cols), noise_sd, 0.6)
            im = _correlated_noise(rng, (rows, cols), noise_sd, 0.6)
            v = np.sqrt(re * re + im * im)
        planes[k] = v
    ident = Identity(study_uid=generate_uid(entropy_srcs=["bench-ingest-study", str(seed)]))
    if modality == "CT":
        spec = SeriesSpec(modality="CT", series_description="HEAD 1mm", kernel="H30s", kvp=120.0,
                          slice_thickness=step_mm,
                          series_uid=generate_uid(entropy_srcs=["bench-ingest-ct", str(seed)]),
                          frame_of_reference_uid=generate_uid(entropy_srcs=["bench-ingest-for", str(seed)]))
    else:
        spec = SeriesSpec(modality="MR", series_description="T2 TSE SAG", series_number=2,
                          image_type=("ORIGINAL", "PRIMARY", "M", "ND"), repetition_time=4000.0,
                          echo_time=95.0, field_strength=3.0, scanning_sequence="SE",
                          slice_thickness=step_mm, rescale_intercept=0.0,
                          series_uid=generate_uid(entropy_srcs=["bench-ingest-mr", str(seed)]),
                          frame_of_reference_uid=generate_uid(entropy_srcs=["bench-ingest-for", str(seed)]))
    paths = write_series(out_dir, planes, positions, row_dir, col_dir, (pixel_mm, pixel_mm), ident, spec,
                         uid_seed=f"bench-{seed}")
    return dict(modality=modality, dir=out_dir, files=len(paths), shape=[cols, rows, n], plane=plane,
                pixel_mm=pixel_mm, step_mm=step_mm, raw_bytes=int(rows * cols * n * 2),
                file_bytes=int(sum(os.path.getsize(p) for p in paths)))


def make_inputs(root: str, quick: bool, seed: int) -> dict[str, dict]:
    if quick:
        ct = dict(n=60, rows=256, cols=256, pixel_mm=0.9, step_mm=2.5)
    else:
        ct = dict(n=150, rows=512, cols=512, pixel_mm=0.45, step_mm=1.0)
    mr = dict(n=30, rows=256, cols=256, pixel_mm=0.9, step_mm=5.0)
    out = {}
    name = f"CT {ct['cols']}x{ct['rows']}x{ct['n']} axial"
    out[name] = make_series(os.path.join(root, "ct"), modality="CT", plane="axial", seed=seed,
                            noise_sd=5.0, **ct)
    name = f"MR {mr['cols']}x{mr['rows']}x{mr['n']} sagittal"
    out[name] = make_series(os.path.join(root, "mr"), modality="MR", plane="sagittal", seed=seed + 1,
                            noise_sd=15.0, **mr)
    return out


def make_extra_inputs(root: str, seed: int) -> dict[str, dict]:
    """Parity-only input: thin (0.625 mm) slices, so 4 mm / step is not an integer and the
    through-plane sample positions fall between slices (a common GE head CT protocol)."""
    ct = dict(n=160, rows=128, cols=128, pixel_mm=1.8, step_mm=0.625)
    name = f"CT {ct['cols']}x{ct['rows']}x{ct['n']} 0.625mm"
    return {name: make_series(os.path.join(root, "ct_thin"), modality="CT", plane="axial", seed=seed + 2,
                              noise_sd=5.0, **ct)}


# ----------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------


def parity(modality: str, cv, ts, ref) -> dict:
    """Shape, affine and uint8-view agreement of our canonical volume and the reference's."""
    from neurovfm.ingest.policy import DEFAULT_POLICY
    from neurovfm.tokens.windows import mr_to_uint8, window_to_uint8

    a, b = cv.data, ref.volume
    out: dict = dict(shape_ours=list(a.shape), shape_ref=list(b.shape))
    if a.shape != b.shape:
        raise AssertionError(f"{modality}: shapes differ, ours {a.shape} vs reference {b.shape}")
    aff_err = float(np.abs(cv.affine - ref.affine).max())
    out["affine_max_abs_diff"] = aff_err
    if aff_err > 1e-3:
        raise AssertionError(f"{modality}: affines differ by {aff_err:.3g}\nours\n{cv.affine}\nreference\n{ref.affine}")
    if modality == "CT":
        brain = DEFAULT_POLICY.ct_windows[0]
        ua, ub = window_to_uint8(a, brain), window_to_uint8(b, brain)
        out["view"] = f"{brain.name} W{brain.width:g}/L{brain.level:g}"
        out["ref_view_equals_window_to_uint8"] = bool(np.array_equal(ub, ref.views[brain.name]))
        fg = (a > DEFAULT_POLICY.ct_background_hu) & (b > DEFAULT_POLICY.ct_background_hu)
        out["foreground_rule"] = "HU > -500 in both"
    else:
        lo, hi = DEFAULT_POLICY.mr_clip_percentiles
        ua, ub = mr_to_uint8(a, lo, hi), mr_to_uint8(b, lo, hi)
        out["view"] = f"mr {lo:g}-{hi:g} percentile"
        out["ref_view_equals_window_to_uint8"] = bool(np.array_equal(ub, ref.views["mr"]))
        pct = DEFAULT_POLICY.mr_background_percentile
        fg = (a > np.percentile(a, pct)) & (b > np.percentile(b, pct))
        out["foreground_rule"] = f"> {pct:g}th percentile in both"
    sel = fg & (ua > 0) & (ua < 255) & (ub > 0) & (ub < 255)
    d = np.abs(ua.astype(np.int16) - ub.astype(np.int16))[sel]
    out["compared_voxels"] = int(sel.sum())
    out["compared_fraction"] = float(sel.mean())
    out["u8_mean_abs_diff"] = float(d.mean()) if d.size else float("nan")
    out["u8_max_abs_diff"] = int(d.max()) if d.size else 0
    out["u8_equal_fraction"] = float((d == 0).mean()) if d.size else float("nan")
    out["float_mean_abs_diff_fg"] = float(np.abs(a - b)[fg].mean()) if fg.any() else float("nan")
    out["float_max_abs_diff"] = float(np.abs(a - b).max())
    ours_tok = {tuple(c) for c in ts.coords.tolist()}
    ref_tok = {tuple(c) for c in ref.coords.tolist()}
    out["tokens_ours"] = len(ours_tok)
    out["tokens_ref"] = len(ref_tok)
    out["tokens_jaccard"] = len(ours_tok & ref_tok) / max(len(ours_tok | ref_tok), 1)
    return out


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)

    def add(self, wall: float, cpu: float, stages: dict[str, float]) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.stages.append(stages)

    def summary(self) -> dict:
        med = statistics.median(self.wall)
        return dict(
            median_s=med,
            series_per_s=1.0 / med,
            min_s=min(self.wall),
            max_s=max(self.wall),
            median_cpu_s=statistics.median(self.cpu),
            stages_median_s={k: statistics.median(s[k] for s in self.stages) for k in self.stages[0]},
            runs_s=self.wall,
        )


def _timed(fn):
    import gc

    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _memory_subprocess(pipeline: str, directory: str, modality: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memprobe", pipeline, "--series-dir", directory,
           "--modality", modality]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(REPO, "src"), HERE, env.get("PYTHONPATH")) if p)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {pipeline} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    import pydicom
    import scipy
    import SimpleITK as sitk

    import reference_sitk

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(python=platform.python_version(), numpy=np.__version__, scipy=scipy.__version__,
                pydicom=pydicom.__version__, simpleitk=sitk.Version_VersionString(),
                cpu=cpu, cpu_count=os.cpu_count(), sitk_threads=reference_sitk.sitk_threads(),
                platform=platform.platform())


def _fmt_stages(st: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in st.items())


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per pipeline and input (median reported)")
    ap.add_argument("--quick", action="store_true", help="smaller CT (256x256x60) for a smoke run")
    ap.add_argument("--seed", type=int, default=20250102)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/ingest.json, "
                                                  "ingest_quick.json with --quick)")
    ap.add_argument("--workdir", default=None, help="where to write the DICOM series (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated series")
    ap.add_argument("--no-extra", action="store_true", help="skip the extra thin-slice parity check")
    ap.add_argument("--memprobe", choices=("ours", "ref"), help=argparse.SUPPRESS)
    ap.add_argument("--series-dir", help=argparse.SUPPRESS)
    ap.add_argument("--modality", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memprobe:
        print(json.dumps(memprobe(args.memprobe, args.series_dir, args.modality)))
        return 0
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import reference_sitk

    command = " ".join(shlex.quote(a) for a in
                       [os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                        os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:])
    out_path = args.out or os.path.join(REPO, "bench", "results", "ingest_quick.json" if args.quick else "ingest.json")
    t_start = time.perf_counter()
    root = args.workdir or tempfile.mkdtemp(prefix="neurovfm-bench-")
    os.makedirs(root, exist_ok=True)
    try:
        print(f"writing synthetic series to {root} (seed {args.seed}) ...", flush=True)
        t0 = time.perf_counter()
        inputs = make_inputs(root, args.quick, args.seed)
        gen_s = time.perf_counter() - t0
        for name, d in inputs.items():
            print(f"  {name}: {d['files']} files, {_mib(d['file_bytes'])}, {d['pixel_mm']} mm pixels, "
                  f"{d['step_mm']} mm slices", flush=True)
        print(f"  ({gen_s:.1f} s)", flush=True)

        # warm-up (page cache, lazy imports) and parity, untimed
        results: dict[str, dict] = {}
        for name, d in inputs.items():
            cv, ts, _ = run_ours(d["dir"])
            ref = reference_sitk.run_reference(d["dir"], d["modality"])
            results[name] = dict(input={k: v for k, v in d.items() if k != "dir"},
                                 parity=parity(d["modality"], cv, ts, ref))
            del cv, ts, ref

        # extra parity-only check (not timed, no target)
        extra_inputs = {} if args.no_extra else make_extra_inputs(root, args.seed)
        extra: dict[str, dict] = {}
        for name, d in extra_inputs.items():
            cv, ts, _ = run_ours(d["dir"])
            ref = reference_sitk.run_reference(d["dir"], d["modality"])
            extra[name] = dict(input={k: v for k, v in d.items() if k != "dir"},
                               parity=parity(d["modality"], cv, ts, ref))
            del cv, ts, ref

        # timed, interleaved; the order alternates every repeat
        runs = {name: {"ours": Runs(), "ref": Runs()} for name in inputs}
        print(f"timing: {args.repeats} repeats per pipeline and input, interleaved ...", flush=True)
        for r in range(args.repeats):
            for name, d in inputs.items():
                order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
                for which in order:
                    if which == "ours":
                        (cv, ts, st), wall, cpu = _timed(lambda: run_ours(d["dir"]))
                        del cv, ts
                    else:
                        ref, wall, cpu = _timed(lambda: reference_sitk.run_reference(d["dir"], d["modality"]))
                        st = ref.timings
                        del ref
                    runs[name][which].add(wall, cpu, st)
        for name in inputs:
            o, f = runs[name]["ours"].summary(), runs[name]["ref"].summary()
            results[name]["ours"] = o
            results[name]["ref"] = f
            results[name]["throughput_ratio"] = o["series_per_s"] / f["series_per_s"]

        # memory: one series per fresh subprocess
        print("memory: one series per pipeline in a fresh subprocess ...", flush=True)
        memory: dict[str, dict] = {}
        for name, d in inputs.items():
            m = {p: _memory_subprocess(p, d["dir"], d["modality"]) for p in ("ours", "ref")}
            for p in m.values():
                p["growth_over_raw"] = p["growth_bytes"] / d["raw_bytes"]
            m["raw_bytes"] = d["raw_bytes"]
            memory[name] = m
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    # ------------------------------------------------------------------ report
    ct_name = next(n for n, d in inputs.items() if d["modality"] == "CT")
    bar = "-" * 118
    print()
    print(f"NeuroVFM ingestion vs SimpleITK reference  ({'quick' if args.quick else 'full'} run, "
          f"{args.repeats} repeats, median)")
    info = _versions()
    print(f"machine: {info['cpu']}, {info['cpu_count']} cores; SimpleITK {info['simpleitk']} with its default "
          f"{info['sitk_threads']} threads; ours single-threaded numpy/scipy")
    print(bar)
    print(f"{'input':<26}{'pipeline':<11}{'median s':>9}{'series/s':>10}{'cpu s':>8}   stages (median s)")
    print(bar)
    for name in inputs:
        for which, label in (("ours", "ours"), ("ref", "reference")):
            s = results[name][which]
            print(f"{name if which == 'ours' else '':<26}{label:<11}{s['median_s']:>9.3f}{s['series_per_s']:>10.2f}"
                  f"{s['median_cpu_s']:>8.2f}   {_fmt_stages(s['stages_median_s'])}")
        print(f"{'':<26}{'ratio':<11}{'':>9}{results[name]['throughput_ratio']:>9.2f}x   ours/reference throughput")
    print(bar)
    print("parity (ours vs reference, uint8 view over foreground voxels that neither saturates)")
    print(f"{'input':<26}{'shape':>14}{'affine err':>12}{'view':>24}{'MAD u8':>8}{'max':>5}{'equal':>7}"
          f"{'voxels':>9}{'HU/MR MAD':>11}{'tokens o/r':>12}")
    rows = [(n, results[n]["parity"]) for n in inputs] + [(n, e["parity"]) for n, e in extra.items()]
    for name, p in rows:
        print(f"{name:<26}{'x'.join(map(str, p['shape_ours'])):>14}{p['affine_max_abs_diff']:>12.1e}{p['view']:>24}"
              f"{p['u8_mean_abs_diff']:>8.3f}{p['u8_max_abs_diff']:>5}{p['u8_equal_fraction']:>7.1%}"
              f"{p['compared_voxels']:>9}{p['float_mean_abs_diff_fg']:>11.2e}"
              f"{str(p['tokens_ours']) + '/' + str(p['tokens_ref']):>12}")
    for name in extra:
        print(f"  {name}: extra check, parity only (not timed, no target): through-plane positions fall "
              "between slices here")
    print(bar)
    print("memory: peak RSS growth processing one series in a fresh subprocess (after imports)")
    for name in inputs:
        m = memory[name]
        print(f"{name:<26}raw int16 {_mib(m['raw_bytes']):>11}   "
              f"ours {_mib(m['ours']['growth_bytes']):>11} ({m['ours']['growth_over_raw']:.2f}x raw)   "
              f"reference {_mib(m['ref']['growth_bytes']):>11} ({m['ref']['growth_over_raw']:.2f}x raw)   "
              f"ours/ref {m['ours']['growth_bytes'] / max(m['ref']['growth_bytes'], 1):.2f}")
    print(f"  ({memory[ct_name]['ours']['method']})")
    print(bar)

    targets = {}
    for name in inputs:
        targets[f"throughput >= 2x reference [{name}]"] = (results[name]["throughput_ratio"],
                                                           results[name]["throughput_ratio"] >= 2.0)
        mad = results[name]["parity"]["u8_mean_abs_diff"]
        targets[f"uint8 MAD <= 2 levels [{name}]"] = (mad, bool(mad <= 2.0))
    g = memory[ct_name]["ours"]["growth_over_raw"]
    targets[f"ours peak RSS growth <= 2x raw [{ct_name}]"] = (g, g <= 2.0)
    print("targets" + (" (--quick is a smoke run: the targets are defined on the full-size inputs)"
                       if args.quick else ""))
    for k, (v, ok) in targets.items():
        print(f"  {'PASS' if ok else 'MISS'}  {k}: {v:.3f}")
    for name, e in extra.items():
        print(f"  info  uint8 MAD [{name}, extra parity check]: {e['parity']['u8_mean_abs_diff']:.3f} "
              f"(max {e['parity']['u8_max_abs_diff']})")
    total_s = time.perf_counter() - t_start

    doc = dict(
        benchmark="ingest", command=command, cwd=os.getcwd(), quick=args.quick, repeats=args.repeats,
        seed=args.seed, generated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), total_seconds=total_s,
        generation_seconds=gen_s, machine=info,
        notes=[
            "series/s = 1 / median wall time of one series, directory listing to tokens; runs interleaved, "
            "order alternating per repeat, files warm in the page cache",
            "reference: SimpleITK ImageSeriesReader -> DICOMOrient RPI -> Resample sitkBSpline (float32 output) "
            "-> Extract centre crop -> windows / percentile scaling -> tokens; SimpleITK threads left at default",
            "memory: VmHWM after processing minus VmRSS after imports, in a fresh subprocess per pipeline",
        ],
        inputs=results, extra_parity=extra, memory=memory,
        targets={k: dict(value=v, passed=bool(ok)) for k, (v, ok) in targets.items()},
    )
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=False)
        fh.write("\n")
    print(f"wrote {os.path.relpath(out_path)}  (total {total_s:.0f} s)")
    print(f"command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
