//! Rust-side checks of the ABI (the C, C++ and Python tests exercise it from those
//! languages).

use super::*;

#[test]
fn version_matches_the_crate() {
    let v = unsafe { CStr::from_ptr(ember_version()) };
    assert_eq!(v.to_str().unwrap(), ember::VERSION);
    assert_eq!(ember_abi_version(), EMBER_ABI_VERSION);
}

#[test]
fn panics_become_internal_errors() {
    assert_eq!(ember_debug_internal_panic(), EMBER_INTERNAL);
    let msg = unsafe { CStr::from_ptr(ember_last_error()) }
        .to_str()
        .unwrap();
    assert!(msg.contains("deliberate panic"), "{msg}");
    assert_eq!(
        unsafe { CStr::from_ptr(ember_status_str(8)) }
            .to_str()
            .unwrap(),
        "EMBER_INTERNAL"
    );
    assert_eq!(
        unsafe { CStr::from_ptr(ember_status_str(1234)) }
            .to_str()
            .unwrap(),
        "EMBER_UNKNOWN_STATUS"
    );
}

#[test]
fn null_and_dead_handles_are_rejected() {
    unsafe {
        let mut m: *mut ember_model = std::ptr::null_mut();
        let st = ember_model_load(std::ptr::null(), c"x".as_ptr(), std::ptr::null(), &mut m);
        assert_eq!(st, EMBER_INVALID_ARGUMENT);
        assert!(m.is_null());
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(std::ptr::null(), &mut ctx), EMBER_OK);
        let mut json: *mut c_char = std::ptr::null_mut();
        assert_eq!(ember_context_info_json(ctx, &mut json), EMBER_OK);
        assert!(CStr::from_ptr(json).to_str().unwrap().contains("adapter"));
        ember_string_free(json);
        ember_context_free(ctx);
        // Used after free: detected.
        assert_eq!(
            ember_context_info_json(ctx, &mut json),
            EMBER_INVALID_ARGUMENT
        );
        let msg = CStr::from_ptr(ember_last_error()).to_str().unwrap();
        assert!(msg.contains("not a live handle"), "{msg}");
        // Freeing twice or NULL: no crash.
        ember_context_free(ctx);
        ember_context_free(std::ptr::null_mut());
        ember_string_free(std::ptr::null_mut());
    }
}

#[test]
fn string_outputs_are_null_after_a_failure() {
    // A caller may free the output whatever the status: a failure must leave NULL there,
    // not the caller's stale or uninitialized pointer.
    let stale = || std::ptr::NonNull::<c_char>::dangling().as_ptr();
    unsafe {
        let mut s = stale();
        assert_eq!(
            ember_context_info_json(std::ptr::null(), &mut s),
            EMBER_INVALID_ARGUMENT
        );
        assert!(s.is_null());
        s = stale();
        assert_eq!(
            ember_model_info_json(std::ptr::null(), &mut s),
            EMBER_INVALID_ARGUMENT
        );
        assert!(s.is_null());
        s = stale();
        let msg = ember_chat_message {
            role: c"user".as_ptr(),
            content: c"hi".as_ptr(),
        };
        assert_eq!(
            ember_chat_template_apply(std::ptr::null(), &msg, 1, true, &mut s),
            EMBER_INVALID_ARGUMENT
        );
        assert!(s.is_null());
    }
}

#[test]
fn struct_size_is_checked() {
    unsafe {
        let mut p = ember_context_default_params();
        p.struct_size = 2;
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(&p, &mut ctx), EMBER_INVALID_ARGUMENT);
        let msg = CStr::from_ptr(ember_last_error()).to_str().unwrap();
        assert!(msg.contains("struct_size"), "{msg}");
        assert!(ctx.is_null());
    }
}

#[test]
fn header_is_up_to_date() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    let committed = std::fs::read_to_string(dir.join("include/ember.h")).unwrap_or_default();
    if String::from_utf8_lossy(&out) != committed {
        if std::env::var_os("EMBER_BLESS_HEADER").is_some() {
            std::fs::write(dir.join("include/ember.h"), &out).unwrap();
        } else {
            panic!("capi/include/ember.h is stale: run `EMBER_BLESS_HEADER=1 cargo test -p ember-capi header` and commit it");
        }
    }
}

/// A random LoRA adapter on q and v with nonzero B, saved for `model`.
fn save_random_adapter(model: &ember::model::Model, dir: &std::path::Path, seed: u64) {
    use ember::adapters::{LoraAdapter, LoraConfig, Target};
    let mut a = LoraAdapter::init(
        &model.config,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            targets: vec![Target::Q, Target::V],
            experts: None,
        },
        seed,
    )
    .unwrap();
    let mut rng = ember::util::Rng::new(seed + 1);
    for p in a.weights.values_mut() {
        p.b = rng.vec(p.b.len(), -0.2, 0.2);
    }
    a.save(dir, model).unwrap();
}

#[test]
fn adapters_load_attach_choose_per_sequence_and_refuse_another_base() {
    use ember_tests::tiny::{write_tiny_model, TinyVariant};
    let root = ember_tests::model::temp_dir("capi-adapters");
    let (base, other, ad_dir) = (root.join("base"), root.join("other"), root.join("ad"));
    write_tiny_model(&base, TinyVariant::Llama).unwrap();
    write_tiny_model(&other, TinyVariant::LlamaTied).unwrap();
    let c = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    unsafe {
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(std::ptr::null(), &mut ctx), EMBER_OK);
        let mut model: *mut ember_model = std::ptr::null_mut();
        let st = ember_model_load(ctx, c(&base).as_ptr(), std::ptr::null(), &mut model);
        assert_eq!(st, EMBER_OK);
        save_random_adapter(&(*model).model, &ad_dir, 7);

        let mut ad: *mut ember_adapter = std::ptr::null_mut();
        assert_eq!(
            ember_adapter_load(model, c(&ad_dir).as_ptr(), &mut ad),
            EMBER_OK
        );
        let mut json: *mut c_char = std::ptr::null_mut();
        assert_eq!(ember_adapter_info_json(ad, &mut json), EMBER_OK);
        let info: serde_json::Value =
            serde_json::from_str(CStr::from_ptr(json).to_str().unwrap()).unwrap();
        ember_string_free(json);
        assert_eq!(info["rank"], 4);
        assert_eq!(info["targets"], serde_json::json!(["q_proj", "v_proj"]));

        // Two sequences in one session: one with the adapter, one without.
        let mut sp = ember_session_default_params();
        sp.n_ctx = 64;
        sp.n_seq = 2;
        let mut s: *mut ember_session = std::ptr::null_mut();
        assert_eq!(ember_session_create(model, &sp, &mut s), EMBER_OK);
        let mut id = -1;
        assert_eq!(
            ember_session_attach_adapter(s, ad, c"qv".as_ptr(), &mut id),
            EMBER_OK
        );
        assert!(id >= 0);
        ember_adapter_free(ad); // the session keeps its copy
        let greedy = {
            let mut p = ember_sampler_default_params();
            p.temperature = 0.0;
            p
        };
        let (mut with, mut without) = (0u64, 0u64);
        assert_eq!(ember_seq_add(s, &greedy, &mut with), EMBER_OK);
        assert_eq!(ember_seq_add(s, &greedy, &mut without), EMBER_OK);
        assert_eq!(ember_seq_set_adapter(s, with, id, 1.0), EMBER_OK);
        let prompt = [5u32, 17, 200, 3, 99, 42, 7];
        let mut next = [0u32; 2];
        assert_eq!(
            ember_seq_prefill(s, with, prompt.as_ptr(), prompt.len(), &mut next[0]),
            EMBER_OK
        );
        assert_eq!(
            ember_seq_prefill(s, without, prompt.as_ptr(), prompt.len(), &mut next[1]),
            EMBER_OK
        );
        let seqs = [with, without];
        let mut decoded = [0u32; 2];
        assert_eq!(
            ember_seq_decode(s, seqs.as_ptr(), 2, decoded.as_mut_ptr()),
            EMBER_OK
        );

        // The same through the Rust API, one sequence at a time.
        let m = (*model).model.clone();
        let expect = |with_adapter: bool| {
            let mut rs = ember::session::Session::new(
                m.clone(),
                ember::session::SessionParams {
                    n_ctx: 64,
                    n_seq: 1,
                    n_batch: 16,
                    kv_budget: 0,
                },
            )
            .unwrap();
            let seq = rs
                .add_sequence(ember::session::SamplerConfig::greedy())
                .unwrap();
            if with_adapter {
                let a = ember::adapters::LoraAdapter::load(&ad_dir, &m).unwrap();
                let aid = rs.attach_adapter("x", std::sync::Arc::new(a)).unwrap();
                rs.set_sequence_adapter(seq, Some(aid), 1.0).unwrap();
            }
            let first = rs.prefill(seq, &prompt).unwrap();
            (first, rs.decode(&[seq]).unwrap()[0])
        };
        assert_eq!((next[0], decoded[0]), expect(true));
        assert_eq!((next[1], decoded[1]), expect(false));

        // Bad ids and a detached adapter are refused with a message.
        assert_eq!(
            ember_seq_set_adapter(s, with, 42, 1.0),
            EMBER_INVALID_ARGUMENT
        );
        assert_eq!(ember_session_set_adapter_scale(s, id, 0.5), EMBER_OK);
        assert_eq!(ember_session_detach_adapter(s, id), EMBER_OK);
        assert_eq!(ember_session_detach_adapter(s, id), EMBER_INVALID_ARGUMENT);
        assert_eq!(ember_session_detach_adapter(s, -7), EMBER_INVALID_ARGUMENT);

        // Another base model refuses the adapter, naming the reason.
        let mut m2: *mut ember_model = std::ptr::null_mut();
        assert_eq!(
            ember_model_load(ctx, c(&other).as_ptr(), std::ptr::null(), &mut m2),
            EMBER_OK
        );
        let mut bad: *mut ember_adapter = std::ptr::null_mut();
        let st = ember_adapter_load(m2, c(&ad_dir).as_ptr(), &mut bad);
        assert_ne!(st, EMBER_OK);
        assert!(bad.is_null());
        let msg = CStr::from_ptr(ember_last_error()).to_str().unwrap();
        assert!(msg.contains("base model"), "{msg}");

        ember_session_free(s);
        ember_model_free(m2);
        ember_model_free(model);
        ember_context_free(ctx);
    }
    let _ = std::fs::remove_dir_all(root);
}

unsafe extern "C" fn stop_after_two(
    step: u32,
    _total: u32,
    r: *const ember_step_result,
    user: *mut std::ffi::c_void,
) -> bool {
    let seen = unsafe { &mut *(user as *mut Vec<(u32, f64)>) };
    seen.push((step, unsafe { (*r).loss }));
    step < 2
}

#[test]
fn trainer_learns_saves_snapshots_and_reports_errors() {
    use ember_tests::tiny::{write_tiny_model, TinyVariant};
    let root = ember_tests::model::temp_dir("capi-trainer");
    write_tiny_model(&root.join("base"), TinyVariant::Llama).unwrap();
    let c = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    unsafe {
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(std::ptr::null(), &mut ctx), EMBER_OK);
        let mut model: *mut ember_model = std::ptr::null_mut();
        let st = ember_model_load(
            ctx,
            c(&root.join("base")).as_ptr(),
            std::ptr::null(),
            &mut model,
        );
        assert_eq!(st, EMBER_OK);

        // Bad settings are refused with a message.
        let mut tr: *mut ember_trainer = std::ptr::null_mut();
        let refused = |p: &ember_train_params, why: &str| {
            let mut tr: *mut ember_trainer = std::ptr::null_mut();
            assert_eq!(
                ember_trainer_create(model, p, &mut tr),
                EMBER_INVALID_ARGUMENT
            );
            assert!(tr.is_null());
            let msg = CStr::from_ptr(ember_last_error()).to_str().unwrap();
            assert!(msg.contains(why), "{msg}");
        };
        let mut p = ember_train_default_params();
        p.seq_len = 33;
        refused(&p, "multiple of 32");
        p = ember_train_default_params();
        p.lora_rank = 0;
        refused(&p, "nothing to train");
        p = ember_train_default_params();
        p.distill_weight = -1.0;
        refused(&p, "distill_weight");
        // A schedule outside the enum is refused (read as an integer: the bytes never
        // become an `ember_lr_schedule`, hence the MaybeUninit holding them).
        let mut raw = std::mem::MaybeUninit::new(ember_train_default_params());
        let off = std::mem::offset_of!(ember_train_params, schedule);
        std::ptr::write_unaligned((raw.as_mut_ptr() as *mut u8).add(off) as *mut u32, 7);
        assert_eq!(
            ember_trainer_create(model, raw.as_ptr(), &mut tr),
            EMBER_INVALID_ARGUMENT
        );
        assert!(tr.is_null());
        assert!(CStr::from_ptr(ember_last_error())
            .to_str()
            .unwrap()
            .contains("schedule is 7"));

        p = ember_train_default_params();
        p.lora_rank = 4;
        p.lora_targets = EMBER_TARGET_Q | EMBER_TARGET_V;
        p.seq_len = 32;
        p.lr = 1e-2;
        p.schedule = ember_lr_schedule::EMBER_LR_CONSTANT;
        assert_eq!(ember_trainer_create(model, &p, &mut tr), EMBER_OK);

        // The same two sequences, over and over: the loss falls.
        let tokens: Vec<u32> = (0..20).map(|i| (i * 37 % 250 + 3) as u32).collect();
        let lengths = [12usize, 8];
        let mut mask = [1u8; 20];
        mask[..3].fill(0);
        let mut losses = Vec::new();
        for _ in 0..8 {
            let mut r = ember_step_result {
                struct_size: std::mem::size_of::<ember_step_result>() as u32,
                ..Default::default()
            };
            let st = ember_trainer_step_tokens(
                tr,
                tokens.as_ptr(),
                mask.as_ptr(),
                lengths.as_ptr(),
                2,
                &mut r,
            );
            assert_eq!(st, EMBER_OK);
            assert!(!r.skipped && r.tokens == 16, "{r:?}");
            losses.push(r.loss);
        }
        assert!(losses[7] < 0.8 * losses[0], "{losses:?}");

        // A mixture of LoRA experts: bad routing refused; trained, it reports its
        // auxiliary loss per step and its expert load.
        let mut pm = p;
        pm.lora_experts = 4;
        pm.lora_top_k = 5;
        refused(&pm, "top-5");
        pm.lora_top_k = 2;
        pm.balance_loss = -1.0;
        refused(&pm, "balance_loss");
        pm.balance_loss = 0.05;
        let mut mix: *mut ember_trainer = std::ptr::null_mut();
        assert_eq!(ember_trainer_create(model, &pm, &mut mix), EMBER_OK);
        let mut r = ember_step_result {
            struct_size: std::mem::size_of::<ember_step_result>() as u32,
            ..Default::default()
        };
        let st = ember_trainer_step_tokens(
            mix,
            tokens.as_ptr(),
            mask.as_ptr(),
            lengths.as_ptr(),
            2,
            &mut r,
        );
        assert_eq!(st, EMBER_OK);
        assert!(!r.skipped && r.aux_loss > 0.0, "{r:?}");
        let mut js: *mut c_char = std::ptr::null_mut();
        assert_eq!(ember_trainer_info_json(mix, &mut js), EMBER_OK);
        let info: serde_json::Value =
            serde_json::from_str(CStr::from_ptr(js).to_str().unwrap()).unwrap();
        ember_string_free(js);
        let load = info["expert_load"].as_array().unwrap();
        assert_eq!(load.len(), 2 * 2, "q and v of 2 layers: {info}");
        let chosen: u64 = load[0]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(chosen, 20 * 2, "every token row chose 2 experts");
        ember_trainer_free(mix);
        let bad = [999u32; 4];
        let one = [4usize];
        let st = ember_trainer_step_tokens(
            tr,
            bad.as_ptr(),
            std::ptr::null(),
            one.as_ptr(),
            1,
            std::ptr::null_mut(),
        );
        assert_eq!(st, EMBER_INVALID_ARGUMENT);
        assert!(CStr::from_ptr(ember_last_error())
            .to_str()
            .unwrap()
            .contains("vocabulary"));

        // A snapshot serves in a session; a save loads back as the same adapter.
        let mut snap: *mut ember_adapter = std::ptr::null_mut();
        assert_eq!(ember_trainer_get_adapter(tr, &mut snap), EMBER_OK);
        let mut s: *mut ember_session = std::ptr::null_mut();
        assert_eq!(
            ember_session_create(model, std::ptr::null(), &mut s),
            EMBER_OK
        );
        let mut id = -1;
        assert_eq!(
            ember_session_attach_adapter(s, snap, std::ptr::null(), &mut id),
            EMBER_OK
        );
        let dir = root.join("saved");
        assert_eq!(ember_trainer_save(tr, c(&dir).as_ptr()), EMBER_OK);
        let mut loaded: *mut ember_adapter = std::ptr::null_mut();
        assert_eq!(
            ember_adapter_load(model, c(&dir).as_ptr(), &mut loaded),
            EMBER_OK
        );
        let (l, r) = (&*loaded, &*snap);
        assert_eq!(
            l.as_lora("t").unwrap().weights,
            r.as_lora("t").unwrap().weights
        );

        // Whole-file training with a callback that stops after two steps.
        let data = root.join("data.jsonl");
        let lines: String = (0..6)
            .map(|i| format!("{{\"text\":\"sample {i} of some training text\"}}\n"))
            .collect();
        std::fs::write(&data, lines).unwrap();
        let mut seen: Vec<(u32, f64)> = Vec::new();
        let mut last = 0.0f64;
        let st = ember_trainer_train_file(
            tr,
            c(&data).as_ptr(),
            5,
            2,
            Some(stop_after_two),
            &mut seen as *mut _ as *mut std::ffi::c_void,
            &mut last,
        );
        assert_eq!(st, EMBER_ABORTED);
        assert_eq!(seen.len(), 2);
        assert_eq!(last, seen[1].1);
        let mut json: *mut c_char = std::ptr::null_mut();
        assert_eq!(ember_trainer_info_json(tr, &mut json), EMBER_OK);
        let info: serde_json::Value =
            serde_json::from_str(CStr::from_ptr(json).to_str().unwrap()).unwrap();
        ember_string_free(json);
        assert_eq!(info["steps"], 10);
        let mut loss = 0.0;
        let rec = c"{\"text\":\"sample 1 of some training text\"}";
        assert_eq!(
            ember_trainer_evaluate(tr, rec.as_ptr(), &mut loss),
            EMBER_OK
        );
        assert!(loss.is_finite() && loss > 0.0);
        // The same record distilled: the KL divergence from the base to the trained model.
        let drec = c"{\"text\":\"sample 1 of some training text\",\"distill\":true}";
        let mut kl = 0.0;
        assert_eq!(ember_trainer_evaluate(tr, drec.as_ptr(), &mut kl), EMBER_OK);
        assert!(kl.is_finite() && kl > 0.0 && kl != loss, "{kl} {loss}");

        ember_adapter_free(loaded);
        ember_adapter_free(snap);
        ember_session_free(s);
        ember_trainer_free(tr);
        ember_model_free(model);
        ember_context_free(ctx);
    }
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn merge_and_prompt_adapters_through_the_abi() {
    use ember_tests::tiny::{write_tiny_model, TinyVariant};
    let root = ember_tests::model::temp_dir("capi-merge");
    let (base, ad_dir) = (root.join("base"), root.join("ad"));
    write_tiny_model(&base, TinyVariant::Llama).unwrap();
    let prefix_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lora/prefix_tuning/final");
    let c = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    let prompt = [5u32, 17, 200, 3, 99, 42, 7];
    let params = ember::session::SessionParams {
        n_ctx: 64,
        n_seq: 1,
        n_batch: 16,
        kv_budget: 0,
    };
    unsafe {
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(std::ptr::null(), &mut ctx), EMBER_OK);
        let mut model: *mut ember_model = std::ptr::null_mut();
        let st = ember_model_load(ctx, c(&base).as_ptr(), std::ptr::null(), &mut model);
        assert_eq!(st, EMBER_OK);
        save_random_adapter(&(*model).model, &ad_dir, 7);
        let mut ad: *mut ember_adapter = std::ptr::null_mut();
        assert_eq!(
            ember_adapter_load(model, c(&ad_dir).as_ptr(), &mut ad),
            EMBER_OK
        );

        // Merged = the adapter on the fly; the base is unchanged.
        let mut merged: *mut ember_model = std::ptr::null_mut();
        let list = [ad as *const ember_adapter];
        assert_eq!(
            ember_model_merge_adapters(model, list.as_ptr(), std::ptr::null(), 1, &mut merged),
            EMBER_OK
        );
        let m = (*model).model.clone();
        let mut on_the_fly = ember::session::Session::new(m.clone(), params).unwrap();
        let aid = on_the_fly
            .attach_adapter("a", (*ad).as_lora("t").unwrap().clone())
            .unwrap();
        let want = on_the_fly.logits_with(&prompt, Some((aid, 1.0))).unwrap();
        let got = ember::session::Session::new((*merged).model.clone(), params)
            .unwrap()
            .logits(&prompt)
            .unwrap();
        assert!(ember::util::max_abs_diff(&got, &want) < 2e-5);
        let base_logits = on_the_fly.logits(&prompt).unwrap();
        assert!(ember::util::max_abs_diff(&base_logits, &want) > 1e-3);
        ember_model_free(merged);
        assert_eq!(
            ember_model_merge_adapters(model, list.as_ptr(), std::ptr::null(), 0, &mut merged),
            EMBER_INVALID_ARGUMENT
        );

        // A prefix (made by peft) loads, describes itself, attaches and serves a sequence.
        let mut pre: *mut ember_adapter = std::ptr::null_mut();
        assert_eq!(
            ember_adapter_load(model, c(&prefix_dir).as_ptr(), &mut pre),
            EMBER_OK
        );
        let mut json: *mut c_char = std::ptr::null_mut();
        assert_eq!(ember_adapter_info_json(pre, &mut json), EMBER_OK);
        let info: serde_json::Value =
            serde_json::from_str(CStr::from_ptr(json).to_str().unwrap()).unwrap();
        ember_string_free(json);
        assert_eq!(info["kind"], "prefix_tuning");
        let mut s: *mut ember_session = std::ptr::null_mut();
        assert_eq!(
            ember_session_create(model, std::ptr::null(), &mut s),
            EMBER_OK
        );
        let mut id = -1;
        assert_eq!(
            ember_session_attach_adapter(s, pre, std::ptr::null(), &mut id),
            EMBER_OK
        );
        let greedy = {
            let mut p = ember_sampler_default_params();
            p.temperature = 0.0;
            p
        };
        let mut seq = 0u64;
        assert_eq!(ember_seq_add(s, &greedy, &mut seq), EMBER_OK);
        assert_eq!(ember_seq_set_adapter(s, seq, id, 1.0), EMBER_OK);
        let mut next = 0u32;
        assert_eq!(
            ember_seq_prefill(s, seq, prompt.as_ptr(), prompt.len(), &mut next),
            EMBER_OK
        );
        let ember::adapters::Loaded::Prompt(p) = ember::adapters::load_dir(&prefix_dir, &m)
            .unwrap()
            .remove(0)
        else {
            panic!("a prefix")
        };
        let mut rs = ember::session::Session::new(m.clone(), params).unwrap();
        let l = rs.logits_with(&prompt, p).unwrap();
        let last = &l[(prompt.len() - 1) * m.config.vocab..];
        let argmax = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b]));
        assert_eq!(Some(next as usize), argmax);
        // A sequence that holds tokens cannot take a prefix; LoRA-only calls refuse one.
        assert_eq!(
            ember_seq_set_adapter(s, seq, id, 1.0),
            EMBER_INVALID_ARGUMENT
        );
        let both = [ad as *const ember_adapter, pre as *const ember_adapter];
        let mut out: *mut ember_adapter = std::ptr::null_mut();
        assert_eq!(
            ember_adapter_combine(both.as_ptr(), std::ptr::null(), 2, &mut out),
            EMBER_UNSUPPORTED
        );
        assert!(out.is_null());

        ember_session_free(s);
        ember_adapter_free(pre);
        ember_adapter_free(ad);
        ember_model_free(model);
        ember_context_free(ctx);
    }
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn moe_model_info_and_expert_counts() {
    use ember_tests::tiny::{write_tiny_model, TinyVariant};
    let root = ember_tests::model::temp_dir("capi-moe");
    let (moe, dense) = (root.join("moe"), root.join("dense"));
    write_tiny_model(&moe, TinyVariant::Qwen2Moe).unwrap();
    write_tiny_model(&dense, TinyVariant::Llama).unwrap();
    let c = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    unsafe {
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(std::ptr::null(), &mut ctx), EMBER_OK);
        let mut model: *mut ember_model = std::ptr::null_mut();
        let st = ember_model_load(ctx, c(&moe).as_ptr(), std::ptr::null(), &mut model);
        assert_eq!(st, EMBER_OK);
        let mut info = ember_model_info {
            struct_size: std::mem::size_of::<ember_model_info>() as u32,
            ..Default::default()
        };
        assert_eq!(ember_model_get_info(model, &mut info), EMBER_OK);
        assert_eq!((info.n_experts, info.n_experts_used), (4, 2));
        assert!(info.n_active_params < info.n_params);
        assert_eq!(info.n_active_params, (*model).model.n_active_params());

        let mut sp = ember_session_default_params();
        sp.n_ctx = 64;
        let mut s: *mut ember_session = std::ptr::null_mut();
        assert_eq!(ember_session_create(model, &sp, &mut s), EMBER_OK);
        let greedy = {
            let mut p = ember_sampler_default_params();
            p.temperature = 0.0;
            p
        };
        let mut seq = 0u64;
        assert_eq!(ember_seq_add(s, &greedy, &mut seq), EMBER_OK);
        let prompt = [5u32, 17, 200, 3, 99];
        let mut next = 0u32;
        assert_eq!(
            ember_seq_prefill(s, seq, prompt.as_ptr(), prompt.len(), &mut next),
            EMBER_OK
        );
        // Too small a buffer: the size needed, nothing written.
        let mut n = 0usize;
        let mut counts = [u64::MAX; 8];
        assert_eq!(
            ember_session_expert_counts(s, counts.as_mut_ptr(), 3, &mut n),
            EMBER_BUFFER_TOO_SMALL
        );
        assert_eq!(n, 8);
        assert_eq!(counts, [u64::MAX; 8]);
        assert_eq!(
            ember_session_expert_counts(s, counts.as_mut_ptr(), 8, &mut n),
            EMBER_OK
        );
        // 2 layers x 4 experts; each layer routed 5 tokens to 2 experts each.
        for layer in counts.chunks(4) {
            assert_eq!(layer.iter().sum::<u64>(), 10, "{counts:?}");
        }
        assert_eq!(ember_session_reset_expert_counts(s), EMBER_OK);
        assert_eq!(
            ember_session_expert_counts(s, counts.as_mut_ptr(), 8, &mut n),
            EMBER_OK
        );
        assert_eq!(counts, [0; 8]);
        assert_eq!(
            ember_session_expert_counts(s, std::ptr::null_mut(), 0, std::ptr::null_mut()),
            EMBER_INVALID_ARGUMENT
        );
        ember_session_free(s);
        ember_model_free(model);

        // A dense model has no counts, which is not an error.
        let st = ember_model_load(ctx, c(&dense).as_ptr(), std::ptr::null(), &mut model);
        assert_eq!(st, EMBER_OK);
        assert_eq!(ember_model_get_info(model, &mut info), EMBER_OK);
        assert_eq!((info.n_experts, info.n_experts_used), (0, 0));
        assert_eq!(info.n_active_params, info.n_params);
        assert_eq!(ember_session_create(model, &sp, &mut s), EMBER_OK);
        assert_eq!(
            ember_session_expert_counts(s, std::ptr::null_mut(), 0, &mut n),
            EMBER_OK
        );
        assert_eq!(n, 0);
        ember_session_free(s);
        ember_model_free(model);
        ember_context_free(ctx);
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn learner_updates_gates_rolls_back_and_serves() {
    use ember_tests::tiny::{write_tiny_model, TinyVariant};
    let root = ember_tests::model::temp_dir("capi-learner");
    write_tiny_model(&root.join("base"), TinyVariant::Llama).unwrap();
    let c = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    let s = |t: &str| CString::new(t).unwrap();
    let take = |p: *mut c_char| -> serde_json::Value {
        let v = serde_json::from_str(unsafe { CStr::from_ptr(p) }.to_str().unwrap()).unwrap();
        unsafe { ember_string_free(p) };
        v
    };
    let records: String = (0..6)
        .map(|i| format!("{{\"text\":\"sample {i}: abcabcabcabcabc\"}}\n"))
        .collect();
    unsafe {
        let mut ctx: *mut ember_context = std::ptr::null_mut();
        assert_eq!(ember_context_create(std::ptr::null(), &mut ctx), EMBER_OK);
        let mut model: *mut ember_model = std::ptr::null_mut();
        let st = ember_model_load(
            ctx,
            c(&root.join("base")).as_ptr(),
            std::ptr::null(),
            &mut model,
        );
        assert_eq!(st, EMBER_OK);
        let mut p = ember_learner_default_params();
        p.lora_rank = 4;
        p.lora_targets = EMBER_TARGET_Q | EMBER_TARGET_V;
        p.seq_len = 33;
        let mut l: *mut ember_learner = std::ptr::null_mut();
        let store = c(&root.join("store"));
        assert_eq!(
            ember_learner_open(model, store.as_ptr(), &p, &mut l),
            EMBER_INVALID_ARGUMENT
        );
        assert!(l.is_null());
        p.seq_len = 32;
        p.lr = 1e-2;
        p.steps_per_update = 6;
        p.update_every = 6;
        assert_eq!(
            ember_learner_open(model, store.as_ptr(), &p, &mut l),
            EMBER_OK
        );

        // The sixth record triggers an update, which is kept and becomes v0001.
        let mut report: *mut c_char = std::ptr::null_mut();
        let five: String = records.lines().take(5).map(|r| format!("{r}\n")).collect();
        assert_eq!(
            ember_learner_add(l, s(&five).as_ptr(), &mut report),
            EMBER_OK
        );
        assert!(report.is_null());
        let last = records.lines().last().unwrap();
        assert_eq!(
            ember_learner_add(l, s(last).as_ptr(), &mut report),
            EMBER_OK
        );
        let r = take(report);
        assert_eq!(
            (r["version"].as_u64(), r["kept"].as_bool()),
            (Some(1), Some(true)),
            "{r}"
        );

        // An impossible gain: the on-demand update is rejected and recorded.
        ember_learner_free(l);
        p.update_every = 0;
        p.min_new_gain = 10.0;
        assert_eq!(
            ember_learner_open(model, store.as_ptr(), &p, &mut l),
            EMBER_OK
        );
        assert_eq!(
            ember_learner_update(l, &mut report),
            EMBER_INVALID_ARGUMENT,
            "nothing pending"
        );
        assert_eq!(
            ember_learner_add(l, s(&records).as_ptr(), std::ptr::null_mut()),
            EMBER_OK
        );
        assert_eq!(
            ember_learner_set_probes(l, std::ptr::null(), s(&five).as_ptr()),
            EMBER_OK
        );
        assert_eq!(ember_learner_update(l, &mut report), EMBER_OK);
        let r = take(report);
        assert_eq!(
            (r["version"].as_u64(), r["kept"].as_bool()),
            (Some(2), Some(false)),
            "{r}"
        );
        let mut info: *mut c_char = std::ptr::null_mut();
        assert_eq!(ember_learner_info_json(l, &mut info), EMBER_OK);
        let i = take(info);
        assert_eq!(
            (
                i["head"].as_u64(),
                i["pending"].as_u64(),
                i["replay"].as_u64()
            ),
            (Some(1), Some(0), Some(6)),
            "{i}"
        );
        assert!(i["versions"][1]["note"]
            .as_str()
            .unwrap()
            .starts_with("rejected"));

        // Anchors join the replay buffer once: offered again, nothing is new.
        let mut added = 0u32;
        assert_eq!(
            ember_learner_retain(l, s(&five).as_ptr(), &mut added),
            EMBER_OK
        );
        assert_eq!(added, 5);
        assert_eq!(
            ember_learner_retain(l, s(&five).as_ptr(), &mut added),
            EMBER_OK
        );
        assert_eq!(added, 0);
        assert_eq!(ember_learner_info_json(l, &mut info), EMBER_OK);
        let i = take(info);
        assert_eq!(
            (i["anchors"].as_u64(), i["replay"].as_u64()),
            (Some(5), Some(6)),
            "{i}"
        );

        // Answer probes: a line without "expect" is refused, naming the line; good ones
        // are taken.
        let bad = s("{\"prompt\": \"abc\"}\n");
        assert_eq!(
            ember_learner_set_answer_probes(l, bad.as_ptr(), std::ptr::null()),
            EMBER_FORMAT
        );
        let msg = CStr::from_ptr(ember_last_error()).to_str().unwrap();
        assert!(msg.contains("line 1") && msg.contains("expect"), "{msg}");
        let good = s("{\"prompt\": \"abc\", \"expect\": \"d\"}\n\
                      {\"prompt\": \"q\", \"expect\": \"e\"}\n");
        assert_eq!(
            ember_learner_set_answer_probes(l, std::ptr::null(), good.as_ptr()),
            EMBER_OK
        );

        // The adapter serves in a session; rollback to a missing version is refused.
        let mut ad: *mut ember_adapter = std::ptr::null_mut();
        assert_eq!(ember_learner_get_adapter(l, &mut ad), EMBER_OK);
        let mut sess: *mut ember_session = std::ptr::null_mut();
        assert_eq!(
            ember_session_create(model, std::ptr::null(), &mut sess),
            EMBER_OK
        );
        let mut id = -1;
        assert_eq!(
            ember_session_attach_adapter(sess, ad, std::ptr::null(), &mut id),
            EMBER_OK
        );
        assert_eq!(ember_learner_rollback(l, 9), EMBER_INVALID_ARGUMENT);
        assert_eq!(ember_learner_rollback(l, 1), EMBER_OK);

        // Background mode: records and update requests return at once, poll reports the
        // kept update, and its adapter is swapped into the session.
        ember_learner_free(l);
        p.min_new_gain = 0.0;
        p.steps_per_update = 30;
        assert_eq!(
            ember_learner_open(model, store.as_ptr(), &p, &mut l),
            EMBER_OK
        );
        assert_eq!(ember_learner_request_update(l), EMBER_INVALID_ARGUMENT);
        assert_eq!(ember_learner_start_background(l), EMBER_OK);
        assert_eq!(ember_learner_start_background(l), EMBER_INVALID_ARGUMENT);
        assert_eq!(
            ember_learner_add(l, s(&records).as_ptr(), std::ptr::null_mut()),
            EMBER_OK
        );
        assert_eq!(ember_learner_request_update(l), EMBER_OK);
        assert_eq!(ember_learner_update(l, &mut report), EMBER_INVALID_ARGUMENT);
        let mut poll: *mut c_char = std::ptr::null_mut();
        assert_eq!(ember_learner_wait(l), EMBER_OK);
        assert_eq!(ember_learner_poll(l, &mut poll), EMBER_OK);
        let e = take(poll);
        assert_eq!(
            (e["busy"].as_bool(), e["published"].as_u64()),
            (Some(false), Some(1)),
            "{e}"
        );
        assert_eq!(e["events"][0]["version"].as_u64(), Some(3), "{e}");
        let mut live: *mut ember_adapter = std::ptr::null_mut();
        assert_eq!(ember_learner_get_adapter(l, &mut live), EMBER_OK);
        assert_eq!(ember_session_replace_adapter(sess, id, live), EMBER_OK);
        assert_eq!(ember_learner_info_json(l, &mut info), EMBER_OK);
        let i = take(info);
        assert_eq!(
            (i["head"].as_u64(), i["background"].as_bool()),
            (Some(3), Some(true)),
            "{i}"
        );
        assert_eq!(ember_learner_stop_background(l), EMBER_OK);
        assert_eq!(ember_learner_poll(l, &mut poll), EMBER_INVALID_ARGUMENT);
        ember_adapter_free(live);
        ember_session_free(sess);
        ember_adapter_free(ad);
        ember_learner_free(l);
        ember_model_free(model);
        ember_context_free(ctx);
    }
    let _ = std::fs::remove_dir_all(root);
}
