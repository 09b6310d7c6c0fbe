"""End to end on the tiny random Llama (gibberish text, but fast and deterministic)."""

from __future__ import annotations

import gc
import math
import sys
import threading
import weakref

import pytest

import ember

PROMPT = "Hello"


# -- model --------------------------------------------------------------------------------


def test_model_info(tiny):
    i = tiny.info
    assert isinstance(i, ember.ModelInfo)
    assert (i.vocab, i.hidden, i.n_layers, i.n_heads, i.n_kv_heads, i.head_dim, i.ff) == (
        256,
        64,
        2,
        4,
        2,
        16,
        128,
    )
    assert i.n_params > 0 and i.weight_bytes > 0
    assert i.as_dict()["vocab"] == 256
    assert "config" in tiny.details
    assert "vocab=256" in repr(tiny)


def test_moe_model_info_and_expert_counts(tiny_moe):
    i = tiny_moe.info
    assert (i.n_experts, i.n_experts_used) == (4, 2)
    assert 0 < i.n_active_params < i.n_params
    with ember.Session(tiny_moe, n_ctx=64) as s:
        assert s.expert_counts() == [[0] * 4, [0] * 4]
        s.generate("Hello", max_tokens=3, temperature=0.0)
        counts = s.expert_counts()
        assert len(counts) == 2 and all(len(c) == 4 for c in counts)
        # Every token of the prompt and of the generation went to 2 experts per layer.
        assert sum(counts[0]) == sum(counts[1]) > 0
        assert sum(counts[0]) % 2 == 0
        s.reset_expert_counts()
        assert s.expert_counts() == [[0] * 4, [0] * 4]


def test_dense_model_has_no_expert_counts(tiny, tiny_session):
    assert (tiny.info.n_experts, tiny.info.n_experts_used) == (0, 0)
    assert tiny.info.n_active_params == tiny.info.n_params
    assert tiny_session.expert_counts() == []


@pytest.mark.parametrize(
    "text", ["Hello world", "", "  spaces  and\ttabs\n", "héllo wörld, 日本語 🙂", "a\0b"]
)
def test_tokenize_detokenize_round_trip(tiny, text):
    ids = tiny.tokenize(text, add_bos=False)
    assert all(isinstance(t, int) and 0 <= t < tiny.info.vocab for t in ids)
    assert tiny.detokenize(ids) == text


def test_tokenize_long_text_grows_the_buffer(tiny):
    text = "xyz " * 5000
    assert tiny.detokenize(tiny.tokenize(text, add_bos=False)) == text


def test_tokenizer_arguments_are_checked(tiny):
    with pytest.raises(TypeError):
        tiny.tokenize(b"bytes")
    with pytest.raises(TypeError):
        tiny.tokenize("x", add_bos=1)
    with pytest.raises(TypeError):
        tiny.detokenize("abc")
    with pytest.raises(TypeError):
        tiny.detokenize([1, "2"])
    with pytest.raises(TypeError):
        tiny.detokenize([1.5])
    with pytest.raises(ValueError):
        tiny.detokenize([-1])
    with pytest.raises(ValueError):
        tiny.detokenize([2**32])
    with pytest.raises(ember.EmberError) as e:
        tiny.detokenize([tiny.info.vocab])
    assert e.value.status == ember.Status.INVALID_ARGUMENT
    assert "vocabulary" in e.value.message


def test_no_chat_template_is_unsupported(tiny):
    with pytest.raises(ember.EmberError) as e:
        tiny.apply_chat_template([{"role": "user", "content": "hi"}])
    assert e.value.status == ember.Status.UNSUPPORTED
    with pytest.raises(TypeError):
        tiny.apply_chat_template("hi")
    with pytest.raises(ValueError):
        tiny.apply_chat_template([{"role": "user"}])


# -- generation ---------------------------------------------------------------------------


def test_greedy_generate_is_deterministic(tiny_session):
    a = tiny_session.generate(PROMPT, max_tokens=16, temperature=0)
    b = tiny_session.generate(PROMPT, max_tokens=16, temperature=0)
    assert a.text == b.text and a.tokens == b.tokens
    assert a.n_tokens == len(a.tokens) == 16
    assert a.stop_reason == ember.StopReason.LENGTH
    assert a.n_prompt_tokens == len(tiny_session.model.tokenize(PROMPT, parse_special=True))
    assert a.decode_tok_s > 0 and a.prefill_tok_s > 0 and a.tok_s == a.decode_tok_s


def test_sampling_follows_the_seed(tiny_session):
    a = tiny_session.generate(PROMPT, max_tokens=16, temperature=1.0, top_k=0, min_p=0, seed=7)
    b = tiny_session.generate(PROMPT, max_tokens=16, temperature=1.0, top_k=0, min_p=0, seed=7)
    c = tiny_session.generate(PROMPT, max_tokens=16, temperature=1.0, top_k=0, min_p=0, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_max_tokens_zero(tiny_session):
    g = tiny_session.generate(PROMPT, max_tokens=0)
    assert g.text == "" and g.tokens == [] and g.stop_reason == ember.StopReason.LENGTH
    s = tiny_session.stream(PROMPT, max_tokens=0)
    assert list(s) == [] and s.result.tokens == []


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stream_joins_to_generate(tiny_session, seed):
    kw = dict(max_tokens=24, temperature=0.9, seed=seed)
    g = tiny_session.generate(PROMPT, **kw)
    s = tiny_session.stream(PROMPT, **kw)
    pieces = list(s)
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == g.text
    assert s.result.text == g.text and s.result.tokens == g.tokens
    assert s.result.stop_reason == g.stop_reason


def test_stream_and_generate_stop_at_the_same_string(tiny_session):
    full = tiny_session.generate(PROMPT, max_tokens=24, temperature=0)
    stop = full.text[4:7]
    g = tiny_session.generate(PROMPT, max_tokens=24, temperature=0, stop=[stop, "never"])
    assert g.stop_reason == ember.StopReason.STRING
    assert stop not in g.text and full.text.startswith(g.text)
    s = tiny_session.stream(PROMPT, max_tokens=24, temperature=0, stop=[stop, "never"])
    assert "".join(s) == g.text
    assert s.result.stop_reason == ember.StopReason.STRING
    assert s.result.tokens == g.tokens


def test_stream_closed_early_frees_its_sequence(tiny):
    with ember.Session(tiny, n_ctx=128, n_seq=1) as session:
        with session.stream(PROMPT, max_tokens=50, temperature=0) as s:
            first = next(s)
        assert first and s.result.stop_reason == ember.StopReason.CALLBACK
        # The only sequence slot is free again.
        assert session.generate(PROMPT, max_tokens=2, temperature=0).n_tokens == 2
        # An abandoned iterator frees it too.
        it = session.stream(PROMPT, max_tokens=50, temperature=0)
        next(it)
        del it
        gc.collect()
        assert session.generate(PROMPT, max_tokens=2, temperature=0).n_tokens == 2


def test_stream_stops_when_the_context_is_full(tiny):
    with ember.Session(tiny, n_ctx=16) as session:
        g = session.generate(PROMPT, max_tokens=100, temperature=0)
        s = session.stream(PROMPT, max_tokens=100, temperature=0)
        assert "".join(s) == g.text
        assert g.stop_reason == s.result.stop_reason == ember.StopReason.CONTEXT
        assert s.result.tokens == g.tokens


def test_stream_accepts_token_ids(tiny_session):
    ids = tiny_session.model.tokenize(PROMPT, parse_special=True)
    g = tiny_session.generate(PROMPT, max_tokens=8, temperature=0)
    assert tiny_session.stream(ids, max_tokens=8, temperature=0).text == g.text


def test_on_token_callback(tiny_session):
    seen, pieces = [], []

    def record(token, piece):
        seen.append(token)
        pieces.append(piece)

    g = tiny_session.generate(PROMPT, max_tokens=6, temperature=0, on_token=record)
    # Token -1 carries the decoder's final flush (an unfinished UTF-8 sequence), if any.
    assert [t for t in seen if t >= 0] == g.tokens
    assert "".join(pieces) == g.text
    calls = []

    def three(token, piece):
        calls.append(token)
        return len(calls) < 3

    g = tiny_session.generate(PROMPT, max_tokens=20, temperature=0, on_token=three)
    assert g.stop_reason == ember.StopReason.CALLBACK
    assert g.tokens == calls == seen[:3]

    class Boom(Exception):
        pass

    def boom(t, p):
        raise Boom("from the token callback")

    with pytest.raises(Boom):
        tiny_session.generate(PROMPT, max_tokens=5, on_token=boom)
    # The session still works afterwards.
    assert tiny_session.generate(PROMPT, max_tokens=2).n_tokens == 2


def test_generate_arguments_are_checked(tiny_session):
    bad = [
        dict(prompt=3),
        dict(prompt="x\0y"),
        dict(max_tokens="10"),
        dict(max_tokens=-1),
        dict(temperature="hot"),
        dict(temperature=-0.5),
        dict(top_p=1.5),
        dict(seed=-1),
        dict(stop=5),
        dict(stop=["ok", 5]),
        dict(chat="yes"),
        dict(on_token=5),
    ]
    for kw in bad:
        kw.setdefault("prompt", PROMPT)
        with pytest.raises((TypeError, ValueError)):
            tiny_session.generate(**kw)
        with pytest.raises((TypeError, ValueError)):
            if "on_token" not in kw:
                tiny_session.stream(**kw)
            else:
                raise TypeError


# -- scoring ------------------------------------------------------------------------------


def test_evaluate_shape_and_greedy_argmax(tiny_session):
    np = pytest.importorskip("numpy")
    ids = tiny_session.model.tokenize(PROMPT, parse_special=True)
    logits = tiny_session.evaluate(ids)
    assert isinstance(logits, np.ndarray)
    assert logits.shape == (len(ids), tiny_session.model.info.vocab)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    g = tiny_session.generate(PROMPT, max_tokens=1, temperature=0)
    assert g.tokens[0] == int(np.argmax(logits[-1]))
    # Greedy continuation token by token agrees with evaluate's argmax.
    g = tiny_session.generate(PROMPT, max_tokens=6, temperature=0)
    logits = tiny_session.evaluate(ids + g.tokens[:-1])
    assert [int(t) for t in np.argmax(logits[len(ids) - 1 :], axis=1)] == g.tokens


def test_evaluate_without_numpy(tiny_session, monkeypatch):
    ids = tiny_session.model.tokenize(PROMPT, parse_special=True)
    expect = tiny_session.evaluate(ids)
    monkeypatch.setitem(sys.modules, "numpy", None)
    rows = tiny_session.evaluate(ids)
    assert isinstance(rows, list) and len(rows) == len(ids)
    assert all(isinstance(r, list) and len(r) == tiny_session.model.info.vocab for r in rows)
    if not isinstance(expect, list):
        expect = expect.tolist()
    assert rows == expect
    with pytest.raises(ValueError):
        tiny_session.evaluate([])


def test_perplexity(tiny_session):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ppl, scored = tiny_session.perplexity(text, window=32, return_count=True)
    assert math.isfinite(ppl) and ppl > 1 and scored > 0
    assert tiny_session.perplexity(text, window=32) == pytest.approx(ppl)
    with pytest.raises(ember.EmberError) as e:
        tiny_session.perplexity(text, window=4096)
    assert e.value.status == ember.Status.INVALID_ARGUMENT


def test_sequence_api_matches_generate(tiny_session):
    ids = tiny_session.model.tokenize(PROMPT, parse_special=True)
    g = tiny_session.generate(PROMPT, max_tokens=5, temperature=0)
    with (
        tiny_session.add_sequence(temperature=0) as a,
        tiny_session.add_sequence(temperature=0) as b,
    ):
        out_a = [a.prefill(ids)]
        out_b = [b.prefill(ids)]
        for _ in range(4):
            x, y = tiny_session.decode([a, b])
            out_a.append(x)
            out_b.append(y)
    assert out_a == out_b == g.tokens
    assert a.id is None


def test_raw_sequence_calls(tiny_session):
    ids = tiny_session.model.tokenize(PROMPT, parse_special=True)
    with pytest.raises(ember.EmberError) as e:
        tiny_session.seq_add(ember.SamplerParams(struct_size=0))
    assert e.value.status == ember.Status.INVALID_ARGUMENT
    seq = tiny_session.seq_add()
    first = tiny_session.seq_prefill(seq, ids)
    assert 0 <= first < 256
    assert len(tiny_session.seq_decode([seq])) == 1
    tiny_session.seq_remove(seq)
    with pytest.raises(ember.EmberError):
        tiny_session.seq_decode([seq])
    tiny_session.reset()


# -- errors -------------------------------------------------------------------------------


def test_missing_file_is_io(ctx, tmp_path):
    with pytest.raises(ember.EmberError) as e:
        ember.Model(ctx, tmp_path / "does-not-exist.gguf")
    assert e.value.status == ember.Status.IO
    assert e.value.message


def test_non_gguf_file_is_format(ctx, tmp_path):
    p = tmp_path / "not-a-model.gguf"
    p.write_bytes(b"this is not a GGUF file, just some text\n" * 10)
    with pytest.raises(ember.EmberError) as e:
        ember.Model(ctx, str(p))
    assert e.value.status == ember.Status.FORMAT


def test_model_arguments_are_checked(ctx, tiny_path):
    with pytest.raises(TypeError):
        ember.Model("ctx", tiny_path)
    with pytest.raises(TypeError):
        ember.Model(ctx, 42)
    with pytest.raises(TypeError):
        ember.Model(ctx, tiny_path, progress="not callable")
    with pytest.raises(ValueError):
        ember.Model(ctx, tiny_path + "\0x")
    with pytest.raises(TypeError):
        ember.Session("model")


def test_progress_callback(ctx, tiny_path):
    seen = []
    with ember.Model(ctx, tiny_path, progress=seen.append) as m:
        assert m.info.vocab == 256
    assert seen and all(0.0 <= f <= 1.0 for f in seen) and seen == sorted(seen)


def test_progress_returning_false_aborts(ctx, tiny_path):
    with pytest.raises(ember.EmberError) as e:
        ember.Model(ctx, tiny_path, progress=lambda f: False)
    assert e.value.status == ember.Status.ABORTED


def test_exception_in_progress_is_reraised(ctx, tiny_path):
    class Stop(Exception):
        pass

    calls = []

    def progress(f):
        calls.append(f)
        raise Stop("stop loading")

    with pytest.raises(Stop, match="stop loading"):
        ember.Model(ctx, tiny_path, progress=progress)
    assert len(calls) == 1  # the load stopped at once


def test_use_after_close_raises(ctx, tiny_path):
    m = ember.Model(ctx, tiny_path)
    s = ember.Session(m, n_ctx=64)
    s.close()
    s.close()
    for call in (
        lambda: s.generate(PROMPT, max_tokens=1),
        lambda: s.stream(PROMPT),
        lambda: s.evaluate([1, 2]),
        lambda: s.perplexity("abc abc abc"),
        lambda: s.seq_add(),
        lambda: s.reset(),
    ):
        with pytest.raises(ember.EmberError) as e:
            call()
        assert e.value.status == ember.Status.INVALID_ARGUMENT
    m.close()
    m.close()
    for call in (
        lambda: m.info,
        lambda: m.tokenize("x"),
        lambda: m.detokenize([1]),
        lambda: ember.Session(m),
    ):
        with pytest.raises(ember.EmberError):
            call()


def test_sessions_keep_the_model_alive(ctx, tiny_path):
    m = ember.Model(ctx, tiny_path)
    s = ember.Session(m, n_ctx=64)
    expect = s.generate(PROMPT, max_tokens=4, temperature=0).text
    m.close()
    assert m.closed
    with pytest.raises(ember.EmberError):
        m.tokenize("x")
    # The session (and its stream, which tokenizes through the model) still work.
    assert s.generate(PROMPT, max_tokens=4, temperature=0).text == expect
    assert s.stream(PROMPT, max_tokens=4, temperature=0).text == expect
    s.close()
    assert m._ptr is None  # freed with the last session

    # Without explicit closes: dropping the model object keeps it alive for the session.
    s = ember.Session(ember.Model(ctx, tiny_path), n_ctx=64)
    gc.collect()
    assert s.generate(PROMPT, max_tokens=4, temperature=0).text == expect
    ref = weakref.ref(s.model)
    del s
    gc.collect()
    assert ref() is None


def test_context_managers_free_everything(tiny_path):
    with ember.Context() as c:
        with ember.Model(c, tiny_path) as m:
            with ember.Session(m, n_ctx=64) as s:
                assert s.generate(PROMPT, max_tokens=2).n_tokens == 2
            assert s.closed and not m.closed
        assert m.closed and m._ptr is None
    assert c.closed


def test_garbage_collection_without_close(tiny_path):
    c = ember.Context()
    m = ember.Model(c, tiny_path)
    s = ember.Session(m, n_ctx=64)
    st = s.stream(PROMPT, max_tokens=5)
    next(st)
    del c, m, s, st
    gc.collect()


def test_sessions_on_threads(tiny):
    expect = None
    results = {}

    def work(i):
        with ember.Session(tiny, n_ctx=64) as s:
            results[i] = s.generate(PROMPT, max_tokens=8, temperature=0).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expect = results[0]
    assert len(results) == 4 and all(r == expect for r in results.values())


# -- adapters -----------------------------------------------------------------------------


def test_lora_adapter(tiny, tiny_session, repo, tmp_path):
    d = repo / "tests" / "fixtures" / "lora" / "qv_random"
    if not d.is_dir():
        pytest.skip("LoRA fixture not available")
    with ember.Adapter(tiny, d) as ad:
        info = ad.info
        assert info["rank"] == 8 and sorted(info["targets"]) == ["q_proj", "v_proj"]
        aid = tiny_session.attach_adapter(ad, "qv")
    base = tiny_session.generate(PROMPT, max_tokens=8, temperature=0)
    tuned = tiny_session.generate(PROMPT, max_tokens=8, temperature=0, adapter=aid)
    assert base.tokens != tuned.tokens
    s = tiny_session.stream(PROMPT, max_tokens=8, temperature=0, adapter=aid)
    assert s.text == tuned.text and s.result.tokens == tuned.tokens
    tiny_session.set_adapter_scale(aid, 0.0)
    off = tiny_session.generate(PROMPT, max_tokens=8, temperature=0, adapter=aid)
    assert off.tokens == base.tokens
    tiny_session.detach_adapter(aid)
    with pytest.raises(ember.EmberError):
        tiny_session.generate(PROMPT, max_tokens=8, adapter=aid)
