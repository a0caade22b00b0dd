"""Vision-language model for findings reports.

Per-series encoder token features -> PerceiverResampler -> Connector -> LLM embedding space.
The chat prompt carries one image placeholder token per series (in series order); each
placeholder is expanded to `latents` positions whose input embeddings are the connector
outputs of that series. Loss is on the answer tokens only (labels -100 elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .connector import Connector
from .resampler import PerceiverResampler

IGNORE = -100


@dataclass
class ReportVLMConfig:
    image_token: str = "<|image|>"
    system_prompt: str | None = "You are a neuroradiologist."
    instruction: str = "Describe the findings of this study."
    indication_prefix: str = "Clinical indication:"
    enable_thinking: bool = False      # passed to the chat template when it knows the flag
    stage: int = 1                     # 1: LLM frozen, resampler + connector train


def _pack(series_feats):
    """Accept (features [T, D], cu [S+1]) or a list of [T_i, D] tensors."""
    if isinstance(series_feats, (tuple, list)) and len(series_feats) == 2 and torch.is_tensor(series_feats[1]) \
            and series_feats[1].dim() == 1 and series_feats[0].dim() == 2 and series_feats[1].dtype in (torch.int32, torch.int64):
        feats, cu = series_feats
        return feats, cu.long()
    parts = list(series_feats)
    if not parts:
        raise ValueError("no series given")
    lens = torch.tensor([p.shape[0] for p in parts])
    cu = torch.zeros(len(parts) + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lens, 0)
    return torch.cat(parts, 0), cu


class ReportVLM(nn.Module):
    def __init__(self, resampler: PerceiverResampler, connector: Connector, llm, tokenizer,
                 config: ReportVLMConfig | None = None):
        super().__init__()
        self.config = config or ReportVLMConfig()
        self.resampler = resampler
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        tok = self.config.image_token
        if tok not in tokenizer.get_vocab():
            tokenizer.add_tokens([tok], special_tokens=True)
        self.image_token_id = tokenizer.convert_tokens_to_ids(tok)
        emb = llm.get_input_embeddings()
        if emb.num_embeddings < len(tokenizer):
            old = emb.num_embeddings
            try:   # mean_resizing (transformers >= 4.46) is slow on large vocabularies
                llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            except TypeError:
                llm.resize_token_embeddings(len(tokenizer))
            # the placeholder row is never read (replaced by visual embeddings) and never written
            # (masked in decoding); zeroing it keeps reloads bit-identical
            with torch.no_grad():
                llm.get_input_embeddings().weight[old:] = 0
                out = llm.get_output_embeddings()
                if out is not None:
                    out.weight[old:] = 0
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.lora_config: dict | None = None
        self.set_stage(self.config.stage)

    # ------------------------------------------------------------------ training stages
    @property
    def n_latents(self) -> int:
        return self.resampler.config.latents

    def set_stage(self, stage: int) -> None:
        """Stage 1: LLM frozen, resampler and connector train. Stage 2: LoRA adapters (added with
        `add_lora`) train as well; the base LLM weights stay frozen. Stage 2 without adapters
        fine-tunes the whole LLM."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.config.stage = stage
        lora = self.has_lora
        for name, p in self.llm.named_parameters():
            p.requires_grad_(stage == 2 and (not lora or "lora_" in name))
        for m in (self.resampler, self.connector):
            for p in m.parameters():
                p.requires_grad_(True)

    @property
    def has_lora(self) -> bool:
        return any("lora_" in n for n, _ in self.llm.named_parameters())

    def add_lora(self, r: int = 8, alpha: int = 16, target_modules=("q_proj", "v_proj"), seed: int = 0) -> None:
        """Wrap the LLM with peft LoRA adapters (B initialised to zero: outputs unchanged)."""
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise ValueError("the LLM already has LoRA adapters")
        torch.manual_seed(seed)
        self.llm = get_peft_model(self.llm, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                       target_modules=list(target_modules), bias="none"))
        self.lora_config = {"r": r, "alpha": alpha, "target_modules": list(target_modules)}
        self.set_stage(self.config.stage)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()           # no dropout in the LLM (LoRA dropout is 0): steps are deterministic
        return self

    # ------------------------------------------------------------------ prompt
    def _template_supports_thinking(self) -> bool:
        tmpl = getattr(self.tokenizer, "chat_template", None) or ""
        if isinstance(tmpl, dict):
            tmpl = " ".join(tmpl.values())
        return "enable_thinking" in tmpl

    def prompt_text(self, n_series: int, indication: str | None = None) -> str:
        c = self.config
        lines = [" ".join([c.image_token] * n_series)] if n_series else []
        if indication:
            lines.append(f"{c.indication_prefix} {indication}")
        lines.append(c.instruction)
        messages = []
        if c.system_prompt:
            messages.append({"role": "system", "content": c.system_prompt})
        messages.append({"role": "user", "content": "\n".join(lines)})
        kw = {}
        if self._template_supports_thinking():
            kw["enable_thinking"] = c.enable_thinking
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)

    def prompt_ids(self, n_series: int, indication: str | None = None) -> list[int]:
        ids = self.tokenizer(self.prompt_text(n_series, indication), add_special_tokens=False).input_ids
        n = sum(1 for i in ids if i == self.image_token_id)
        if n != n_series:
            raise ValueError(f"prompt holds {n} image placeholders for {n_series} series")
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    # ------------------------------------------------------------------ inputs
    def visual_embeds(self, series_feats) -> torch.Tensor:
        feats, cu = _pack(series_feats)
        p = next(self.resampler.parameters())
        lat = self.resampler(feats.to(device=p.device, dtype=p.dtype), cu)
        return self.connector(lat)                         # [S, latents, H]

    def build_inputs(self, series_feats, indication: str | None = None, answer: str | None = None,
                     answer_ids: list[int] | None = None) -> dict:
        """Returns inputs_embeds [1, N, H], attention_mask [1, N], labels [1, N] (or None),
        and image_positions [S, latents] (sequence indices of each series' visual block).
        The answer is text (tokenised + EOS) or ids already tokenised (ReportGrammar.encode)."""
        if isinstance(series_feats, (list, tuple)) and len(series_feats) == 0:   # text-only prompt
            H = self.llm.get_input_embeddings().weight.shape[1]
            p = next(self.connector.parameters())
            vis = torch.zeros(0, self.n_latents, H, device=p.device, dtype=p.dtype)
        else:
            vis = self.visual_embeds(series_feats)
        S, L, _ = vis.shape
        ids = self.prompt_ids(S, indication)
        n_prompt_text = len(ids)
        if answer_ids is not None:
            ans = list(answer_ids)
        else:
            ans = self.answer_ids(answer) if answer is not None else []
        all_ids = torch.tensor(ids + ans, dtype=torch.long, device=vis.device)
        emb_layer = self.llm.get_input_embeddings()
        text = emb_layer(all_ids)
        vis = vis.to(text.dtype)

        pieces, positions = [], []
        pos, s, start = 0, 0, 0
        for i, t in enumerate(all_ids.tolist()):
            if t != self.image_token_id:
                continue
            pieces.append(text[start:i])
            pos += i - start
            pieces.append(vis[s])
            positions.append(torch.arange(pos, pos + L))
            pos += L
            s += 1
            start = i + 1
        pieces.append(text[start:])
        embeds = torch.cat(pieces, 0).unsqueeze(0)
        N = embeds.shape[1]
        out = {
            "inputs_embeds": embeds,
            "attention_mask": torch.ones(1, N, dtype=torch.long, device=vis.device),
            "labels": None,
            "image_positions": (torch.stack(positions) if positions else torch.zeros(0, L, dtype=torch.long)).to(vis.device),
        }
        if ans:
            labels = torch.full((1, N), IGNORE, dtype=torch.long, device=vis.device)
            labels[0, N - len(ans):] = torch.tensor(ans, dtype=torch.long, device=vis.device)
            out["labels"] = labels
        assert N == n_prompt_text - S + S * L + len(ans)
        return out

    def forward(self, series_feats, indication: str | None = None, answer: str | None = None):
        """Teacher-forced loss on the answer tokens (the HF causal-LM loss)."""
        if answer is None:
            raise ValueError("forward needs an answer to compute the loss")
        return self.loss_on_ids(series_feats, indication, self.answer_ids(answer))

    def loss_on_ids(self, series_feats, indication: str | None, answer_ids: list[int]) -> torch.Tensor:
        """Teacher-forced loss on pre-tokenised answer ids (from ReportGrammar.encode, EOS included)."""
        if not answer_ids:
            raise ValueError("loss_on_ids needs answer ids")
        b = self.build_inputs(series_feats, indication, answer_ids=answer_ids)
        return self.llm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    @torch.no_grad()
    def generate_ids(self, series_feats, grammar, indication: str | None = None, num_beams: int = 1,
                     max_new_tokens: int | None = None) -> list[int]:
        """Schema-constrained generation: greedy (num_beams=1, forced runs batched) or beam search."""
        from .constrained import ReportLogitsProcessor, greedy_decode

        was = self.training
        self.eval()
        try:
            b = self.build_inputs(series_feats, indication, None)
            if num_beams <= 1:
                return greedy_decode(self.llm, grammar, b["inputs_embeds"], b["attention_mask"])
            from transformers import LogitsProcessorList

            out = self.llm.generate(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"],
                                    logits_processor=LogitsProcessorList([ReportLogitsProcessor(grammar)]),
                                    num_beams=num_beams, do_sample=False, early_stopping=True,
                                    max_new_tokens=max_new_tokens or grammar.max_length(),
                                    eos_token_id=grammar.eos, pad_token_id=self.tokenizer.pad_token_id)
            ids = [int(t) for t in out[0].tolist()]
            return ids[: ids.index(grammar.eos) + 1] if grammar.eos in ids else ids
        finally:
            self.train(was)

    def generate_report(self, series_feats, grammar, indication: str | None = None, num_beams: int = 1,
                        max_new_tokens: int | None = None) -> dict:
        """A validated structured report; ReportGenerationError if the schema cannot be completed."""
        return grammar.decode(self.generate_ids(series_feats, grammar, indication, num_beams, max_new_tokens))
