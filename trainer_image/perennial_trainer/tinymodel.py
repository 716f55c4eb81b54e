"""A tiny offline causal LM for tests (no model hub).

`build_tiny_model(path) -> path` trains a byte-level BPE tokenizer (~400 tokens)
with `tokenizers` on a synthetic corpus, wraps it in a `PreTrainedTokenizerFast`
(eos = the end-of-turn token `<|end|>`, a pad token, left padding, a chat
template) and saves a random-init Llama (hidden 64, 2 layers, 4 heads) whose
untied `lm_head` is re-initialised with std 0.3 so LoRA can make it confident.
Deterministic for a given `seed`; `tiny_model_path()` caches one per session.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

FRUITS = {
    "apple": "red", "banana": "yellow", "lime": "green", "grape": "purple",
    "orange": "orange", "lemon": "yellow", "cherry": "red", "blueberry": "blue",
    "kiwi": "green", "plum": "purple", "strawberry": "red", "coconut": "brown",
}
COLOURS = sorted(set(FRUITS.values()))
QUESTION_TEMPLATES = [
    "What colour is a {fruit}?",
    "Which colour does a {fruit} have?",
    "Tell me the colour of a {fruit}.",
    "A {fruit} is what colour?",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|end|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|unk|>"]

_CACHE: dict[int, str] = {}


def _corpus() -> list[str]:
    lines = []
    for fruit, colour in FRUITS.items():
        for t in QUESTION_TEMPLATES:
            q = t.format(fruit=fruit)
            lines.append(f"<|user|>{q}<|end|><|assistant|><answer>{colour}</answer><|end|>")
    words = "the a of to is what which colour color answer tell me have does hello world yes no json python def return code test ok".split()
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += ["```python\ndef add(a, b):\n    return a + b\n```", '{"name": "x", "value": 1}']
    return lines * 3


def build_tiny_model(path: str | os.PathLike, seed: int = 0, vocab_size: int = 400, hidden_size: int = 64, num_layers: int = 2) -> str:
    """Build and save the tiny model + tokenizer under `path`; returns the path. `hidden_size` / `num_layers`
    make it larger (4 heads, MLP twice the hidden size) for the RFT benchmark's size trade-off."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", unk_token="<|unk|>",
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(path)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.save_pretrained(path)
    return str(path)


def tiny_model_path(seed: int = 0) -> str:
    """A per-process cached tiny model (built once into a temp dir)."""
    if seed not in _CACHE:
        d = Path(tempfile.mkdtemp(prefix="perennial-tiny-")) / "model"
        _CACHE[seed] = build_tiny_model(d, seed=seed)
    return _CACHE[seed]


def fruit_rows(templates: list[str] | None = None) -> list[dict]:
    """Conversational prompt rows of the fruit→colour toy, with the answer as an item field."""
    rows = []
    for t in templates or QUESTION_TEMPLATES:
        for fruit, colour in FRUITS.items():
            rows.append({"prompt": [{"role": "user", "content": t.format(fruit=fruit)}], "answer": colour})
    return rows


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)
