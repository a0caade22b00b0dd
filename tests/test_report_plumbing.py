"""Plumbing of the findings-report VLM with a tiny random Llama (issue 7)."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from neurovfm.report import Connector, PerceiverResampler, ReportVLM, ReportVLMConfig, ResamplerConfig  # noqa: E402
from neurovfm.report.llm import load_llm, tiny_random_llm  # noqa: E402

D, W, L = 32, 48, 4
ANSWER = "acute hemorrhage in the left frontal lobe measuring 12 mm"


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny_random_llm(tmp_path_factory.mktemp("tiny_llm"))


def make_vlm(llm_dir, seed=0):
    torch.manual_seed(seed)
    llm, tok = load_llm(llm_dir)
    res = PerceiverResampler(ResamplerConfig(in_dim=D, width=W, latents=L, layers=1, heads=4))
    con = Connector(W, llm.config.hidden_size)
    return ReportVLM(res, con, llm, tok, ReportVLMConfig())


def series(seed=0, lens=(5, 7, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g) for n in lens]


def test_load_and_placeholder_token(llm_dir):
    vlm = make_vlm(llm_dir)
    tok = vlm.tokenizer
    assert vlm.image_token_id == tok.convert_tokens_to_ids("<|image|>")
    assert vlm.llm.get_input_embeddings().num_embeddings >= len(tok)
    text = vlm.prompt_text(3, "headache after trauma")
    assert text.count("<|image|>") == 3
    assert "headache" in text
    assert "<think> </think>" in text          # thinking disabled via the template flag
    ids = vlm.prompt_ids(3)
    assert sum(i == vlm.image_token_id for i in ids) == 3


def test_placeholders_replaced_by_connector_outputs(llm_dir):
    vlm = make_vlm(llm_dir).eval()
    feats = series()
    with torch.no_grad():
        b = vlm.build_inputs(feats, "headache", ANSWER)
        vis = vlm.visual_embeds(feats)
    S = len(feats)
    assert vis.shape == (S, L, vlm.llm.config.hidden_size)
    pos = b["image_positions"]
    assert pos.shape == (S, L)
    emb = b["inputs_embeds"][0]
    # one contiguous block per series, in series order, equal to the connector outputs
    for s in range(S):
        assert torch.equal(pos[s], torch.arange(int(pos[s, 0]), int(pos[s, 0]) + L))
        assert torch.equal(emb[pos[s]], vis[s])
        if s:
            assert pos[s, 0] > pos[s - 1, -1]
    # every other position holds the text embedding of the prompt/answer token
    ids = vlm.prompt_ids(S, "headache") + vlm.answer_ids(ANSWER)
    text_ids = [i for i in ids if i != vlm.image_token_id]
    mask = torch.ones(emb.shape[0], dtype=torch.bool)
    mask[pos.flatten()] = False
    with torch.no_grad():
        ref = vlm.llm.get_input_embeddings()(torch.tensor(text_ids))
    assert torch.equal(emb[mask], ref)
    assert emb.shape[0] == len(ids) - S + S * L
    assert b["attention_mask"].shape == (1, emb.shape[0])


def test_resampler_attention_does_not_cross_series():
    torch.manual_seed(0)
    res = PerceiverResampler(ResamplerConfig(in_dim=D, width=W, latents=L, layers=2, heads=4)).eval()
    a, b = series(1, (6, 4))
    with torch.no_grad():
        out1 = res(torch.cat([a, b]), torch.tensor([0, 6, 10]))
        out2 = res(torch.cat([a, torch.randn(9, D)]), torch.tensor([0, 6, 15]))
        alone = res(a, torch.tensor([0, 6]))
    assert out1.shape == (2, L, W)
    torch.testing.assert_close(out1[0], out2[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out1[0], alone[0], rtol=0, atol=1e-5)
    assert not torch.allclose(out1[1], out2[1])
    with pytest.raises(ValueError):
        res(torch.cat([a, b]), torch.tensor([0, 6, 11]))


def test_labels_mask_all_but_answer(llm_dir):
    vlm = make_vlm(llm_dir)
    b = vlm.build_inputs(series(), "stroke", ANSWER)
    labels = b["labels"][0]
    ans = vlm.answer_ids(ANSWER)
    assert ans[-1] == vlm.tokenizer.eos_token_id
    keep = labels != -100
    assert int(keep.sum()) == len(ans)
    assert labels[keep].tolist() == ans
    assert keep[-len(ans):].all()              # answer at the end, nothing else supervised
    assert vlm.build_inputs(series(), None, None)["labels"] is None


def test_stage1_gradients_and_memorisation(llm_dir):
    vlm = make_vlm(llm_dir).train()
    feats = series()
    base = {k: v.detach().clone() for k, v in vlm.llm.state_dict().items()}
    loss = vlm(feats, "weakness", ANSWER)
    assert torch.isfinite(loss)
    loss.backward()
    for m in (vlm.resampler, vlm.connector):
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in vlm.llm.parameters())
    assert {id(p) for p in vlm.trainable_parameters()} == \
        {id(p) for p in list(vlm.resampler.parameters()) + list(vlm.connector.parameters())}

    opt = torch.optim.AdamW(vlm.trainable_parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(60):
        opt.zero_grad()
        loss = vlm(feats, "weakness", ANSWER)
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first         # teacher forcing memorises the answer
    for k, v in vlm.llm.state_dict().items():
        assert torch.equal(v, base[k]), k       # the frozen LLM did not move
