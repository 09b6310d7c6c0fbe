"""On the real model (SmolLM2-135M-Instruct Q4_1); skipped unless ``EMBER_TEST_MODEL`` is set
(``export EMBER_TEST_MODEL=$(scripts/fetch-model.sh)``)."""

from __future__ import annotations

import json

import pytest

# tests/fixtures/smollm2_ppl.json: float64 transformers reference for short.txt, window 512.
SHORT_PPL = 22.512


def test_capital_of_france(smol_session):
    g = smol_session.generate("The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in g.text
    assert g.n_prompt_tokens == 5


def test_perplexity_of_short_text(smol_session, repo):
    text = (repo / "tests" / "fixtures" / "text" / "short.txt").read_text()
    ppl, scored = smol_session.perplexity(text, window=512, return_count=True)
    assert ppl == pytest.approx(SHORT_PPL, rel=1e-3)
    assert scored == 18


def test_tokenizer_matches_the_reference_ids(smol, repo):
    ref = json.loads((repo / "tests" / "fixtures" / "smollm2_ppl.json").read_text())["cases"][0]
    text = (repo / "tests" / "fixtures" / "text" / "short.txt").read_text()
    assert smol.tokenize(text, add_bos=False) == ref["ids"]


def test_chat_template(smol):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ]
    out = smol.apply_chat_template(messages)
    assert out.startswith("<|im_start|>")
    assert out.endswith("<|im_start|>assistant\n")
    assert "Hi" in out and "You are terse." in out
    assert not smol.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "assistant\n"
    )
    (im_end,) = smol.tokenize("<|im_end|>", add_bos=False, parse_special=True)
    assert smol.is_eog(im_end)
    assert im_end in smol.tokenize(out, add_bos=False, parse_special=True)


def test_chat_stream_matches_generate(smol_session):
    kw = dict(max_tokens=16, temperature=0, chat=True)
    g = smol_session.generate("What is 2+2?", **kw)
    s = smol_session.stream("What is 2+2?", **kw)
    assert "".join(s) == g.text
    assert s.result.tokens == g.tokens and s.result.stop_reason == g.stop_reason
    assert "4" in g.text
