"""The ``neurovfm`` command line: one subcommand per stage of the data's path."""

from __future__ import annotations

import argparse
import json
import os
import sys

from neurovfm import __version__
from neurovfm.errors import NeuroVFMError
from neurovfm.explain import MAP_SOURCES


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = text.split("/")
        return int(i), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/N, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_ingest(a: argparse.Namespace) -> int:
    from neurovfm.ingest.pipeline import IngestOptions, run_ingest

    opts = IngestOptions(workers=a.workers, shard=a.shard, modality=a.modality, strict=a.strict,
                         progress=not a.quiet, series_per_shard=a.series_per_shard)
    summary = run_ingest(a.src, a.cache, opts)
    print(summary.table())
    if a.show_paths and summary.refused_files:
        print("refused (paths are shown here only, never written to the cache):")
        for rel, status, code, reason in summary.refused_files:
            print(f"  {status:7s} {code:20s} {rel}: {reason}")
    print(f"manifest: {a.cache.rstrip('/')}/manifest.csv")
    if a.strict and summary.failed:
        print(f"--strict: {summary.failed} failure(s)", file=sys.stderr)
        return 1
    return 0


def cmd_audit(a: argparse.Namespace) -> int:
    from neurovfm.privacy.audit import audit

    rep = audit(a.cache, a.source)
    print(f"needles: {rep.needles}  files: {rep.files_scanned}  bytes: {rep.bytes_scanned}")
    if rep.clean:
        print("PHI audit: clean (no identifying value from the source headers found in the cache)")
        return 0
    print(f"PHI audit: FOUND {len(rep.hits)} identifying value(s) in the cache:", file=sys.stderr)
    for f, kind, off in rep.hits[:50]:
        print(f"  {f} @ {off}: value of {kind}", file=sys.stderr)
    return 3


def cmd_cache_info(a: argparse.Namespace) -> int:
    from collections import Counter

    from neurovfm.tokens.cache import TokenCache

    c = TokenCache(a.cache)
    rows = c.series()
    by = Counter((r.modality, r.sequence or r.kernel) for r in rows)
    info = {
        "series": len(rows),
        "tokens": int(sum(r.n_tokens for r in rows)),
        "schema_hash": c.meta["schema_hash"],
        "policy_hash": c.policy_hash,
        "by_type": {f"{m}/{s}": n for (m, s), n in sorted(by.items(), key=lambda kv: str(kv[0]))},
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from neurovfm.synth.archive import write_anatomy_maps, write_archive

    if a.anatomy_only:
        print(json.dumps(write_anatomy_maps(a.out, a.studies, a.seed, site=a.site, workers=a.workers,
                                            progress=not a.quiet)))
        return 0
    summary = write_archive(a.out, a.studies, a.seed, site=a.site, workers=a.workers, preview=a.preview,
                            progress=not a.quiet, nifti=a.nifti)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_rekey(a: argparse.Namespace) -> int:
    from neurovfm.privacy.keys import Keyer
    from neurovfm.synth.rekey import rekey_archive

    paths = rekey_archive(a.archive, a.out, Keyer.from_site())
    print("\n".join(paths))
    return 0


def cmd_pretrain(a: argparse.Namespace) -> int:
    from neurovfm.distributed import shutdown_distributed
    from neurovfm.pretrain.config import load_config
    from neurovfm.pretrain.loop import pretrain

    cfg = load_config(a.config, a.set)
    done = False
    try:
        res = pretrain(cfg, resume=a.resume, max_steps=a.max_steps, progress=not a.quiet,
                       command=["neurovfm", "pretrain"] + sys.argv[2:])
        done = True
    finally:  # every rank done before any tears down (a peer closing first made gloo abort the other)
        shutdown_distributed(wait_for_peers=done)
    if res.get("checkpoint") and int(os.environ.get("RANK", "0")) == 0:
        last = res["last"]
        print(json.dumps({"step": res["step"], "total_steps": res["total"], "loss": last.get("loss"),
                          "checkpoint": res["checkpoint"], "model": res["model"]}))
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from neurovfm.probe.embed import EmbedConfig, embed

    cfg = EmbedConfig(tokens_per_batch=a.tokens_per_batch, part_tokens=a.part_tokens,
                      ct_windows=a.ct_windows.split(",") if a.ct_windows else None, device=a.device,
                      precision=a.precision, splits=a.splits.split(",") if a.splits else [],
                      layers=a.layers, append_histogram=a.append_histogram, append_context=a.append_context)
    res = embed(a.model, a.cache, a.out, cfg, splits_csv=a.splits_csv, shard=a.shard, progress=not a.quiet)
    print(json.dumps(res))
    return 0


def cmd_add_context(a: argparse.Namespace) -> int:
    from neurovfm.probe.context import derive_context_store

    if a.cross_series_mm is not None and not a.cross_series:
        raise ValueError("--cross-series-mm sets the distance of --cross-series, which was not given")
    cross = (16.0 if a.cross_series_mm is None else a.cross_series_mm) if a.cross_series else None
    radius = a.radius or None
    print(json.dumps(derive_context_store(a.features, a.out, radius, progress=not a.quiet, cross_series_mm=cross,
                                          cache_dir=a.cache)))
    return 0


def cmd_init_model(a: argparse.Namespace) -> int:
    """A random-init encoder folder: the baseline every pretrained result is compared with."""
    import torch

    from neurovfm.models.config import EncoderConfig, encoder_config
    from neurovfm.models.encoder import Encoder
    from neurovfm.models.folder import make_provenance, read_config, save_encoder

    if a.like:
        ecfg = EncoderConfig.from_dict(read_config(a.like)["encoder"])
    else:
        ecfg = encoder_config(a.size)
    torch.manual_seed(a.seed)
    enc = Encoder(ecfg)
    save_encoder(enc, a.out, provenance=make_provenance(command=["neurovfm", "init-model"] + sys.argv[2:],
                                                        init={"kind": "random", "seed": a.seed}))
    print(a.out)
    return 0


def cmd_import_reference(a: argparse.Namespace) -> int:
    """The reference encoder checkpoint (weights-only read, every key and shape checked) -> model folder."""
    from neurovfm.models.reference import LICENSE_NOTE, import_reference

    r = import_reference(a.src, a.out, provenance_note=a.note,
                         command=["neurovfm", "import-reference"] + sys.argv[2:])
    print(f"{r.folder}\t{r.n_params} parameters ({r.depth} blocks, sha256 {r.sha256[:12]})")
    print(f"note: {LICENSE_NOTE}", file=sys.stderr)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from neurovfm.eval.data import read_label_names
    from neurovfm.eval.experiment import EvalConfig, evaluate
    from neurovfm.probe.cnn3d import CNNConfig
    from neurovfm.probe.train import HeadTrainConfig

    if a.cnn_seeds != 1 and not a.cnn_baseline:
        raise ValueError("--cnn-seeds is the CNN baseline's ensemble size: it needs --cnn-baseline")
    if a.cnn_point_sampled and not a.cnn_baseline:
        raise ValueError("--cnn-point-sampled prepares the CNN baseline's inputs: it needs --cnn-baseline")
    if a.cnn_inplane_mm != 3.0 and not a.cnn_baseline:
        raise ValueError("--cnn-inplane-mm is the CNN baseline's grid: it needs --cnn-baseline")
    if a.token_masks and not a.cache:
        raise ValueError("--token-masks maps lesion masks onto the token grid: it needs --cache")
    feats = _named_features(a.features)
    names = {}
    if a.ct_labels:
        names["CT"] = read_label_names(a.ct_labels)
    if a.mr_labels:
        names["MR"] = read_label_names(a.mr_labels)
    cfg = EvalConfig(head=_head_config(a, "gated" if a.head == "auto" else a.head),
                     head_auto=a.head == "auto",
                     train=HeadTrainConfig(epochs=a.epochs, seed=a.seed, token_weight=a.token_weight,
                                           token_balance=a.token_balance),
                     token_masks=a.token_masks,
                     calibration=a.calibration, target_sensitivity=a.target_sensitivity,
                     min_test_positives=a.min_test_positives, bootstrap=a.bootstrap, seed=a.seed,
                     modalities=a.modalities.split(","), comparator_flag_rate=a.comparator_flag_rate,
                     **({"comparator_name": a.comparator_name} if a.comparator_name else {}),
                     cnn=CNNConfig(epochs=a.cnn_epochs, seed=a.seed, ensemble=a.cnn_seeds,
                                   antialias=not a.cnn_point_sampled, inplane_mm=a.cnn_inplane_mm)
                     if a.cnn_baseline else None)
    summary = evaluate(feats, a.labels, a.out, cfg, cache_dir=a.cache, label_names=names or None,
                       save_model=a.save_model, progress=not a.quiet)
    brief = {n: {m: (e.get("macro_auroc") or {}).get("estimate") for m, e in per.items()}
             for n, per in summary["models"].items()}
    print(json.dumps({"out": a.out, "macro_auroc": brief,
                      "comparisons": {k: {m: {x: d.get(x) for x in ("estimate", "low", "high")} for m, d in v.items()}
                                      for k, v in summary["comparisons"].items()}}))
    return 0


def _named_features(items: list[str]) -> dict[str, str]:
    """``NAME=DIR`` (or a bare ``DIR``, named after its folder) -> {name: dir}, names unique."""
    feats: dict[str, str] = {}
    for item in items:
        name, _, path = item.rpartition("=")
        name = name or os.path.basename(os.path.normpath(path))
        if name in feats:
            raise ValueError(f"--features: name {name!r} given twice (use NAME=PATH)")
        feats[name] = path
    return feats


def _head_config(a: argparse.Namespace, kind: str):
    """The study-level head the evaluation commands share: kind, seed ensemble, standardisation."""
    from neurovfm.probe.heads import HeadConfig

    if a.head_seeds < 1:
        raise ValueError(f"--head-seeds must be >= 1, not {a.head_seeds}")
    return HeadConfig(kind=kind, ensemble=a.head_seeds, standardize=a.standardize)


def _head_args(s: argparse.ArgumentParser, seeds_extra: str = "") -> None:
    s.add_argument("--head-seeds", type=int, default=1,
                   help="a seed ensemble of this many heads per feature set (seeds --seed, --seed + 1, ...), "
                        "scored by their mean logit" + seeds_extra)
    s.add_argument("--standardize", action="store_true",
                   help="z-score each feature dimension with the training tokens' statistics before the head "
                        "(saved with the head), as linear probes of self-supervised encoders do")


def cmd_transfer(a: argparse.Namespace) -> int:
    """Cross-modal zero-shot transfer: CT-trained heads on MRI test studies and the reverse."""
    from neurovfm.eval.transfer import TransferConfig, summary_table, transfer
    from neurovfm.probe.train import HeadTrainConfig

    cfg = TransferConfig(head=_head_config(a, a.head), train=HeadTrainConfig(epochs=a.epochs, seed=a.seed),
                         min_test_positives=a.min_test_positives, bootstrap=a.bootstrap, seed=a.seed)
    summary = transfer(_named_features(a.features), a.labels, a.out, cfg, progress=not a.quiet)
    print(summary_table(summary))
    print(f"table: {os.path.join(a.out, 'transfer.csv')}  plot: {os.path.join(a.out, 'transfer.png')}")
    return 0


def cmd_label_efficiency(a: argparse.Namespace) -> int:
    """Test AUROC against the number of positive training studies per label."""
    from neurovfm.eval.efficiency import EfficiencyConfig, label_efficiency, parse_positives, summary_table
    from neurovfm.probe.train import HeadTrainConfig

    cfg = EfficiencyConfig(head=_head_config(a, a.head), train=HeadTrainConfig(epochs=a.epochs, seed=a.seed),
                           positives=parse_positives(a.positives), repeats=a.repeats,
                           min_test_positives=a.min_test_positives, modalities=a.modalities.split(","),
                           seed=a.seed)
    summary = label_efficiency(_named_features(a.features), a.labels, a.out, cfg, progress=not a.quiet)
    print(summary_table(summary))
    print(f"table: {os.path.join(a.out, 'label_efficiency.csv')}  "
          f"plot: {os.path.join(a.out, 'label_efficiency.png')}")
    return 0


def cmd_shortcut(a: argparse.Namespace) -> int:
    """Shortcut check: CT vs MR separability by token kind; head attention on air/bone tokens."""
    from neurovfm.eval.shortcut import ShortcutConfig, format_table, shortcut_check
    from neurovfm.probe.embed import FeatureStore

    feats = _named_features(a.features)
    cfg = ShortcutConfig(bootstrap=a.bootstrap, seed=a.seed, l2=a.l2,
                         ct_windows=a.ct_windows.split(",") if a.ct_windows else None)
    summary = shortcut_check({n: FeatureStore(p) for n, p in feats.items()}, a.labels, a.out, cfg,
                             eval_metrics=a.eval_metrics, paths=feats)
    print(format_table(summary))
    print(f"table: {os.path.join(a.out, 'shortcut.csv')}  plot: {os.path.join(a.out, 'shortcut.png')}")
    return 0


def cmd_lesion_probe(a: argparse.Namespace) -> int:
    """Lesion probe: can a linear readout of the token features find lesion tokens at all?"""
    from neurovfm.eval.lesion_probe import LesionProbeConfig, format_table, lesion_probe

    cfg = LesionProbeConfig(negatives_per_series=a.negatives_per_series, min_size_mm=a.min_size_mm,
                            ct_views=a.ct_views.split(","), bootstrap=a.bootstrap, seed=a.seed)
    summary = lesion_probe(_named_features(a.features), a.archive, a.cache, a.out, cfg)
    print(format_table(summary))
    print(f"details: {os.path.join(a.out, 'lesion_probe.json')}")
    return 0


def cmd_anatomy(a: argparse.Namespace) -> int:
    """Anatomy probe: a linear probe from token features to the structure each token covers."""
    from neurovfm.eval.anatomy import AnatomyProbeConfig, anatomy_probe, format_table

    cfg = AnatomyProbeConfig(tokens_per_view=a.tokens_per_view, bootstrap=a.bootstrap, seed=a.seed,
                             ct_views=a.ct_views.split(","))
    summary = anatomy_probe(_named_features(a.features), a.archive, a.cache, a.out, cfg)
    print(format_table(summary))
    print(f"table: {os.path.join(a.out, 'anatomy.csv')}  plot: {os.path.join(a.out, 'anatomy.png')}")
    return 0


def cmd_evaluate_external(a: argparse.Namespace) -> int:
    """A saved model's heads, calibration and thresholds on another site's features, no refit."""
    from neurovfm.eval.external import ExternalConfig, evaluate_external, format_table

    cfg = ExternalConfig(min_test_positives=a.min_test_positives, bootstrap=a.bootstrap, seed=a.seed,
                         modalities=a.modalities.split(","),
                         ct_windows=a.ct_windows.split(",") if a.ct_windows else None,
                         check_encoder=not a.no_encoder_check)
    summary = evaluate_external(a.model, a.features, a.labels, a.out, cfg, home_metrics=a.home_metrics,
                                home_model=a.home_model)
    print(format_table(summary))
    print(f"table: {os.path.join(a.out, 'external.csv')}  plot: {os.path.join(a.out, 'reliability_external.png')}")
    return 0


def _feature_set_args(s: argparse.ArgumentParser, out_help: str) -> None:
    """--features / --labels / --out, shared by the experiments over several feature folders."""
    s.add_argument("--features", nargs="+", required=True, metavar="[NAME=]DIR", help="feature folders")
    s.add_argument("--labels", required=True, help="keyed labels.csv (`neurovfm rekey`): labels, splits, patients")
    s.add_argument("--out", required=True, help=out_help)


def _token_probe_args(s: argparse.ArgumentParser, archive_help: str, out_help: str) -> None:
    """--features / --archive / --cache / --out / --bootstrap / --seed, shared by the token probes
    (anatomy, lesion) that look ground truth up through the cache's token grid."""
    s.add_argument("--features", nargs="+", required=True, help="NAME=FEATURE_DIR ... (the first is the reference "
                   "of the paired differences); all embedded from --cache")
    s.add_argument("--archive", required=True, help=archive_help)
    s.add_argument("--cache", required=True, help="the token cache the features were embedded from")
    s.add_argument("--out", required=True, help=out_help)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neurovfm", description=__doc__)
    p.add_argument("--version", action="version", version=f"neurovfm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", help="DICOM/NIfTI folder tree -> token cache")
    s.add_argument("src", help="folder to walk (any layout, nested, files with or without extensions)")
    s.add_argument("cache", help="token cache folder (created or appended to)")
    s.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    s.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/N", help="process only studies of shard i of N")
    s.add_argument("--modality", choices=["ct", "mr"], help="modality of NIfTI files without a sidecar")
    s.add_argument("--strict", action="store_true", help="exit non-zero if any file or series failed")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--show-paths", action="store_true",
                   help="print the source paths of refused files/series on this terminal (they may contain identifiers)")
    s.add_argument("--series-per-shard", type=int, default=64, help="commit a shard every N series (default 64)")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("audit-phi", help="scan every byte of a cache for identifying values from the source headers")
    s.add_argument("cache")
    s.add_argument("--source", required=True, help="the source folder the cache was built from")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("synth", help="write a synthetic hospital archive (DICOM + ground truth)")
    s.add_argument("out")
    s.add_argument("--studies", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--site", default="main", help="scanner site; any other name is an external site")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--preview", action="store_true", help="PNG montages with lesion outlines")
    s.add_argument("--nifti", action="store_true", help="also write every series as NIfTI + BIDS sidecar")
    s.add_argument("--anatomy-only", action="store_true",
                   help="only add the per-subject anatomy maps to an archive written without them "
                        "(same --studies/--seed/--site as when it was written)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("rekey", help="re-key an archive's labels/findings with the cache's keyed hashes")
    s.add_argument("archive", help="folder with labels.csv and findings.jsonl")
    s.add_argument("--out", required=True, help="where to write labels_keyed.csv and findings_keyed.jsonl")
    s.set_defaults(func=cmd_rekey)

    s = sub.add_parser("pretrain", help="Vol-JEPA pretraining from a YAML config (torchrun for several processes)")
    s.add_argument("config", help="YAML config (see configs/)")
    s.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in run.out")
    s.add_argument("--max-steps", type=int, help="stop after this many steps (a resumable chunk)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("embed", help="frozen-encoder token features of a cache (resumable, shardable)")
    s.add_argument("model", help="model folder (config.json + encoder.safetensors), or histogram:BINS "
                   "for the intensity-histogram baseline")
    s.add_argument("cache", help="token cache folder")
    s.add_argument("out", help="feature folder (created, or resumed)")
    s.add_argument("--splits-csv", help="keyed labels.csv (study_key, split) to restrict studies")
    s.add_argument("--splits", help="comma-separated splits to embed (default: every study)")
    s.add_argument("--ct-windows", help="comma-separated CT windows (default: all of the cache's)")
    s.add_argument("--layers", type=_int_list, metavar="I,J,...",
                   help="features = mean of these encoder blocks' outputs, each through the final norm "
                        "(negative: from the end, written --layers=-4,-3,-2,-1; default: the last block); heads "
                        "saved from these features make `analyze` read the same blocks")
    s.add_argument("--append-histogram", type=int, metavar="BINS",
                   help="append each token's intensity histogram (BINS bins per view, as histogram:BINS) to the "
                        "encoder's features; heads saved from them make `analyze` append the same")
    s.add_argument("--append-context", type=int, metavar="RADIUS",
                   help="append each token's neighbourhood (mean features of the other tokens of its series view "
                        "within RADIUS grid steps; doubles the dimension); heads saved from them make `analyze` "
                        "append the same")
    s.add_argument("--tokens-per-batch", type=int, default=16384)
    s.add_argument("--part-tokens", type=int, default=200_000, help="tokens per resumable part")
    s.add_argument("--device", default="cpu")
    s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/N", help="process parts i, i+N, ...")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("add-context", help="a copy of a feature folder with each token's neighbourhood appended "
                       "(as embed --append-context, without rerunning the encoder; resumable)")
    s.add_argument("features", help="feature folder made by `neurovfm embed`")
    s.add_argument("out", help="new feature folder (created, or resumed)")
    s.add_argument("--radius", type=int, default=1, help="neighbourhood in token grid steps (default 1: 3x3x3; "
                   "0: none, e.g. to add only --cross-series to features that have it)")
    s.add_argument("--cross-series", action="store_true",
                   help="also append, per token, the mean features of the co-located tokens of the study's other "
                   "series (a multi-sequence signature; needs --cache)")
    s.add_argument("--cross-series-mm", type=float,
                   help="how far (mm) a co-located token's centre may be (default 16: one token)")
    s.add_argument("--cache", help="the token cache the features were embedded from (world positions of tokens)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_add_context)

    s = sub.add_parser("init-model", help="write a random-init encoder model folder (a baseline)")
    s.add_argument("out")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--like", help="copy the encoder architecture of this model folder")
    g.add_argument("--size", choices=["tiny", "small", "base", "large"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_init_model)

    s = sub.add_parser("import-reference", help="convert the reference encoder checkpoint into a model folder")
    s.add_argument("src", help="pytorch_model.bin (or .safetensors), or a folder holding it and config.json")
    s.add_argument("out", help="model folder to write")
    s.add_argument("--note", help="free text recorded in provenance.json")
    s.set_defaults(func=cmd_import_reference)

    s = sub.add_parser("evaluate", help="study-level heads on frozen features, evaluated on the test split")
    s.add_argument("--features", nargs="+", required=True, metavar="[NAME=]DIR",
                   help="feature folders from `neurovfm embed`; the first is compared with each other one")
    s.add_argument("--labels", required=True, help="keyed labels.csv (`neurovfm rekey`)")
    s.add_argument("--out", required=True, help="output folder (metrics.json/csv, plots, index.html)")
    s.add_argument("--cache", help="token cache, for breakdowns by kernel, thickness and plane")
    s.add_argument("--ct-labels", help="CT label list (default: every CT label column)")
    s.add_argument("--mr-labels", help="MRI label list (default: every MRI label column)")
    s.add_argument("--head", choices=["gated", "abmil", "mean", "topk", "auto"], default="gated",
                   help="head kind; auto: each model's best kind on validation")
    _head_args(s, "; with --head auto the kind is chosen on the first; each member's test macro AUROC is "
                  "reported too (the seed spread)")
    s.add_argument("--epochs", type=int, default=40)
    s.add_argument("--calibration", choices=["platt", "temperature", "shrunk-platt"], default="platt",
                   help="fitted on validation; shrunk-platt pulls each label toward its base rate by as much as "
                        "cross-validation within validation asks (for small validation splits)")
    s.add_argument("--target-sensitivity", type=float, default=0.9)
    s.add_argument("--min-test-positives", type=int, default=20, help="headline labels have at least this many")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--comparator-flag-rate", type=float, help="urgent flag rate of a comparator (default: the "
                   "validation urgent prevalence)")
    s.add_argument("--comparator-name")
    s.add_argument("--modalities", default="CT,MR")
    s.add_argument("--save-model", help="model folder to save the first model's heads, calibration and thresholds into")
    s.add_argument("--token-masks", metavar="ARCHIVE",
                   help="lesion masks of training studies (a folder in the synthetic archive's layout: records.jsonl "
                        "+ masks; needs --cache): the heads also learn which tokens show each finding; validation "
                        "and test never see a mask")
    s.add_argument("--token-weight", type=float, default=1.0, help="weight of that token term (with --token-masks)")
    s.add_argument("--token-balance", default="pooled", choices=("pooled", "per_class"),
                   help="the token term's lesion/other halves: means over all classes' tokens (pooled) or "
                        "means of per-class means (per_class: small lesions weigh as much as large ones)")
    s.add_argument("--cnn-baseline", action="store_true",
                   help="also train the end-to-end 3-D CNN baseline on the scans (needs --cache), reported as cnn3d")
    s.add_argument("--cnn-epochs", type=int, default=100,  # = probe.cnn3d.CNNConfig.epochs (no torch import here)
                   help="CNN training epochs (the epoch with the best validation macro AUROC is kept); "
                        "30 was too few on the 500-study archive")
    s.add_argument("--cnn-seeds", type=int, default=1,
                   help="a seed ensemble of this many CNNs per modality (seeds --seed, --seed + 1, ...), scored by "
                        "their mean logit: a stronger baseline for that many times the time")
    s.add_argument("--cnn-point-sampled", action="store_true",
                   help="sample each series at the CNN grid's 3 mm without box-averaging it first (the default "
                        "averages: noise ~3x lower, better in 3 of 3 seeds); reproduces records made before 2026-12-05")
    s.add_argument("--cnn-inplane-mm", type=float, default=3.0,  # = CNNConfig.inplane_mm
                   help="the CNN grid's in-plane spacing in mm (slices stay 4 mm; 1-6): 2 keeps thinner findings "
                        "for about 2.7x the time on CPU")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("transfer", help="cross-modal zero-shot transfer: CT-trained heads on MRI test studies "
                       "and the reverse, through the CT <-> MRI label table")
    _feature_set_args(s, "output folder (transfer.json/csv/png)")
    s.add_argument("--head", choices=["gated", "abmil", "mean", "topk"], default="gated")
    _head_args(s)
    s.add_argument("--epochs", type=int, default=40)
    s.add_argument("--min-test-positives", type=int, default=20, help="label pairs in the macro mean have at "
                   "least this many target test positives")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_transfer)

    s = sub.add_parser("label-efficiency", help="test AUROC against the number of positive training studies")
    _feature_set_args(s, "output folder (label_efficiency.json/csv/png)")
    s.add_argument("--positives", default="1,2,4,8,16,32,all", help="positive training studies kept per label")
    s.add_argument("--repeats", type=int, default=3, help="subsamples (and head seeds) per budget")
    s.add_argument("--head", choices=["gated", "abmil", "mean", "topk"], default="gated")
    _head_args(s)
    s.add_argument("--epochs", type=int, default=40)
    s.add_argument("--min-test-positives", type=int, default=20, help="labels scored have at least this many "
                   "test positives")
    s.add_argument("--modalities", default="CT,MR")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_label_efficiency)

    s = sub.add_parser("shortcut", help="shortcut check: CT vs MR separability of soft-tissue vs air/bone token "
                       "features, and head attention on air/bone tokens")
    _feature_set_args(s, "output folder (shortcut.json/csv/png)")
    s.add_argument("--eval-metrics", help="an `evaluate` metrics.json: its heads' attention share on air/bone tokens")
    s.add_argument("--ct-windows", help="comma-separated CT windows (default: the evaluation's, else all)")
    s.add_argument("--l2", type=float, help="probe L2 strength (default: chosen on validation)")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_shortcut)

    s = sub.add_parser("anatomy", help="anatomy probe: token features -> the structure each token covers "
                       "(per-subject anatomy maps of a synthetic archive), vs token position and chance")
    _token_probe_args(s, "the `neurovfm synth` archive with anatomy maps", "output folder (anatomy.json/csv/png)")
    s.add_argument("--tokens-per-view", type=int, default=48)
    s.add_argument("--ct-views", default="brain", help="comma-separated CT windows whose tokens are probed")
    s.set_defaults(func=cmd_anatomy)

    s = sub.add_parser("lesion-probe", help="lesion probe: token features -> lesion or not (lesion masks of a "
                       "synthetic archive), token AUROC and probe pointing, vs token position")
    _token_probe_args(s, "the `neurovfm synth` archive (records.jsonl + lesion masks)", "output folder (lesion_probe.json)")
    s.add_argument("--negatives-per-series", type=int, default=64)
    s.add_argument("--min-size-mm", type=float, default=10.0)
    s.add_argument("--ct-views", default="brain,blood,bone", help="comma-separated CT windows, side by side per token")
    s.set_defaults(func=cmd_lesion_probe)

    s = sub.add_parser("evaluate-external", help="a saved model's heads, calibration and thresholds on another "
                       "site's features (no refit), and ECE after recalibrating on that site's validation split")
    s.add_argument("--model", required=True, help="model folder with head_ct / head_mr (`evaluate --save-model`)")
    s.add_argument("--features", required=True, help="the other site's feature folder (`neurovfm embed`)")
    s.add_argument("--labels", required=True, help="the other site's keyed labels.csv")
    s.add_argument("--out", required=True, help="output folder (external.json/csv, reliability_external.png)")
    s.add_argument("--home-metrics", help="the home evaluation's metrics.json, printed side by side")
    s.add_argument("--home-model", help="model name in --home-metrics (default: its first, whose heads were saved)")
    s.add_argument("--min-test-positives", type=int, default=20, help="headline labels have at least this many "
                   "external test positives (and negatives)")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--modalities", default="CT,MR")
    s.add_argument("--ct-windows", help="comma-separated CT windows (as the heads were fitted; default all)")
    s.add_argument("--no-encoder-check", action="store_true",
                   help="allow features of another encoder than the model folder's")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_evaluate_external)

    s = sub.add_parser("analyze", help="one study (folder or NIfTI) or a worklist -> findings, triage, maps")
    s.add_argument("study", nargs="?", help="a study folder (DICOM and/or NIfTI) or one NIfTI file")
    s.add_argument("--list", dest="worklist", help="worklist: a text file of study paths, or a folder of study folders")
    s.add_argument("--model", help="model folder (default: the shipped demo model)")
    s.add_argument("--out", required=True, help="output folder (nothing is written elsewhere)")
    s.add_argument("--maps", default="top-k", choices=["top-k", "all", "none"])
    s.add_argument("--top-k", type=int, default=3, help="maps for the k most probable labels")
    s.add_argument("--map-source", choices=list(MAP_SOURCES),
                   help="head attention, each token's positive share of the logit (contribution), each "
                        "token's probability (token), that fused across the study's series (token-fused), or "
                        "attention rollout through the encoder (default: the map each head's model folder "
                        "records, chosen on validation; else head)")
    s.add_argument("--modality", choices=["ct", "mr"], help="modality of NIfTI files without a sidecar")
    s.add_argument("--attention", default="auto", help="encoder attention backend")
    s.add_argument("--show-paths", action="store_true", help="print refused files' paths (terminal only)")
    _report_args(s, report_command=False)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser("report", help="one study -> draft structured findings report (LLM + consistency guard), "
                                      "with the head's findings and triage")
    s.add_argument("study", help="a study folder (DICOM and/or NIfTI) or one NIfTI file")
    s.add_argument("--model", help="model folder with encoder + heads (default: the shipped demo model)")
    s.add_argument("--out", required=True, help="output folder (nothing is written elsewhere)")
    s.add_argument("--maps", default="none", choices=["top-k", "all", "none"])
    s.add_argument("--modality", choices=["ct", "mr"], help="modality of NIfTI files without a sidecar")
    _report_args(s, report_command=True)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("report-train", help="train the findings-report VLM (stage 1 connector, stage 2 LoRA) "
                                            "on frozen features; resumable")
    s.add_argument("--llm", required=True, help="local Hugging Face causal-LM folder (the base; never modified)")
    s.add_argument("--features", required=True, help="`neurovfm embed` output of the training cache")
    s.add_argument("--findings", required=True, help="keyed findings_keyed.jsonl (`neurovfm rekey`)")
    s.add_argument("--out", required=True, help="run folder: checkpoints/ and, at the end, model/")
    s.add_argument("--config", help="YAML of ReportTrainConfig fields (e.g. configs/report_demo_cpu.yaml)")
    s.add_argument("--text-only", action="store_true",
                   help="the comparison model: no images, only the clinical indication (stage 2 only)")
    s.add_argument("--max-steps", type=int, help="stop after this many more steps (a resumable chunk)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_report_train)

    s = sub.add_parser("report-eval", help="reports (a) image, (b) indication only, (c) head template, "
                                           "(d) guarded, against the archive's ground truth; resumable")
    s.add_argument("--archive", required=True, help="the `neurovfm synth` archive (DICOM + findings.jsonl)")
    s.add_argument("--findings", required=True, help="its keyed findings_keyed.jsonl")
    s.add_argument("--features", required=True, help="`neurovfm embed` output for the same studies")
    s.add_argument("--image-model", required=True, help="report model folder trained with images")
    s.add_argument("--text-model", required=True, help="report model folder trained with --text-only")
    s.add_argument("--model", help="encoder + heads model folder for (c) and the guard (default: shipped demo)")
    s.add_argument("--llm", help="base LLM folder if it moved since training")
    s.add_argument("--out", required=True)
    s.add_argument("--beams", type=int, default=1, help="beams for generation (1: greedy; CPU budget)")
    s.add_argument("--max-false-per-study", type=float, default=0.1,
                   help="guard threshold: most false additions per study allowed on validation")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_report_eval)

    s = sub.add_parser("set-map", help="record in a model folder the map each head draws by default "
                                       "(chosen on validation)")
    s.add_argument("model", help="model folder with heads")
    s.add_argument("maps", nargs="+", metavar="MOD=MAP",
                   help=f"e.g. MR=token-fused (maps: {', '.join(MAP_SOURCES)})")
    s.set_defaults(func=cmd_set_map)

    s = sub.add_parser("pointing", help="pointing game: does the head's map hit the lesion? (synthetic archive)")
    s.add_argument("archive", help="a `neurovfm synth` archive (records.jsonl + lesion masks)")
    s.add_argument("--model", help="model folder with heads (default: the shipped demo model)")
    s.add_argument("--out", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--min-size-mm", type=float, default=10.0)
    s.add_argument("--max-studies", type=int)
    s.add_argument("--per-lesion", action="store_true",
                   help="one trial per lesion (default: one per study and label, a hit on any of its lesions)")
    s.add_argument("--map-sources", default="default,head,contribution",
                   help="comma-separated map kinds scored side by side from one encoding (default: what analyze "
                        "draws, each head's recorded map; head, contribution, token, token-fused, rollout); the "
                        "first is the summary's")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_pointing)

    s = sub.add_parser("serve", help="local web viewer: upload or pick a study, see findings and maps on the images")
    s.add_argument("--model", help="model folder with heads (default: the shipped demo model; loaded on the first job)")
    s.add_argument("--report", action="store_true", help="add a draft findings report per exam (LLM + guard)")
    s.add_argument("--report-model", help="report model folder (default with --report: the shipped one)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; any other needs a token)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--root", help="study folders under this folder can be picked from the page")
    s.add_argument("--workers", type=int, default=1, help="studies analysed at once (the rest wait in a queue)")
    s.add_argument("--retention-hours", type=float, default=24.0, help="outputs are deleted after this long")
    s.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest upload accepted")
    s.add_argument("--max-files", type=int, default=5000, help="most files per study (zip entries included)")
    s.add_argument("--data", help="folder for outputs (default: ~/.local/share/neurovfm/serve)")
    s.add_argument("--token", help="API token (or env NEUROVFM_SERVE_TOKEN); required unless bound to loopback")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("cache-info", help="counts and hashes of a token cache")
    s.add_argument("cache")
    s.set_defaults(func=cmd_cache_info)
    return p


def _report_args(s: argparse.ArgumentParser, report_command: bool) -> None:
    if not report_command:
        s.add_argument("--report", action="store_true",
                       help="add a draft findings report per exam (the shipped demo report model unless "
                            "--report-model is given)")
    s.add_argument("--report-model", help="report model folder (`neurovfm report-train`; default: the shipped one)")
    s.add_argument("--llm", help="base LLM folder, if it moved since the report model was trained")
    s.add_argument("--indication", help="clinical indication given to the report model (never written out)")
    s.add_argument("--beams", type=int, default=1,
                   help="beam search width for the report (default 1, greedy: with 3 beams the short normal report "
                        "wins every time on the embedded archive, see README)")
    s.add_argument("--no-guard", action="store_true",
                   help="do not add findings the head is confident of but the report omits (still flagged)")


def _reporter(a: argparse.Namespace, always: bool = False):
    if not (always or getattr(a, "report", False) or getattr(a, "report_model", None)):
        return None
    from neurovfm.report.generate import Reporter

    return Reporter(a.report_model, a.llm, num_beams=a.beams, guard=not a.no_guard)


def _print_report(ex: dict) -> None:
    rep = ex.get("report")
    if not rep:
        return
    r = rep["report"]
    print(f"  report ({rep['seconds']:.1f} s, triage {rep['triage']}): "
          + ("; ".join(f"{f['label']} ({f['side']}){' [added by guard]' if f.get('added_by_guard') else ''}"
                       for f in r["findings"]) or "no findings"))
    print(f"  impression: {r['impression']}")


def cmd_report(a: argparse.Namespace) -> int:
    from neurovfm.analyze.config import AnalyzeConfig
    from neurovfm.analyze.pipeline import Analyzer

    cfg = AnalyzeConfig(maps=a.maps, modality=a.modality)
    res = Analyzer(a.model, cfg, _reporter(a, always=True)).run(a.study, a.out, indication=a.indication)
    if not a.quiet:
        for ex in res["exams"]:
            print(f"{ex['modality']}: head triage {ex['triage']['level']}; positive: {', '.join(ex['findings']) or 'none'}")
            _print_report(ex)
        for w in res["warnings"]:
            print(f"warning [{w['code']}]: {w['message']}")
        t = res["timings_s"]
        print(f"{t['total']:.1f} s (report {t.get('report', 0):.1f} s)   result: {os.path.join(a.out, 'result.json')}")
    return 0


def cmd_report_train(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from neurovfm.report.train import ReportTrainConfig, load_train_config, train_reports

    over = dict(llm=a.llm, features=a.features, findings=a.findings, out=a.out, threads=a.threads)
    if a.text_only:
        over["use_images"] = False
    if a.config:
        cfg = load_train_config(a.config, **over)
    else:
        cfg = ReportTrainConfig(**over)
    if a.text_only and cfg.stage1_steps:   # same number of steps, all of them in stage 2
        cfg = ReportTrainConfig(**{**vars(cfg), "stage2_steps": cfg.stage1_steps + cfg.stage2_steps,
                                   "stage1_steps": 0})
    quiet = a.quiet or int(os.environ.get("RANK", "0")) != 0
    bar = None if quiet else tqdm(total=cfg.total_steps, desc="report-train", unit="step")

    def progress(step, total, loss):
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.refresh()

    res = train_reports(cfg, a.max_steps, progress)
    if bar is not None:
        bar.close()
    if res["rank"] == 0:
        print(json.dumps(res, indent=1))
    return 0


def cmd_report_eval(a: argparse.Namespace) -> int:
    from neurovfm.report import experiment as X

    def bar(name):
        if a.quiet:
            return None
        from tqdm import tqdm

        b = tqdm(desc=name, unit="study")

        def upd(i, n):
            b.total = n
            b.n = i
            b.refresh()
        return upd

    heads = os.path.join(a.out, "heads")
    X.run_heads(a.archive, a.findings, a.model, heads, progress=bar("heads"))
    ra, rb = os.path.join(a.out, "reports_image.jsonl"), os.path.join(a.out, "reports_text_only.jsonl")
    X.generate_split(a.image_model, a.features, a.findings, ra, num_beams=a.beams, llm=a.llm, progress=bar("(a) image"))
    X.generate_split(a.text_model, a.features, a.findings, rb, num_beams=a.beams, llm=a.llm,
                     progress=bar("(b) indication only"))
    res = X.evaluate_reports(a.findings, ra, rb, heads, a.out, a.max_false_per_study)
    X.save_guard(a.image_model, res)
    for s in X.SYSTEMS:
        m = res["metrics"][s]
        print(f"{s:18s} F1 {m['f1']:.3f} [{m['f1_ci']['low']:.3f}, {m['f1_ci']['high']:.3f}]  P {m['precision']:.3f} "
              f"R {m['recall']:.3f}  halluc {m['hallucination_rate']:.3f}  side err {m['laterality_error_rate']:.3f}  "
              f"urgent miss {m['urgent_miss_rate']:.3f}  triage acc {m['triage_accuracy']:.3f}")
    for k, c in res["paired_f1"].items():
        print(f"F1 {k}: {c['estimate']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] p={c.get('p_value', float('nan')):.3f}")
    g = res["guard_effect"]
    print(f"guard (threshold {res['guard_threshold']['threshold']}): recovered {g['n_recovered']}/{g['n_missing']} missed "
          f"findings, urgent {g['n_recovered_urgent']}/{g['n_missing_urgent']}; false added {g['n_false_added']} "
          f"({g['false_added_per_study']:.2f} per study)")
    print(f"details: {os.path.join(a.out, 'report_eval.json')}  plot: {os.path.join(a.out, 'report_eval.png')}")
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from neurovfm.analyze.config import AnalyzeConfig
    from neurovfm.analyze.pipeline import Analyzer, analyze_worklist, read_worklist

    if bool(a.study) == bool(a.worklist):
        raise NeuroVFMError("give either a STUDY or --list WORKLIST")
    cfg = AnalyzeConfig(maps=a.maps, top_k=a.top_k, map_source=a.map_source, modality=a.modality,
                        attention=a.attention)
    if a.worklist:
        path = analyze_worklist(read_worklist(a.worklist), a.out, a.model, cfg, progress=not a.quiet,
                                reporter=_reporter(a))
        print(f"worklist: {path}")
        return 0
    log = (lambda m: print(m, file=sys.stderr)) if a.show_paths else None
    res = Analyzer(a.model, cfg, _reporter(a)).run(a.study, a.out, log, indication=a.indication)
    if not a.quiet:
        for ex in res["exams"]:
            print(f"{ex['modality']}: triage {ex['triage']['level']}"
                  f"{' (' + ', '.join(ex['triage']['drivers']) + ')' if ex['triage']['drivers'] else ''}; "
                  f"positive: {', '.join(ex['findings']) or 'none'}")
            _print_report(ex)
        for w in res["warnings"]:
            print(f"warning [{w['code']}]{' ' + w['series'] if w.get('series') else ''}: {w['message']}")
        print(f"{res['timings_s']['total']:.1f} s   result: {os.path.join(a.out, 'result.json')}   "
              f"summary: {os.path.join(a.out, 'summary.html')}")
    return 0


def cmd_set_map(a: argparse.Namespace) -> int:
    from neurovfm.analyze.pipeline import set_map_sources

    choices: dict[str, str] = {}
    for pair in a.maps:  # all parsed and checked before the folder is touched
        mod, _, source = pair.partition("=")
        if mod.upper() not in ("CT", "MR") or not source or mod.upper() in choices:
            raise ValueError(f"set-map takes CT=MAP and/or MR=MAP, each once, not {pair!r}")
        choices[mod.upper()] = source
    set_map_sources(a.model, choices)
    for mod, source in choices.items():
        print(f"{a.model}: the {mod} head draws {source} maps by default")
    return 0


def cmd_pointing(a: argparse.Namespace) -> int:
    from neurovfm.explain.pointing import DEFAULT_MAP, PointingConfig, run_pointing

    sources = tuple(x.strip() for x in a.map_sources.split(",") if x.strip())
    bad = [x for x in sources if x not in MAP_SOURCES + (DEFAULT_MAP,)]
    if bad or not sources:
        raise ValueError(f"--map-sources takes {', '.join((DEFAULT_MAP,) + MAP_SOURCES)}, not {a.map_sources!r}")
    cfg = PointingConfig(split=a.split, min_size_mm=a.min_size_mm, max_studies=a.max_studies, map_sources=sources,
                         pool_same_label=not a.per_lesion)
    res = run_pointing(a.archive, a.model, a.out, cfg, progress=not a.quiet)
    if not res["summary"].get("n_findings"):
        print("no findings to point at in this split")
        return 0
    what = "study labels" if cfg.pool_same_label else "lesions"  # what one trial is
    sized = "study labels with a lesion" if cfg.pool_same_label else "lesions"
    for src, sm in res["by_map_source"].items():
        print(f"{src} maps: {sm['n_findings']} {sized} >= {cfg.min_size_mm:g} mm in {sm['n_patients']} patients "
              f"({cfg.split}): hit rate {sm['hit_rate']:.3f} vs uniform {sm['uniform_hit_rate']:.3f} (difference 95% CI "
              f"{sm['hit_minus_uniform_ci95'][0]:+.3f} to {sm['hit_minus_uniform_ci95'][1]:+.3f}); map mass inside "
              f"lesion {sm['mass_inside_lesion']:.3f} vs uniform {sm['uniform_mass_inside_lesion']:.3f}")
        if len(sm["by_modality"]) > 1:
            print("  " + "; ".join(f"{m}: hit rate {x['hit_rate']:.3f} ({x['n_findings']} {what}, "
                                   f"{x['n_patients']} patients; uniform {x['uniform_hit_rate']:.3f})"
                                   for m, x in sm["by_modality"].items()))
    print(f"details: {os.path.join(a.out, 'pointing.json')}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """The local web viewer (neurovfm.serve): loopback by default; a token beyond loopback."""
    from neurovfm.serve.run import serve, token_from
    from neurovfm.serve.settings import MB, ServeSettings

    serve(ServeSettings(model=a.model, report=a.report, report_model=a.report_model, host=a.host, port=a.port,
                        root=a.root, workers=a.workers,
                        retention_hours=a.retention_hours, max_upload_bytes=int(a.max_upload_mb * MB),
                        max_files=a.max_files, data=a.data or "", token=token_from(a.token)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from neurovfm.distributed import exit_worker, joined_process_group

    parser = build_parser()
    a = parser.parse_args(argv)
    code = _run(a)
    if joined_process_group():  # a torchrun worker: results are written; skip finalisation
        exit_worker(code)
    return code


def _run(a: argparse.Namespace) -> int:
    try:
        return int(a.func(a))
    except NeuroVFMError as e:
        print(f"neurovfm {a.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad option values (validated dataclasses)
        print(f"neurovfm {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
