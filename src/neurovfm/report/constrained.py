"""Schema-constrained decoding: the report schema compiled into a token automaton.

The automaton has three kinds of node, enough for the findings-report schema:

* ``Choice``: one of several token sequences (a trie), each leading to its own next node.
  JSON punctuation and keys are one-option choices; enums (labels, sides, exam types) and
  "another finding or close the list" are several options. Enum options end with the closing
  quote, which makes every option set prefix-free.
* ``Digits``: 1..n digit tokens (an integer field), then the next choice.
* ``Text``: up to n tokens with no quote, backslash or control character, then the next
  choice, whose first token always carries the closing quote.

The same pieces tokenise training answers (``encode``), so the model is trained on exactly
the token sequences the decoder may produce. ``ReportLogitsProcessor`` masks a Hugging Face
``generate`` call (greedy or beam search) to the automaton; ``greedy_decode`` is a faster
greedy path that feeds every forced run of tokens (keys, punctuation) in one forward pass.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from .schema import ReportGenerationError, ReportSchema, clean_text, validate_report  # noqa: F401


@dataclass
class _Choice:
    options: list[tuple[tuple[int, ...], int]]   # (token ids, next node); next -1 = end
    kind: str = ""                               # "label" | "side": options carry values
    values: tuple[str, ...] = ()


@dataclass
class _Digits:
    max_digits: int
    next: int


@dataclass
class _Text:
    max_tokens: int
    next: int


# (node, tokens consumed inside it, (finding (label, side) pairs written so far, current label));
# node -1 = done. A (label, side) pair may be written once: beam and greedy search otherwise
# fall into repeating one finding until the list is full.
Ctx = tuple[frozenset, "str | None"]
State = tuple[int, tuple[int, ...], Ctx]
EMPTY: Ctx = (frozenset(), None)
DONE = -1


class ReportGrammar:
    """The report schema as a token automaton for one tokenizer."""

    def __init__(self, schema: ReportSchema, tokenizer):
        self.schema = schema
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ReportGenerationError("the tokenizer has no end-of-sequence token")
        self._ids: dict[str, tuple[int, ...]] = {}
        self._scan_vocab()
        self.nodes: list[Any] = []
        self._build()

    # ------------------------------------------------------------------ vocabulary
    def ids(self, text: str) -> tuple[int, ...]:
        if text not in self._ids:
            self._ids[text] = tuple(self.tok(text, add_special_tokens=False).input_ids)
        return self._ids[text]

    def _scan_vocab(self) -> None:
        n = len(self.tok)
        special = set(self.tok.all_special_ids)
        text_ok = torch.zeros(n, dtype=torch.bool)
        digit = []
        for i in range(n):
            if i in special:
                continue
            s = self.tok.decode([i])
            if not s or "\ufffd" in s:
                continue
            if s.isascii() and s.isdigit():
                digit.append(i)
            if s.isascii() and '"' not in s and "\\" not in s and not any(ord(c) < 32 or ord(c) == 127 for c in s):
                text_ok[i] = True
        self.text_mask = text_ok
        self.digit_ids = frozenset(digit)
        self.vocab_size = n

    # ------------------------------------------------------------------ building
    def _add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _lit(self, text: str, nxt: int) -> _Choice:
        return _Choice([(self.ids(text), nxt)])

    def _build(self) -> None:
        s = self.schema
        # nodes are appended as placeholders first and filled in, so forward references work
        start = self._add(None)
        exam = self._add(None)
        fopen = self._add(None)
        imp_open_done = self._add(None)    # Text node of the impression
        end_choice = self._add(None)
        self.nodes[end_choice] = _Choice([(self.ids('"}') + (self.eos,), -1)])
        self.nodes[imp_open_done] = _Text(s.max_impression_tokens, end_choice)
        after_findings = ', "impression": "'
        # one chain of nodes per finding position, so the count is bounded
        label_nodes = [self._add(None) for _ in range(s.max_findings)]
        for k in range(s.max_findings):
            side = self._add(None)
            size_open = self._add(None)
            size = self._add(None)
            desc = self._add(None)
            close = self._add(None)
            self.nodes[label_nodes[k]] = _Choice([(self.ids(lab + '"'), side) for lab in s.labels], "label",
                                                 tuple(s.labels))
            side_enum = self._add(_Choice([(self.ids(v + '"'), size_open) for v in s.sides], "side", tuple(s.sides)))
            self.nodes[side] = self._lit(', "side": "', side_enum)
            self.nodes[size_open] = self._lit(', "size_mm": ', size)
            desc_open = self._add(None)
            self.nodes[size] = _Digits(s.max_size_digits, desc_open)
            self.nodes[desc_open] = self._lit(', "description": "', desc)
            self.nodes[desc] = _Text(s.max_description_tokens, close)
            opts = [(self.ids('"}' + "]" + after_findings), imp_open_done)]
            if k + 1 < s.max_findings:
                opts.append((self.ids('"}, {"label": "'), label_nodes[k + 1]))
            self.nodes[close] = _Choice(opts)
        self.nodes[fopen] = _Choice([(self.ids("]" + after_findings), imp_open_done),
                                     (self.ids('{"label": "'), label_nodes[0])])
        self.nodes[exam] = _Choice([(self.ids(v + '", "findings": ['), fopen) for v in s.exam_types])
        self.nodes[start] = self._lit('{"exam_type": "', exam)
        self.start: State = (start, (), EMPTY)
        self._check()

    def _check(self) -> None:
        """Every choice must be prefix-free and every choice after a Digits/Text node must start
        with a token that node cannot emit; otherwise decoding would be ambiguous."""
        text_ids = set(torch.nonzero(self.text_mask).flatten().tolist())
        for i, node in enumerate(self.nodes):
            if isinstance(node, _Choice):
                seqs = [o for o, _ in node.options]
                for a in seqs:
                    if not a:
                        raise ReportGenerationError(f"grammar node {i}: empty option")
                    for b in seqs:
                        if a is not b and len(a) <= len(b) and b[:len(a)] == a:
                            raise ReportGenerationError(f"grammar node {i}: option {a} is a prefix of {b}")
            if isinstance(node, (_Digits, _Text)):
                firsts = {o[0] for o, _ in self.nodes[node.next].options}
                own = self.digit_ids if isinstance(node, _Digits) else text_ids
                if firsts & own:
                    raise ReportGenerationError(f"grammar node {i}: its end is ambiguous with this tokenizer")

    # ------------------------------------------------------------------ running
    @staticmethod
    def is_done(state: State) -> bool:
        return state[0] == DONE

    def _live(self, idx: int, ctx: Ctx) -> list[tuple[tuple[int, ...], int, str]]:
        """The options of a choice node still open given what the report already holds."""
        node = self.nodes[idx]
        used, cur = ctx
        vals = node.values or ("",) * len(node.options)
        out = []
        for (o, nxt), v in zip(node.options, vals):
            if node.kind == "label" and all((v, sd) in used for sd in self.schema.sides):
                continue
            if node.kind == "side" and (cur, v) in used:
                continue
            out.append((o, nxt, v))
        return out

    def _choice_next(self, idx: int, prefix: tuple[int, ...], ctx: Ctx) -> list[int]:
        n = len(prefix)
        return sorted({o[n] for o, _, _ in self._live(idx, ctx) if len(o) > n and o[:n] == prefix})

    def _step_choice(self, idx: int, prefix: tuple[int, ...], tok: int, ctx: Ctx) -> State | None:
        kind = self.nodes[idx].kind
        p = prefix + (tok,)
        live = self._live(idx, ctx)
        for o, nxt, v in live:
            if o == p:
                used, cur = ctx
                if kind == "label":
                    ctx = (used, v)
                elif kind == "side":
                    ctx = (used | {(cur, v)}, cur)
                return (nxt, (), ctx)
        if any(len(o) > len(p) and o[:len(p)] == p for o, _, _ in live):
            return (idx, p, ctx)
        return None

    def advance(self, state: State, tok: int) -> State:
        """The state after emitting tok; raises ReportGenerationError if tok is not allowed."""
        idx, got, ctx = state
        out = None
        if idx < 0 and tok == self.eos:
            out = state                   # finished hypotheses are padded with EOS by beam search
        elif idx >= 0:
            node = self.nodes[idx]
            if isinstance(node, _Choice):
                out = self._step_choice(idx, got, tok, ctx)
            else:
                limit = node.max_digits if isinstance(node, _Digits) else node.max_tokens
                own = tok in self.digit_ids if isinstance(node, _Digits) else \
                    (0 <= tok < self.vocab_size and bool(self.text_mask[tok]))
                min_len = 1 if isinstance(node, _Digits) else 0
                if own and len(got) < limit:
                    out = (idx, got + (tok,), ctx)
                elif len(got) >= min_len:
                    out = self._step_choice(node.next, (), tok, ctx)
        if out is None:
            raise ReportGenerationError(f"token {tok} ({self.tok.decode([tok])!r}) breaks the report schema")
        return out

    def allowed(self, state: State) -> tuple[list[int], bool]:
        """(explicit token ids, whether the free-text mask is also allowed)."""
        idx, got, ctx = state
        if idx < 0:
            return [self.eos], False
        node = self.nodes[idx]
        if isinstance(node, _Choice):
            return self._choice_next(idx, got, ctx), False
        nxt = self._choice_next(node.next, (), ctx)
        if isinstance(node, _Digits):
            own = sorted(self.digit_ids) if len(got) < node.max_digits else []
            return (own + nxt) if got else own, False
        return nxt, len(got) < node.max_tokens

    def forced(self, state: State) -> list[int]:
        """The run of tokens that is the only continuation from state (keys, punctuation)."""
        out = []
        while state[0] >= 0:
            ids, free = self.allowed(state)
            if free or len(ids) != 1:
                break
            out.append(ids[0])
            state = self.advance(state, ids[0])
        return out

    def mask(self, state: State, device=None) -> torch.Tensor:
        ids, free = self.allowed(state)
        m = self.text_mask.clone() if free else torch.zeros(self.vocab_size, dtype=torch.bool)
        m[ids] = True
        return m.to(device) if device is not None else m

    def run(self, ids) -> State:
        state = self.start
        for t in ids:
            state = self.advance(state, int(t))
        return state

    def max_length(self) -> int:
        """An upper bound on the number of tokens of any report (for max_new_tokens)."""
        s = self.schema
        longest = max(len(o) for node in self.nodes if isinstance(node, _Choice) for o, _ in node.options)
        per_finding = 6 * longest + s.max_size_digits + s.max_description_tokens
        return 4 * longest + s.max_findings * per_finding + s.max_impression_tokens + 8

    # ------------------------------------------------------------------ reports <-> tokens
    def encode(self, report: dict[str, Any]) -> list[int]:
        """Token ids of a report, tokenised piece by piece exactly as the decoder emits it."""
        validate_report(report, self.schema)
        s = self.schema
        if len(report["findings"]) > s.max_findings:
            raise ReportGenerationError(f"{len(report['findings'])} findings > max {s.max_findings}")
        out = list(self.ids('{"exam_type": "')) + list(self.ids(report["exam_type"] + '", "findings": ['))
        after_findings = ', "impression": "'
        fs = report["findings"]
        if not fs:
            out += self.ids("]" + after_findings)
        for k, f in enumerate(fs):
            out += self.ids('{"label": "') if k == 0 else ()
            out += self.ids(f["label"] + '"') + self.ids(', "side": "') + self.ids(f["side"] + '"')
            out += self.ids(', "size_mm": ') + self.ids(str(int(f["size_mm"]))[: s.max_size_digits])
            out += self.ids(', "description": "')
            out += self._text_ids(f["description"], s.max_description_tokens)
            out += self.ids('"}, {"label": "') if k + 1 < len(fs) else self.ids('"}' + "]" + after_findings)
        out += self._text_ids(report["impression"], s.max_impression_tokens)
        out += self.ids('"}') + (self.eos,)
        state = self.run(out)            # the decoder must be able to produce every training answer
        if not self.is_done(state):
            raise ReportGenerationError("internal: encoded report does not reach the end of the grammar")
        return out

    def _text_ids(self, text: str, limit: int) -> tuple[int, ...]:
        ids = [i for i in self.ids(clean_text(text)) if self.text_mask[i]]
        return tuple(ids[:limit])

    def decode(self, ids) -> dict[str, Any]:
        """Generated ids -> validated report; ReportGenerationError if they are not a full report."""
        ids = [int(i) for i in ids]
        if self.eos in ids:               # the report ends at its first EOS (beam search pads after it)
            ids = ids[: ids.index(self.eos) + 1]
        body = ids[:-1] if ids and ids[-1] == self.eos else ids
        try:
            state = self.run(ids)
        except ReportGenerationError as e:
            raise ReportGenerationError(f"generated tokens break the schema: {e}") from None
        if not self.is_done(state):
            raise ReportGenerationError(f"generation stopped before the report was complete "
                                        f"({len(ids)} tokens; raise max_new_tokens?)")
        text = self.tok.decode(body, skip_special_tokens=False)
        try:
            report = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportGenerationError(f"generated text is not JSON ({e}): {text[:200]!r}") from None
        return validate_report(report, self.schema, "generated report")


class ReportLogitsProcessor:
    """A transformers LogitsProcessor that keeps every hypothesis inside the report grammar.

    Works for greedy and beam search: each row's state is recomputed from its own generated
    tokens (cached by prefix), so beam reordering needs no bookkeeping."""

    def __init__(self, grammar: ReportGrammar):
        self.g = grammar
        self.prompt_len: int | None = None
        self._cache: dict[tuple[int, ...], State] = {(): grammar.start}

    def _state(self, gen: tuple[int, ...]) -> State:
        st = self._cache.get(gen)
        if st is None:
            st = self.g.advance(self._state(gen[:-1]), gen[-1])
            self._cache[gen] = st
        return st

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        out = torch.full_like(scores, float("-inf"))
        for r in range(input_ids.shape[0]):
            gen = tuple(input_ids[r, self.prompt_len:].tolist())
            m = self.g.mask(self._state(gen), scores.device)
            n = min(m.shape[0], scores.shape[1])
            out[r, :n] = torch.where(m[:n], scores[r, :n], out[r, :n])
        return out


def _cache_name(llm) -> str:
    """transformers renamed `past_key_values` to `cache` (5.x); speak whichever this one knows."""
    import inspect

    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


@torch.no_grad()
def greedy_decode(llm, grammar: ReportGrammar, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Greedy decoding inside the grammar; forced runs of tokens go through the model in one pass."""
    name = _cache_name(llm)
    out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True)
    past, logits = _cache_of(out), out.logits[0, -1]
    state, gen, pending = grammar.start, [], []
    n_past = inputs_embeds.shape[1]
    limit = grammar.max_length()
    while not grammar.is_done(state):
        f = grammar.forced(state)
        if f:
            for t in f:
                state = grammar.advance(state, t)
            gen += f
            pending += f
            continue
        if pending:
            ids = torch.tensor([pending], device=inputs_embeds.device)
            am = torch.ones(1, n_past + len(pending), dtype=attention_mask.dtype, device=attention_mask.device)
            out = llm(input_ids=ids, attention_mask=am, use_cache=True, **{name: past})
            past, logits = _cache_of(out), out.logits[0, -1]
            n_past += len(pending)
            pending = []
        m = grammar.mask(state, logits.device)
        n = min(m.shape[0], logits.shape[0])
        t = int(torch.argmax(logits[:n].masked_fill(~m[:n], float("-inf"))))
        state = grammar.advance(state, t)
        gen.append(t)
        pending = [t]
        if len(gen) > limit:
            raise ReportGenerationError(f"generation exceeded {limit} tokens without completing the report")
    return gen
