"""Training through the C ABI's trainer, on the tiny random Llama (a few short steps each:
the device may be a CPU rasterizer)."""

from __future__ import annotations

import ctypes
import json
import math
import subprocess
from pathlib import Path

import pytest

import ember
from ember import _ffi

#: One short record, learned over and over.
RECORD = {"text": "abcabcabcabcabcabc"}
#: A small LoRA, 32-token sequences, a constant high rate: the loss falls in a few steps.
FAST = dict(lora_rank=4, targets=["q", "v"], seq_len=32, lr=1e-2, schedule="constant")
#: Steps of the shared trained adapter (enough for the tiny model to learn RECORD).
STEPS = 20
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A trainer taught RECORD for STEPS steps (losses recorded), saved to a directory."""
    with tiny.trainer(**FAST) as t:
        losses = [t.step([RECORD]).loss for _ in range(STEPS)]
        d = tmp_path_factory.mktemp("adapter")
        t.save(d)
        yield t, losses, d


def test_defaults_are_the_librarys():
    c = _ffi.lib().ember_train_default_params()
    p = ember.TrainParams()
    assert c.struct_size == ctypes.sizeof(_ffi.TrainParamsStruct)
    assert (p.lora_rank, p.lora_alpha, p.rslora, c.lora_targets) == (
        c.lora_rank,
        c.lora_alpha,
        c.rslora,
        0,
    )
    assert (p.prompt_tokens, p.prefix_tokens, p.seq_len) == (
        c.prompt_tokens,
        c.prefix_tokens,
        c.seq_len,
    )
    assert p.lr == pytest.approx(c.lr) and p.eps == pytest.approx(c.eps)
    assert (p.weight_decay, p.max_grad_norm) == (c.weight_decay, c.max_grad_norm)
    assert p.betas == (pytest.approx(c.beta1), pytest.approx(c.beta2))
    assert ember.LrSchedule[p.schedule.upper()] == c.schedule
    assert (p.warmup, p.total_steps, p.seed) == (c.warmup_steps, c.total_steps, c.seed)
    # The struct Python builds from the defaults equals the library's, field by field.
    mine = p._to_c(None)
    for name, _ in _ffi.TrainParamsStruct._fields_:
        assert getattr(mine, name) == getattr(c, name), name


def test_targets_and_schedules_map_to_the_c_values():
    bits = lambda t: ember.TrainParams(targets=t)._to_c(None).lora_targets  # noqa: E731
    assert bits("all") == bits(None) == 0
    assert bits(["q", "v"]) == _ffi.TARGET_Q | _ffi.TARGET_V
    assert bits(["q_proj", "DOWN"]) == _ffi.TARGET_Q | _ffi.TARGET_DOWN
    assert bits("gate") == _ffi.TARGET_GATE
    sched = lambda s: ember.TrainParams(schedule=s)._to_c(None).schedule  # noqa: E731
    assert sched("constant") == 0 and sched("cosine") == 1 and sched("warmup-constant") == 2
    assert sched(ember.LrSchedule.WARMUP_CONSTANT) == 2


def test_loss_falls_and_the_trainer_reports(trained):
    t, losses, _ = trained
    assert all(math.isfinite(x) for x in losses)
    assert losses[5] < 0.8 * losses[0] and losses[-1] < losses[5], losses
    info = t.info
    assert info["steps"] == STEPS == t.steps
    assert info["trainable_params"] > 0 and info["virtual_tokens"] == 0
    assert "Trainer" in repr(t)
    # Evaluation scores without updating.
    loss = t.evaluate(RECORD)
    assert math.isfinite(loss) and loss < losses[0]
    assert t.evaluate([RECORD]) == loss and t.steps == STEPS


def test_step_result_fields(tiny):
    with ember.Trainer(tiny, ember.TrainParams(**FAST), seed=3) as t:
        r = t.step([RECORD, {"prompt": "ab", "completion": "cab"}])
        assert isinstance(r, ember.StepResult)
        assert r.step == 1 and not r.skipped
        # Every text token after the first is scored; the completion's 3 bytes (and EOS).
        eos = 1 if tiny.info.eos is not None else 0
        assert r.tokens == len(tiny.tokenize(RECORD["text"])) - 1 + 3 + eos
        assert r.lr == pytest.approx(1e-2) and r.grad_norm > 0 and r.seconds > 0
        assert t.params.seed == 3


def test_step_tokens_with_a_loss_mask(tiny):
    seqs = [[(i * 37) % 250 + 3 for i in range(12)], [(i * 11) % 250 + 3 for i in range(8)]]
    masks = [[False] * 3 + [True] * 9, [1] * 8]
    with tiny.trainer(**FAST) as t:
        first = t.step_tokens(seqs, masks)
        assert first.tokens == 9 + 7  # a sequence's first token is never predicted
        for _ in range(4):
            last = t.step_tokens(seqs, masks)
        assert last.loss < first.loss
        assert t.step_tokens(seqs).tokens == 11 + 7  # no mask: every token
        with pytest.raises(ember.EmberError) as e:
            t.step_tokens([[999, 1000, 3]])
        assert e.value.status == ember.Status.INVALID_ARGUMENT
        assert "vocabulary" in e.value.message
        with pytest.raises(ValueError):
            t.step_tokens(seqs, [[True] * 12])
        with pytest.raises(ValueError):
            t.step_tokens(seqs, [[True] * 11, [True] * 8])
        with pytest.raises(TypeError):
            t.step_tokens([1, 2, 3])


def test_saved_adapter_loads_attaches_and_changes_the_model(tiny, trained):
    t, losses, d = trained
    assert (d / "adapter_config.json").is_file()
    prompt = "abcab"
    with ember.Adapter(tiny, d) as ad, tiny.session(n_ctx=64) as s:
        info = ad.info
        assert info["rank"] == 4 and sorted(info["targets"]) == ["q_proj", "v_proj"]
        aid = s.attach_adapter(ad, "trained")
        with t.adapter() as snap:
            sid = s.attach_adapter(snap, "snapshot")
        base = s.generate(prompt, max_tokens=12, temperature=0)
        tuned = s.generate(prompt, max_tokens=12, temperature=0, adapter=aid)
        assert tuned.tokens == s.generate(prompt, max_tokens=12, temperature=0, adapter=sid).tokens
        assert tuned.tokens != base.tokens
        # It learned the record: the continuation follows the pattern.
        assert tuned.text.startswith("cabcab"), tuned.text
        # Sampling sees changed logits too (same seed, different distribution).
        sb = s.generate(prompt, max_tokens=16, temperature=1.0, top_k=0, seed=7)
        st = s.generate(prompt, max_tokens=16, temperature=1.0, top_k=0, seed=7, adapter=aid)
        assert sb.tokens != st.tokens
    # Continued training from the saved adapter starts where the first run ended.
    with tiny.trainer(ember.TrainParams(**FAST), init_adapter=d) as t2:
        assert t2.evaluate(RECORD) == pytest.approx(t.evaluate(RECORD), rel=1e-4)


def test_trained_adapter_through_every_adapter_call(tiny, trained, tmp_path):
    t, _, d = trained
    prompt = "abcab"
    greedy = dict(max_tokens=8, temperature=0)
    with ember.Adapter(tiny, d) as a, t.adapter() as snap, tiny.session(n_ctx=64) as s:
        base = s.generate(prompt, **greedy).tokens
        tuned = s.generate(prompt, adapter=s.attach_adapter(a), **greedy).tokens
        # Task arithmetic: A - A is the base model, (A + A) / 2 is A.
        with ember.Adapter.combine([a, snap], [1.0, -1.0]) as none, ember.Adapter.combine(
            [a, snap], [0.5, 0.5]
        ) as same:
            assert same.info["rank"] == 8
            nid = s.attach_adapter(none, "none")
            assert s.generate(prompt, adapter=nid, **greedy).tokens == base
            s.replace_adapter(nid, same)  # hot swap under the same id
            assert s.generate(prompt, adapter=nid, **greedy).tokens == tuned
            # Saved and loaded again.
            same.save(tiny, tmp_path / "combined")
            with ember.Adapter(tiny, tmp_path / "combined") as again:
                assert again.info["rank"] == 8
        with pytest.raises(ValueError):
            ember.Adapter.combine([a, snap], [1.0])
        # A sequence chooses its adapter.
        with s.add_sequence(temperature=0) as seq:
            seq.set_adapter(nid)
            assert seq.prefill(tiny.tokenize(prompt)) == tuned[0]


def test_train_file_callback_stops_with_aborted(tiny, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} of text"}) + "\n" for i in range(6)))
    with tiny.trainer(**FAST) as t:
        seen = []

        def stop_after_two(step, total, r):
            assert isinstance(r, ember.StepResult)
            seen.append((step, total, r.loss))
            return step < 2

        with pytest.raises(ember.EmberError) as e:
            t.train_file(data, steps=5, batch_size=2, callback=stop_after_two)
        assert e.value.status == ember.Status.ABORTED
        assert "after 2 steps" in e.value.message
        assert [(s, n) for s, n, _ in seen] == [(1, 5), (2, 5)]
        assert t.steps == 2  # the steps done are kept

        # Without a callback (or one returning None) it runs to the end; the last loss
        # comes back.
        loss = t.train_file(str(data), 2, 3, callback=lambda *a: None)
        assert math.isfinite(loss) and t.steps == 4

        # An exception in the callback stops training and comes out unchanged.
        class Boom(Exception):
            pass

        calls = []

        def boom(step, total, r):
            calls.append(step)
            raise Boom(step)

        with pytest.raises(Boom):
            t.train_file(data, 5, 2, callback=boom)
        assert calls == [1] and t.steps == 5
        # The trainer still works.
        assert math.isfinite(t.train_file(data, 1, 2))


def test_bad_arguments(tiny, tmp_path):
    def err(**kw):
        with pytest.raises(ember.EmberError) as e:
            ember.Trainer(tiny, **kw)
        assert e.value.status == ember.Status.INVALID_ARGUMENT
        return e.value.message

    assert "multiple of 32" in err(seq_len=33)
    assert "nothing to train" in err(lora_rank=0)
    assert "lr" in err(lr=-1.0, seq_len=32)
    with pytest.raises(ValueError):
        ember.Trainer(tiny, targets=["q", "nope"])
    with pytest.raises(ValueError):
        ember.Trainer(tiny, targets=[])
    with pytest.raises(ValueError):
        ember.Trainer(tiny, schedule="linear")
    with pytest.raises(ValueError):
        ember.Trainer(tiny, betas=(0.9,))
    with pytest.raises(TypeError):
        ember.Trainer(tiny, lora_rank="8")
    with pytest.raises(TypeError):
        ember.Trainer(tiny, no_such_option=1)
    with pytest.raises(TypeError):
        ember.Trainer("model.gguf")
    with pytest.raises(ember.EmberError) as e:
        ember.Trainer(tiny, init_adapter=tmp_path / "missing", seq_len=32)
    assert e.value.status == ember.Status.IO

    with tiny.trainer(**FAST) as t:
        with pytest.raises(ember.EmberError) as e:
            t.step([{"question": "no such field"}])
        assert e.value.status == ember.Status.INVALID_ARGUMENT
        assert "line 1" in e.value.message and "text" in e.value.message
        with pytest.raises(ember.EmberError) as e:
            t.step([])
        assert "no training records" in e.value.message
        with pytest.raises(TypeError):
            t.step("plain text")
        with pytest.raises(TypeError):
            t.step([{"text": object()}])
        with pytest.raises(ember.EmberError) as e:
            t.train_file(tmp_path / "missing.jsonl", 1, 1)
        assert e.value.status == ember.Status.IO
        with pytest.raises(ember.EmberError) as e:
            t.train_file(tmp_path / "missing.jsonl", 0, 1)
        assert e.value.status == ember.Status.INVALID_ARGUMENT
        with pytest.raises(TypeError):
            t.train_file(tmp_path / "x", 1, 1, callback=3)
        assert t.steps == 0
    # A closed trainer raises instead of crashing.
    assert t.closed
    t.close()
    with pytest.raises(ember.EmberError) as e:
        t.step(RECORD)
    assert e.value.status == ember.Status.INVALID_ARGUMENT


def test_soft_prompt_has_no_lora_snapshot(tiny, tmp_path):
    with tiny.trainer(lora_rank=0, prompt_tokens=4, seq_len=32) as t:
        assert t.info["virtual_tokens"] == 4
        with pytest.raises(ember.EmberError) as e:
            t.adapter()
        assert e.value.status == ember.Status.UNSUPPORTED
        t.save(tmp_path / "out")  # one part: saved in the directory itself
        assert (tmp_path / "out" / "adapter_config.json").is_file()
        # It loads as an adapter of its own kind, and serves: a sequence that chooses it
        # starts with its virtual tokens.
        with ember.Adapter(tiny, tmp_path / "out") as p, tiny.session(n_ctx=64) as s:
            assert p.info["kind"] == "prompt_tuning" and p.info["n_virtual"] == 4
            pid = s.attach_adapter(p)
            assert len(s.generate("abcab", adapter=pid, max_tokens=4, temperature=0).tokens)
            with pytest.raises(ember.EmberError) as e:
                ember.Adapter.combine([p])  # task arithmetic is for LoRA
            assert e.value.status == ember.Status.UNSUPPORTED


def test_merge_equals_the_adapter_on_the_fly_and_leaves_the_base(ctx, tiny, trained, tmp_path):
    _, _, d = trained
    prompt = "abcab"
    greedy = dict(max_tokens=8, temperature=0)
    with ember.Adapter(tiny, d) as q:
        with pytest.raises(ember.EmberError) as e:
            tiny.merge([q])  # a Q4_1 base would have to be requantized
        assert e.value.status == ember.Status.UNSUPPORTED
    # The tiny model in f32: the same weights the Q4_1 one was quantized from.
    path = tmp_path / "tiny-f32.gguf"
    r = subprocess.run(
        ["cargo", "run", "-q", "--release", "-p", "ember-tests", "--example", "write_tiny", "--",
         str(path), "llama", "gguf", "f32"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    with ember.Model(ctx, path) as f32, f32.trainer(**FAST) as t:
        for _ in range(STEPS):
            t.step([RECORD])
        t.save(tmp_path / "a")
    with ember.Model(ctx, path) as f32:
        _merge_checks(f32, ember.Adapter(f32, tmp_path / "a"), prompt, greedy)


def _merge_checks(tiny, a, prompt, greedy):
    with a, tiny.session(n_ctx=64) as s:
        base = s.generate(prompt, **greedy).tokens
        tuned = s.generate(prompt, adapter=s.attach_adapter(a), **greedy).tokens
        assert tuned != base
        with tiny.merge([a]) as merged, merged.session(n_ctx=64) as ms:
            assert ms.generate(prompt, **greedy).tokens == tuned
        # Merging a and subtracting it again gives the base.
        with tiny.merge([a, a], [1.0, -1.0]) as zero, zero.session(n_ctx=64) as zs:
            assert zs.generate(prompt, **greedy).tokens == base
        assert s.generate(prompt, **greedy).tokens == base  # the base never changed
        with pytest.raises(ValueError):
            tiny.merge([a], [1.0, 2.0])
        with pytest.raises(TypeError):
            tiny.merge([])


def test_mixture_of_lora_experts_trains_balances_and_serves(tiny, tmp_path):
    with tiny.trainer(lora_experts=4, lora_top_k=2, balance_loss=0.05, z_loss=0.001, **FAST) as t:
        steps = [t.step([RECORD]) for _ in range(8)]
        assert all(s.aux_loss > 0 and not s.skipped for s in steps)
        assert steps[-1].loss < steps[0].loss
        load = t.info["expert_load"]
        assert len(load) == 2 * 2  # q and v of both layers
        assert all(len(layer["counts"]) == 4 for layer in load)
        t.save(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["moe_experts"], cfg["moe_top_k"]) == ("EMBER_MOE_LORA", 4, 2)
    with ember.Adapter(tiny, tmp_path) as a, tiny.session(n_ctx=64) as s:
        assert (a.info["experts"], a.info["top_k"]) == (4, 2)
        s.attach_adapter(a)
    with pytest.raises(ember.EmberError, match="top-5"):
        tiny.trainer(lora_experts=4, lora_top_k=5, **FAST)


def test_learner_versions_gate_and_rollback(tiny, tmp_path):
    records = [{"text": f"sample {i}: abcabcabcabcabc"} for i in range(6)]
    store = tmp_path / "store"
    with ember.Learner(tiny, store, lora_rank=4, targets=["q", "v"], seq_len=32, lr=1e-2,
                       steps_per_update=6, update_every=6, warmup_steps=2) as lr:
        assert lr.add(records[:5]) is None
        report = lr.add(records[5:])
        assert report["kept"] and report["version"] == 1
        assert report["new_after"] < report["new_before"]
    with ember.Learner(tiny, store, lora_rank=4, targets=["q", "v"], seq_len=32,
                       min_new_gain=10.0) as lr:
        lr.add(records)
        lr.set_probes(retained=records[:2])
        report = lr.update()
        assert not report["kept"] and report["version"] == 2
        info = lr.info
        assert info["head"] == 1 and info["replay"] == 6
        assert info["versions"][1]["note"].startswith("rejected")
        assert lr.retain(records[:3]) == 3 and lr.retain(records[:3]) == 0
        assert lr.info["anchors"] == 3
        lr.set_answer_probes(retained=[{"prompt": "abc", "expect": "d"}])
        with pytest.raises(ember.EmberError, match="line 1"):
            lr.set_answer_probes(new_task=[{"prompt": "abc"}])
        with lr.adapter() as a, tiny.session(n_ctx=64) as s:
            s.attach_adapter(a)
        with pytest.raises(ember.EmberError, match="no version v0009"):
            lr.rollback(9)
        lr.rollback(1)
        lr.start_background()
        lr.add(records)
        lr.request_update()
        lr.wait()
        polled = lr.poll()
        assert polled["busy"] is False and len(polled["events"]) == 1
        lr.stop_background()
    with pytest.raises(TypeError, match="unknown learner parameter"):
        ember.Learner(tiny, store, rank=4)
    with pytest.raises(ember.EmberError, match="multiple of 32"):
        ember.Learner(tiny, tmp_path / "other", seq_len=33)
