"""A tiny offline causal LM for tests (no model hub).

`build_tiny_model(path) -> path` trains a byte-level BPE tokenizer (~400 tokens)
with `tokenizers` on a synthetic corpus, wraps it in a `PreTrainedTokenizerFast`
(eos = the end-of-turn token `<|end|>`, a pad token, left padding, a chat
template) and saves a random-init Llama (hidden 64, 2 layers, 4 heads) whose
untied `lm_head` is re-initialised with std 0.3 so LoRA can make it confident.
Deterministic for a given `seed`; `tiny_model_path()` caches one per session.

`build_pretrained_tiny_model(path)` (opt-in, the RFT benchmark's base) builds the same kind of model and pretrains
all its weights for a few tens of seconds on a generic synthetic corpus (see the comment above it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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


def _save_tokenizer(path: Path, lines: list[str], vocab_size: int, digits_alone: bool = False) -> Any:
    """A byte-level BPE tokenizer trained on `lines` (the special tokens, the chat template, left padding), saved
    under `path`. `digits_alone`: every digit a token of its own (as in Llama's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if digits_alone else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", unk_token="<|unk|>",
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(path)
    return hf_tok


def _llama(hf_tok: Any, hidden_size: int, num_layers: int) -> Any:
    """A random-init Llama for `hf_tok`: 4 heads, MLP twice the hidden size, untied head (seed torch first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def build_tiny_model(path: str | os.PathLike, seed: int = 0, vocab_size: int = 400, hidden_size: int = 64, num_layers: int = 2) -> str:
    """Build and save the tiny model + tokenizer under `path`; returns the path. `hidden_size` / `num_layers`
    make it larger (4 heads, MLP twice the hidden size) for the RFT benchmark's size trade-off."""
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_tok = _save_tokenizer(path, _corpus(), vocab_size)
    torch.manual_seed(seed)
    model = _llama(hf_tok, hidden_size, num_layers)
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


# ------------------------------------------------------------------ a briefly pretrained tiny base (issue 16)
#
# Reinforcement fine-tuning sharpens skills a pretrained model already has; a random-init base has none. This base is
# pretrained at build time, offline, for a few seconds, on a GENERIC synthetic corpus over the alphabet of the RFT
# benchmark's tasks (lowercase letters, digits, their upper-case pairs, digit words), in the chat format:
#
#   find        "Which character of xk7ab is a digit?" -> "7"; "... of 38x21 is a letter?" -> "x" (random strings of 3-5
#               letters and one digit, or digits and one letter)
#   digit facts parity ("Parity of 7?" -> "odd"), successor and predecessor on a clock of ten, number words both ways
#   case        "Upper case of q?" -> "Q", "Lower case of Q?" -> "q"
#   composed    find + a fact the benchmark does NOT ask: the predecessor of the digit in a string, whether it is more
#               than four, the letter after the letter in a string
#   tags        "Wrap seven in answer tags." -> "<answer>seven</answer>"; other answers in tags half of the time
#
# It never holds the benchmark's question templates (`tasks.py`: "Is the digit in ... even or odd?", "... plus one,
# mod 10?", "Capitalise the letter in ...", "Spell the digit in ...") nor their compositions (the parity, successor,
# upper case or word of the character found in a string): the tasks' labelled answers stay out. Its random strings
# come from its own generator (a held-out string of a task may occur, never with that task's question).

PRETRAIN_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _pt_string(rng, kind: str) -> tuple[str, str]:
    """A random string with exactly one character of the other kind: ('digit': letters + one digit) or
    ('letter': digits + one letter); returns (string, that character)."""
    import string as _s

    if kind == "digit":
        chars = [rng.choice(PRETRAIN_LETTERS) for _ in range(rng.randint(3, 5))]
        odd = rng.choice(_s.digits)
    else:
        chars = [rng.choice(_s.digits) for _ in range(rng.randint(3, 5))]
        odd = rng.choice(PRETRAIN_LETTERS)
    chars.insert(rng.randint(0, len(chars)), odd)
    return "".join(chars), odd


# find-the-odd-one-out weighs most: it is the attention skill every composed question needs
SKILLS = ["find", "find", "find", "parity", "next", "prev", "word", "unword", "upper", "lower", "c-prev", "c-prev",
          "c-more", "c-more", "c-nextletter", "tags"]
_DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _pt_example(rng) -> tuple[str, str]:
    """One (question, answer) of the generic corpus."""
    skill = rng.choice(SKILLS)
    d = rng.randrange(10)
    c = rng.choice(PRETRAIN_LETTERS)
    if skill == "find":
        kind = rng.choice(["digit", "letter"])
        s, odd = _pt_string(rng, kind)
        return rng.choice(["Which character of {s} is a {k}?", "Find the {k} among {s}.", "{s} has one {k}: which?"]).format(s=s, k=kind), odd
    if skill == "parity":
        return rng.choice(["Parity of {d}?", "{d}: odd or even number?"]).format(d=d), "even" if d % 2 == 0 else "odd"
    if skill == "next":
        return rng.choice(["What comes after {d}?", "Next digit after {d} on a clock of ten?"]).format(d=d), str((d + 1) % 10)
    if skill == "prev":
        return rng.choice(["What comes before {d}?", "Digit before {d} on a clock of ten?"]).format(d=d), str((d - 1) % 10)
    if skill == "word":
        return rng.choice(["Write {d} as a word.", "{d} in words?"]).format(d=d), _DIGIT_WORDS[d]
    if skill == "unword":
        return rng.choice(["Write {w} as a digit.", "{w} as a digit?"]).format(w=_DIGIT_WORDS[d]), str(d)
    if skill == "upper":
        return rng.choice(["Upper case of {c}?", "{c} as a capital?"]).format(c=c), c.upper()
    if skill == "lower":
        return rng.choice(["Lower case of {C}?", "{C} in small letters?"]).format(C=c.upper()), c
    if skill == "c-prev":
        s, odd = _pt_string(rng, "digit")
        return rng.choice(["What comes before the digit of {s}?", "Take the digit of {s}; which digit comes before it?"]).format(s=s), str((int(odd) - 1) % 10)
    if skill == "c-more":
        s, odd = _pt_string(rng, "digit")
        return rng.choice(["Is the digit of {s} more than four?", "Does {s} hold a digit above four?"]).format(s=s), "yes" if int(odd) > 4 else "no"
    if skill == "c-nextletter":
        s, odd = _pt_string(rng, "letter")
        return rng.choice(["Letter after the letter of {s}?", "Take the letter of {s}; which letter follows it?"]).format(s=s), PRETRAIN_LETTERS[(PRETRAIN_LETTERS.index(odd) + 1) % 26]
    w = rng.choice([str(d), c, c.upper(), _DIGIT_WORDS[d], "yes", "no", "even", "odd"])
    return rng.choice(["Wrap {w} in answer tags.", "Put {w} between answer tags."]).format(w=w), f"<answer>{w}</answer>"


def pretrain_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` chat-formatted lines of the generic corpus (answers in `<answer>` tags half of the time)."""
    import random

    rng = random.Random(f"tiny-pretrain/{seed}")
    lines = []
    for _ in range(n):
        q, a = _pt_example(rng)
        if not a.startswith("<answer>") and rng.random() < 0.5:
            a = f"<answer>{a}</answer>"
        lines.append(f"<|user|>{q}<|end|><|assistant|>{a}<|end|>")
    return lines


def _pt_probe_items(n: int, seed: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(f"tiny-probe/{seed}")
    return [_pt_example(rng) for _ in range(n)]


def probe_accuracy(path: str | os.PathLike, n: int = 200, seed: int = 12345) -> float:
    """Greedy exact accuracy of the model at `path` on `n` fresh questions of the generic corpus (answers with or
    without `<answer>` tags count): a check that pretraining gave skills, 0 for a random-init base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    items = _pt_probe_items(n, seed)
    right = 0
    for i in range(0, n, 50):
        chunk = items[i:i + 50]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q, _ in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for (_, a), row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            got = tok.decode(row, skip_special_tokens=True).strip()
            if got.startswith("<answer>") and got.endswith("</answer>") and not a.startswith("<answer>"):
                got = got[len("<answer>"):-len("</answer>")]
            right += got == a
    return right / n


def build_pretrained_tiny_model(path: str | os.PathLike, seed: int = 0, steps: int = 1000, batch_size: int = 64,
                                learning_rate: float = 5e-3, hidden_size: int = 64, num_layers: int = 2,
                                vocab_size: int = 400, corpus_size: int = 20000) -> str:
    """Build the tiny model and pretrain ALL its weights for `steps` steps on the generic corpus (`pretrain_corpus`),
    on one CPU thread, deterministically for `seed`; save it under `path` (with `pretrain.json`: steps, final loss,
    build seconds). LoRA then trains on top of the frozen, pretrained base, as on a real model. Opt-in: the tests'
    `tiny_model_path()` stays the random-init base."""
    import math
    import time

    import torch

    t0 = time.monotonic()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = pretrain_corpus(corpus_size, seed)
    # digits one token each: a digit among letters is a token of its own
    hf_tok = _save_tokenizer(path, corpus[:4000] + _corpus(), vocab_size, digits_alone=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = _llama(hf_tok, hidden_size, num_layers)
        ids = [hf_tok(line, add_special_tokens=False)["input_ids"] for line in corpus]
        width = max(map(len, ids))
        data = torch.full((len(ids), width), hf_tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            data[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        # loss on the answers (the assistant turn and its end), as in chat pretraining: a random string in a
        # question cannot be predicted, its tokens only dilute the gradient
        labels = data.masked_fill(mask == 0, -100)
        start = hf_tok.convert_tokens_to_ids("<|assistant|>")
        for i, row in enumerate(ids):
            labels[i, :row.index(start) + 1] = -100
        opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(ids), (batch_size,), generator=gen)
            n = int(mask[idx].sum(1).max())
            out = model(input_ids=data[idx, :n], attention_mask=mask[idx, :n], labels=labels[idx, :n])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.save_pretrained(path)
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "hidden_size": hidden_size,
            "num_layers": num_layers, "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None, "build_seconds": round(time.monotonic() - t0, 2)}
    (path / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    return str(path)
