"""Encoder speed, side by side in one run: our packed ViT-B against MONAI's ViT over the full
grid, a padded per-series path (SDPA with a key-padding mask, the reference's inference path)
and a plain PyTorch transformer encoder over the same foreground tokens; FLOPs counted on
real tokens only, MFU against the matrix-multiply rate this script measures; plus Vol-JEPA
pretraining tokens/s and peak memory for ViT-Small.

    python bench/encoder/bench_encoder.py --cache CACHE [--seed 0] [--device cpu|cuda]
    python bench/encoder/bench_encoder.py --cache CACHE --export studies.npz   # for another machine
    python bench/encoder/bench_encoder.py --studies studies.npz --device cuda

Studies are fixed by the seed: one CT study (one series -> its 3 windows) and one MRI study
with 6 series of different lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from neurovfm.models.attention import resolve_backend
from neurovfm.models.config import PredictorConfig, encoder_config
from neurovfm.models.encoder import Encoder
from neurovfm.models.packing import Packed, pad
from neurovfm.tokens.normalize import normalize


# -- studies ------------------------------------------------------------------------------------------
def pick_studies(cache_dir: str, seed: int) -> list[dict]:
    from neurovfm.tokens.cache import TokenCache

    c = TokenCache(cache_dir)
    by: dict[str, list] = {}
    for e in c.series():
        by.setdefault(e.study_key, []).append(e)
    rng = np.random.default_rng(seed)
    ct = sorted(k for k, v in by.items() if v[0].modality == "CT" and len(v) >= 1)
    mr = sorted(k for k, v in by.items() if v[0].modality == "MR" and len(v) >= 6
                and len({e.n_tokens for e in v[:6]}) == 6)
    out = []
    ct_key = ct[rng.integers(len(ct))]
    e = by[ct_key][0]
    u8, coords, names = c.views(e)
    series = [dict(tokens=np.ascontiguousarray(u8[:, i]), coords=np.asarray(coords), view=nm,
                   grid=json.loads(e.grid_shape)) for i, nm in enumerate(names)]
    out.append(dict(name="CT study (1 series x 3 windows)", series=series))
    mr_key = mr[rng.integers(len(mr))]
    series = []
    for e in by[mr_key][:6]:
        u8, coords, _ = c.views(e)
        series.append(dict(tokens=np.ascontiguousarray(u8[:, 0]), coords=np.asarray(coords), view="mr",
                           grid=json.loads(e.grid_shape)))
    out.append(dict(name="MRI study (6 series)", series=series))
    c.close()
    return out


def save_studies(path: str, studies: list[dict]) -> None:
    arrs = {}
    meta = []
    for i, st in enumerate(studies):
        meta.append({"name": st["name"], "series": []})
        for j, s in enumerate(st["series"]):
            arrs[f"t{i}_{j}"] = s["tokens"]
            arrs[f"c{i}_{j}"] = s["coords"]
            meta[-1]["series"].append({"view": s["view"], "grid": s["grid"]})
    np.savez_compressed(path, meta=json.dumps(meta), **arrs)


def load_studies(path: str) -> list[dict]:
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    return [{"name": m["name"], "series": [dict(tokens=z[f"t{i}_{j}"], coords=z[f"c{i}_{j}"], **s)
                                          for j, s in enumerate(m["series"])]} for i, m in enumerate(meta)]


def packed_of(study: dict, device) -> Packed:
    return Packed.cat([(normalize(s["tokens"], s["view"]), torch.from_numpy(s["coords"].astype(np.int64)))
                       for s in study["series"]]).to(device)


# -- FLOPs and the machine's rate --------------------------------------------------------------------
def encoder_flops(lengths: list[int], width: int, depth: int, mlp: float, token_dim: int, embed: int) -> float:
    f = 0.0
    for L in lengths:
        f += 2 * L * token_dim * embed
        per_layer = 2 * L * width * 3 * width + 2 * L * width * width + 2 * 2 * L * width * int(width * mlp)
        per_layer += 2 * 2 * L * L * width  # q k^T and attention x v
        f += depth * per_layer
    return f


def padding_ceiling(lengths: list[int], cfg) -> float:
    """FLOPs of the padded path (every series padded to the longest) over FLOPs on real tokens: the
    most any packed path can gain over it at equal efficiency (key-padding masks do not skip work)."""
    args = (cfg.width, cfg.depth, cfg.mlp_ratio, cfg.token_dim, cfg.embed_dim)
    return encoder_flops([max(lengths)] * len(lengths), *args) / encoder_flops(list(lengths), *args)


def padding_survey(cache_dir: str, cfg, n_series: int = 6) -> dict:
    """The padding ceiling over every MRI study of the cache with >= ``n_series`` series (their
    first ``n_series``, as the timed study), so the one timed study can be read against the archive."""
    from neurovfm.tokens.cache import TokenCache

    c = TokenCache(cache_dir)
    by: dict[str, list] = {}
    for e in c.series():
        by.setdefault(e.study_key, []).append(e)
    c.close()
    ceil = np.array([padding_ceiling([e.n_tokens for e in v[:n_series]], cfg)
                     for v in by.values() if v[0].modality == "MR" and len(v) >= n_series])
    return {"mri_studies": int(ceil.size), "series_per_study": n_series,
            "ceiling_p10_p50_p90": [float(x) for x in np.percentile(ceil, [10, 50, 90])] if ceil.size else [],
            "ceiling_max": float(ceil.max()) if ceil.size else None,
            "fraction_with_ceiling_ge_1.3": float((ceil >= 1.3).mean()) if ceil.size else None}


def matmul_rate(device, dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n ** 3 / best


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit_interleaved(fns: dict, device, repeats: int) -> dict:
    """Median seconds per function, measured round-robin (one call of each per round), so a
    machine whose load drifts affects every method alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for k, fn in list(fns.items()):
        try:
            fn()  # warm-up (and compile, for flex on CUDA)
            sync(device)
        except Exception as e:  # a backend that cannot run here is reported, not fatal
            print(f"  {k} failed: {type(e).__name__}: {str(e)[:160]}")
            del fns[k]
            times[k] = []
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v) if v else None) for k, v in times.items()}


def timeit(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# -- the compared models ---------------------------------------------------------------------------------
class PlainEncoder(nn.Module):
    """nn.TransformerEncoder (PyTorch's own fast path) with the same width, depth and embed."""

    def __init__(self, cfg):
        super().__init__()
        self.embed = nn.Linear(cfg.token_dim, cfg.width)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, int(cfg.width * cfg.mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)

    def forward(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.enc(self.embed(g)) for g in groups]


def equal_length_groups(p: Packed) -> list[torch.Tensor]:
    """Series of one length stacked [G, L, T] (no padding): the plain encoder's best case."""
    by: dict[int, list[torch.Tensor]] = {}
    for t in p.split(p.tokens):
        by.setdefault(t.shape[0], []).append(t)
    return [torch.stack(v) for v in by.values()]


def full_grid_volumes(study: dict, device) -> list[torch.Tensor]:
    """Each series as the full [1, D*4, H*16, W*16] volume (background zero), grouped by grid."""
    from neurovfm.tokens.patches import unpatchify

    by: dict[tuple, list[torch.Tensor]] = {}
    for s in study["series"]:
        grid = tuple(s["grid"])
        full = np.zeros((int(np.prod(grid)), s["tokens"].shape[1]), np.float32)
        flat = np.ravel_multi_index(s["coords"].T.astype(np.int64), grid)
        full[flat] = normalize(s["tokens"], s["view"]).numpy()
        vol = unpatchify(full, grid, (4, 16, 16))
        by.setdefault(grid, []).append(torch.from_numpy(np.ascontiguousarray(vol))[None])
    return [torch.stack(v).to(device) for v in by.values()]


def monai_vits(grids, cfg, device):
    from monai.networks.nets import ViT

    nets = {}
    for g in grids:
        img = (g[0] * 4, g[1] * 16, g[2] * 16)
        nets[g] = ViT(in_channels=1, img_size=img, patch_size=(4, 16, 16), hidden_size=cfg.width,
                      mlp_dim=int(cfg.width * cfg.mlp_ratio), num_layers=cfg.depth, num_heads=cfg.heads,
                      classification=False, qkv_bias=True).to(device).eval()
    return nets


# -- pretraining throughput ---------------------------------------------------------------------------------
def pretrain_rate(studies, device, amp, steps: int) -> dict:
    from neurovfm.pretrain.data import JEPABatch
    from neurovfm.pretrain.jepa import JEPA, make_teacher, teacher_targets
    from neurovfm.pretrain.masks import MaskConfig, make_mask

    enc_cfg = encoder_config("small")
    torch.manual_seed(0)
    model = JEPA(enc_cfg, PredictorConfig(width=192, depth=4, heads=6)).to(device)
    teacher = make_teacher(model.student)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    series = [s for st in studies for s in st["series"]]
    rng = np.random.default_rng(0)
    ctxs, tgts = [], []
    for s in series:
        c, t = make_mask(s["coords"].astype(np.int64), "CT" if s["view"] != "mr" else "MR", MaskConfig(), rng)
        ctxs.append(c)
        tgts.append(t)
    p = Packed.cat([(normalize(s["tokens"], s["view"]), torch.from_numpy(s["coords"].astype(np.int64)))
                    for s in series])
    off = p.cu[:-1]
    batch = JEPABatch(p.to(device), torch.from_numpy(np.concatenate([c + o for c, o in zip(ctxs, off)])).to(device),
                      torch.from_numpy(np.concatenate([t + o for t, o in zip(tgts, off)])).to(device),
                      [0] + np.cumsum([len(c) for c in ctxs]).tolist(), [0] + np.cumsum([len(t) for t in tgts]).tolist(),
                      [], [s["view"] for s in series], torch.zeros(p.tokens.shape[0], dtype=torch.int8))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            target, _ = teacher_targets(teacher, batch)
            loss, *_ = model(batch, target)
        opt.zero_grad()
        (loss / target.shape[0]).backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        t = timeit(step, device, steps)
        peak = torch.cuda.max_memory_allocated()
    else:  # resident memory sampled every 2 ms while the steps run, above what was resident before
        import threading

        import psutil

        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        top = [rss0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                top[0] = max(top[0], proc.memory_info().rss)
                time.sleep(0.002)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t = timeit(step, device, steps)
        done.set()
        th.join()
        peak = top[0] - rss0
    return {"model": "ViT-Small + predictor 192x4", "tokens_per_step": p.tokens.shape[0],
            "tokens_per_s": p.tokens.shape[0] / t, "seconds_per_step": t,
            "peak_memory_bytes": int(peak), "peak_memory_note": "CUDA max allocated" if device.type == "cuda"
            else "peak resident memory during the steps above the resident memory before them (CPU)"}


# -- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache")
    ap.add_argument("--studies", help="npz written by --export (no cache needed)")
    ap.add_argument("--export", help="write the chosen studies to this npz and exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pretrain-steps", type=int, default=3)
    ap.add_argument("--skip-monai", action="store_true")
    ap.add_argument("--size", default="base", help="encoder size compared (the targets are for base)")
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--only-pretrain", action="store_true", help="only the pretraining measurement (merged into --out)")
    ap.add_argument("--only-padding-survey", action="store_true",
                    help="only the padded-path FLOP ceiling over the cache's MRI studies (merged into --out)")
    a = ap.parse_args(argv)
    if a.only_padding_survey:
        cfg = encoder_config(a.size)
        sv = padding_survey(a.cache, cfg)
        res = json.load(open(a.out)) if a.out and os.path.exists(a.out) else {}
        for row in res.get("studies", []):
            row["padding_ceiling"] = padding_ceiling(row["series_tokens"], cfg)
        res["padding_survey"] = sv
        res["padding_survey_command"] = " ".join(["bench/encoder/bench_encoder.py"] + (argv or sys.argv[1:]))
        print(json.dumps(sv), *(f"{r['study']}: ceiling {r['padding_ceiling']:.3f}" for r in res.get("studies", [])), sep="\n")
        if a.out:
            with open(a.out, "w") as fh:
                json.dump(res, fh, indent=1)
        return 0
    studies = load_studies(a.studies) if a.studies else pick_studies(a.cache, a.seed)
    if a.only_pretrain:  # rerun the pretraining measurement alone, into an existing results file
        pt = pretrain_rate(studies, torch.device(a.device), a.device == "cuda", a.pretrain_steps)
        print(json.dumps(pt))
        if a.out:
            res = json.load(open(a.out)) if os.path.exists(a.out) else {}
            res["pretrain"] = pt
            res["pretrain_command"] = " ".join(["bench/encoder/bench_encoder.py"] + (argv or sys.argv[1:]))
            with open(a.out, "w") as fh:
                json.dump(res, fh, indent=1)
        return 0
    if a.export:
        save_studies(a.export, studies)
        print(f"wrote {a.export}")
        return 0
    device = torch.device(a.device)
    amp = device.type == "cuda"
    dtype_rate = torch.bfloat16 if amp else torch.float32
    peak = matmul_rate(device, dtype_rate)
    cfg = encoder_config(a.size)
    torch.manual_seed(0)
    ours = Encoder(cfg).to(device).eval()
    plain = PlainEncoder(cfg).to(device).eval()
    res = {"device": torch.cuda.get_device_name() if amp else platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "precision": "bf16 autocast" if amp else "fp32",
           "matmul_flops_per_s": peak, "studies": []}
    print(f"device {res['device']}  {res['precision']}  measured matmul rate {peak / 1e9:.1f} GFLOP/s")
    ac = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    for st in studies:
        p = packed_of(st, device)
        lengths = p.lengths
        fg = [len(s["coords"]) / float(np.prod(s["grid"])) for s in st["series"]]
        flops = encoder_flops(lengths, cfg.width, cfg.depth, cfg.mlp_ratio, cfg.token_dim, cfg.embed_dim)
        row = {"study": st["name"], "series_tokens": lengths, "grids": [s["grid"] for s in st["series"]],
               "foreground_fraction": fg, "real_token_gflop": flops / 1e9, "seconds": {},
               "padding_ceiling": padding_ceiling(lengths, cfg)}
        print(f"\n{st['name']}: tokens per series {lengths}; foreground fraction "
              + ", ".join(f"{f:.2f}" for f in fg))
        import dataclasses

        fns = {}
        for be in ["loop", "nested", "flex", "mask", "varlen", "flash"]:
            try:
                resolve_backend(be, device)
            except Exception:
                continue
            if be == "mask" and p.tokens.shape[0] > 6000:
                continue
            enc_be = Encoder(dataclasses.replace(cfg, attention=be)).to(device).eval()
            enc_be.load_state_dict(ours.state_dict())
            fns[f"ours[{be}]"] = (lambda e=enc_be: e(p))
        auto = resolve_backend("auto", device)
        row["auto_backend"] = auto
        t_pad, valid = pad(p.tokens, p.cu)
        c_pad, _ = pad(p.coords, p.cu)
        fns["padded_sdpa"] = lambda: ours.forward_padded(t_pad, c_pad, valid)
        groups = equal_length_groups(p)
        fns["plain_torch_encoder"] = lambda: plain(groups)
        if not a.skip_monai:
            vols = full_grid_volumes(st, device)
            nets = monai_vits([tuple(s // q for s, q in zip(v.shape[-3:], (4, 16, 16))) for v in vols], cfg, device)

            def run_monai():
                for v in vols:
                    nets[tuple(s // q for s, q in zip(v.shape[-3:], (4, 16, 16)))](v)
            fns["monai_vit_full_grid"] = run_monai
        with torch.inference_mode(), ac():
            row["seconds"] = timeit_interleaved(fns, device, a.repeats)
        ok = {k: v for k, v in row["seconds"].items() if v}
        best_ours = min(v for k, v in ok.items() if k.startswith("ours["))
        t_ours = ok[f"ours[{auto}]"]
        row["studies_per_s"] = {k: 1.0 / v for k, v in ok.items()}
        row["ratios_vs_ours_auto"] = {k: v / t_ours for k, v in ok.items()}
        row["mfu_ours_auto"] = flops / t_ours / peak
        row["best_ours_backend"] = min((v, k) for k, v in ok.items() if k.startswith("ours["))[1]
        for k, v in sorted(ok.items(), key=lambda kv: kv[1]):
            print(f"  {k:24s} {v * 1000:9.1f} ms  {1 / v:7.2f} studies/s  ours is {v / t_ours:5.2f}x faster")
        print(f"  padded path does {row['padding_ceiling']:.2f}x the real-token FLOPs (the most packing can gain)")
        print(f"  MFU ours[{auto}] {row['mfu_ours_auto'] * 100:.1f} % ({flops / t_ours / 1e9:.1f} GFLOP/s on real tokens); "
              f"best backend here {row['best_ours_backend']} ({best_ours * 1000:.1f} ms)")
        res["studies"].append(row)
    pt = pretrain_rate(studies, device, amp, a.pretrain_steps)
    res["pretrain"] = pt
    print(f"\npretraining {pt['model']}: {pt['tokens_per_s']:.0f} tokens/s "
          f"({pt['tokens_per_step']} tokens/step), peak memory {pt['peak_memory_bytes'] / 2**20:.0f} MiB ({pt['peak_memory_note']})")
    res["command"] = " ".join([os.path.basename(sys.executable), "bench/encoder/bench_encoder.py"] + (argv or sys.argv[1:]))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
