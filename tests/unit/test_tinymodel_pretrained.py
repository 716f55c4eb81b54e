"""The briefly pretrained tiny base (`perennial_trainer.tinymodel.build_pretrained_tiny_model`, issue 16): built
offline, deterministic for a seed, with generic skills a random-init base lacks, and a corpus that holds none of the RFT
benchmark's questions (`perennial_trainer.tasks`)."""

from __future__ import annotations

import json
import re
import socket

import pytest
from perennial_trainer.tasks import TASKS, splits
from perennial_trainer.tinymodel import (
    build_pretrained_tiny_model,
    pretrain_corpus,
    probe_accuracy,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Pretrained for 400 steps (the benchmark's base takes more): enough for skills, a few seconds on one thread."""
    return build_pretrained_tiny_model(tmp_path_factory.mktemp("pt") / "model", steps=400)


def test_pretrained_base_has_skills_the_random_base_lacks(pretrained, tmp_path):
    untrained = build_pretrained_tiny_model(tmp_path / "untrained", steps=0)  # same tokenizer and init, no steps
    got, control = probe_accuracy(pretrained), probe_accuracy(untrained)
    assert control < 0.05, control
    assert got > 0.3, got  # (0.445 here; 0.895 after the default 1,000 steps) fresh questions (finding the digit, digit facts, case pairs, ...) answered right
    info = json.loads((tmp_path / "untrained" / "pretrain.json").read_text())
    assert info["steps"] == 0 and info["build_seconds"] >= 0


def test_build_is_deterministic_for_a_seed_and_offline(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    def no_network(*a, **k):
        raise OSError("network use in an offline build")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    a = build_pretrained_tiny_model(tmp_path / "a", steps=20, corpus_size=2000)
    b = build_pretrained_tiny_model(tmp_path / "b", steps=20, corpus_size=2000)
    c = build_pretrained_tiny_model(tmp_path / "c", steps=20, corpus_size=2000, seed=1)
    wa, wb, wc = (load_file(f"{p}/model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].shape == wc[k].shape)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_digits_are_tokens_of_their_own(pretrained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pretrained)
    for s in ("xk7ab", "38x21", "q9"):
        pieces = [tok.convert_tokens_to_string([t]) for t in tok.tokenize(f"Is the digit in {s} even?")]
        for ch in s:
            if ch.isdigit():
                assert ch in pieces, (s, pieces)


def test_the_corpus_holds_none_of_the_benchmark_questions():
    corpus = pretrain_corpus(20000, seed=0)
    questions = [re.match(r"<\|user\|>(.*?)<\|end\|>", line).group(1) for line in corpus]
    for name, task in TASKS.items():
        asked = splits(task, seed=0)["eval"][0]["prompt"][0]["content"]
        key = splits(task, seed=0)["eval"][0]["key"]
        template = re.escape(asked.replace(key, "\0")).replace("\0", "[a-z0-9]+")
        assert not any(re.fullmatch(template, q) for q in questions), name
    # nor any phrasing of the tasks' words (their instructions stay new to the base)
    text = "\n".join(questions).lower()
    for word in ("even or odd", "plus one", "mod 10", "capitalise", "spell"):
        assert word not in text, word
