"""The report model folder: resampler + connector (+ LoRA adapter) weights and a JSON config.

The base LLM is never copied: the config names its folder and a checksum of its files' content, and
loading refuses a base whose checksum differs (an adapter on the wrong base is silently wrong).
Weights are safetensors; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from ..errors import NeuroVFMError
from ..files import file_sha256
from ..models.folder import make_provenance, save_tensors, write_json
from .connector import Connector
from .resampler import PerceiverResampler, ResamplerConfig
from .schema import ReportSchema
from .vlm import ReportVLM, ReportVLMConfig

FORMAT = "neurovfm-report-model"
FORMAT_VERSION = 1
CONFIG = "report_config.json"
WEIGHTS = "report.safetensors"
_LLM_FILES = (".json", ".safetensors", ".model", ".txt", ".jinja")


SMOLLM2_NAME = "smollm2-135m-instruct"


def default_llm_cache() -> str:
    """Where converted base LLMs live: $NEUROVFM_LLM_CACHE, else ~/.cache/neurovfm/llm."""
    return os.environ.get("NEUROVFM_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "neurovfm", "llm")


def default_report_model() -> str:
    """The shipped demo report model (trained on the embedded archive's features)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_model", "report")


class ReportModelError(NeuroVFMError):
    """A report model folder is missing, malformed, or does not fit its base LLM."""


# Fingerprint versions. 1: raw bytes of every file. 2 (written since 2026-12-05): JSON files by
# their parsed content less the writing library's version stamp, so a base converted again by a
# newer transformers still matches (5.24 -> 5.25 changed only "transformers_version" in
# config.json and generation_config.json; weights and tokenizer bit-identical).
FINGERPRINT_VERSION = 2
VERSION_STAMPS = frozenset({"transformers_version"})


def _content_sha256(path: str, version: int) -> str:
    if version >= 2 and path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (ValueError, UnicodeDecodeError):
            return file_sha256(path)  # not JSON after all: its bytes
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in VERSION_STAMPS}
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    return file_sha256(path)


def same_base(folder: str, sha256: str, version: Any, where: str) -> bool:
    """Whether the LLM in ``folder`` is the one recorded as ``sha256`` under fingerprint ``version``
    (1 when a record predates versions); ``where`` names the record in the error for a version
    this code does not know."""
    if version not in (1, FINGERPRINT_VERSION) or isinstance(version, bool):
        raise ReportModelError(f"{where}: unknown base-LLM fingerprint version {version!r} (known: 1, "
                               f"{FINGERPRINT_VERSION}); written by a newer neurovfm?")
    return llm_fingerprint(folder, version) == sha256


def llm_fingerprint(folder: str, version: int = FINGERPRINT_VERSION) -> str:
    """sha256 over the names and contents of a local LLM folder's config, tokenizer and weights
    (``version``: see FINGERPRINT_VERSION; 1 only to check report models saved before it)."""
    if version not in (1, 2):
        raise ReportModelError(f"unknown LLM fingerprint version {version!r}")
    if not os.path.isdir(folder):
        raise ReportModelError(f"LLM folder not found: {folder}")
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(_LLM_FILES) and os.path.isfile(os.path.join(folder, name)):
            h.update(name.encode() + b"\0" + _content_sha256(os.path.join(folder, name), version).encode() + b"\0")
    return h.hexdigest()


def trainable_state(vlm: ReportVLM) -> dict[str, torch.Tensor]:
    """What a report checkpoint holds: resampler, connector and LoRA weights, never the base LLM."""
    out = {f"resampler.{k}": v for k, v in vlm.resampler.state_dict().items()}
    out.update({f"connector.{k}": v for k, v in vlm.connector.state_dict().items()})
    if vlm.has_lora:
        from peft import get_peft_model_state_dict

        out.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(vlm.llm, save_embedding_layers=False).items()})
    return out


def load_trainable_state(vlm: ReportVLM, tensors: dict[str, torch.Tensor], where: str) -> None:
    def sub(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        vlm.resampler.load_state_dict(sub("resampler."))
        vlm.connector.load_state_dict(sub("connector."))
    except RuntimeError as e:
        raise ReportModelError(f"{where}: weights do not fit the configured resampler/connector: {e}") from None
    lora = sub("lora.")
    if lora:
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(vlm.llm, lora)
        bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
        if bad:
            raise ReportModelError(f"{where}: LoRA weights do not fit the base LLM (e.g. {bad[0]})")


def build_vlm(llm_folder: str, cfg: dict[str, Any], feature_dim: int) -> ReportVLM:
    from .llm import load_llm

    llm, tok = load_llm(llm_folder, dtype=torch.float32)
    rcfg = ResamplerConfig(in_dim=feature_dim, **cfg["resampler"])
    res = PerceiverResampler(rcfg)
    con = Connector(rcfg.width, llm.config.hidden_size, cfg.get("connector_hidden"))
    vlm = ReportVLM(res, con, llm, tok, ReportVLMConfig(**cfg.get("vlm", {})))
    return vlm


def save_report_model(folder: str, vlm: ReportVLM, schema: ReportSchema, cfg: dict[str, Any],
                      llm_folder: str, llm_sha: str, feature_dim: int, encoder_id: str | None,
                      provenance: dict[str, Any] | None = None) -> None:
    """Write the folder atomically file by file (weights first, config last, so a folder with a
    config is always complete)."""
    os.makedirs(folder, exist_ok=True)
    save_tensors(os.path.join(folder, WEIGHTS), trainable_state(vlm))
    vc = dict(vars(vlm.config))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "base_llm": {"path": os.path.abspath(llm_folder), "sha256": llm_sha,
                           "fingerprint": FINGERPRINT_VERSION,
                           "name": os.path.basename(os.path.abspath(llm_folder).rstrip("/")).lower()},
              "feature_dim": feature_dim, "encoder_id": encoder_id,
              "resampler": cfg["resampler"], "connector_hidden": cfg.get("connector_hidden"),
              "vlm": vc, "lora": vlm.lora_config, "stage": vlm.config.stage,
              "schema": schema.to_dict(), "use_images": cfg.get("use_images", True),
              "use_indication": cfg.get("use_indication", True),
              "max_tokens_per_series": cfg.get("max_tokens_per_series"),
              "finding_labels": cfg.get("finding_labels"),
              "provenance": provenance or make_provenance()}
    write_json(os.path.join(folder, CONFIG), config)


def read_report_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise ReportModelError(f"{folder}: not a report model folder (no {CONFIG}; train one with "
                               f"`neurovfm report-train`)")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except json.JSONDecodeError as e:
        raise ReportModelError(f"{path}: not valid JSON ({e.msg})") from None
    if cfg.get("format") != FORMAT or int(cfg.get("format_version", 99)) > FORMAT_VERSION:
        raise ReportModelError(f"{path}: format {cfg.get('format')!r} v{cfg.get('format_version')} is not readable")
    return cfg


def load_report_model(folder: str, llm_folder: str | None = None, check_base: bool = True):
    """(vlm, schema, config) from a report model folder; the base LLM from llm_folder or the
    path recorded at training time, refused if its checksum differs."""
    from .constrained import ReportGrammar  # noqa: F401  (grammar built by the caller)
    from ..models.folder import load_state

    cfg = read_report_config(folder)
    base = llm_folder or cfg["base_llm"].get("path") or ""
    if not os.path.isdir(base) and not llm_folder and cfg["base_llm"].get("name") == SMOLLM2_NAME:
        from .llm import smollm2_folder   # the default base: converted once from the offline wheel

        base = smollm2_folder(default_llm_cache())
    if not os.path.isdir(base):
        raise ReportModelError(f"{folder}: its base LLM folder {base!r} is missing; pass --llm FOLDER")
    if check_base:
        version = cfg["base_llm"].get("fingerprint", 1)  # absent: saved before version 2
        if not same_base(base, cfg["base_llm"]["sha256"], version, os.path.join(folder, CONFIG)):
            raise ReportModelError(f"{folder}: trained on an LLM with checksum {cfg['base_llm']['sha256'][:12]}…, "
                                   f"but {base} has {llm_fingerprint(base, version)[:12]}…; pass the original "
                                   "base LLM folder")
    vlm = build_vlm(base, cfg, int(cfg["feature_dim"]))
    if cfg.get("lora"):
        lc = cfg["lora"]
        vlm.add_lora(r=lc["r"], alpha=lc["alpha"], target_modules=tuple(lc["target_modules"]))
    vlm.set_stage(int(cfg.get("stage", 1)))
    wpath = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(wpath):
        raise ReportModelError(f"{folder}: {WEIGHTS} missing")
    load_trainable_state(vlm, load_state(wpath), folder)
    vlm.eval()
    return vlm, ReportSchema.from_dict(cfg["schema"]), cfg
