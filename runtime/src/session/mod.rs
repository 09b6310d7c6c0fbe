//! Sessions: a key/value cache shared by up to `n_seq` sequences, chunked prefill, batched
//! decoding with one submission and a few bytes of readback per step, perplexity.
//!
//! A session is used by one thread at a time; many sessions can share one [`Model`].
//!
//! Context overflow policy: a sequence holds at most `n_ctx` tokens; feeding more is an
//! error (`InvalidArgument`, "context full") and leaves the sequence as it was.

mod generate;
mod sampler;

pub use generate::{GenerateOptions, Generation, StopReason, TokenCallback};
pub use sampler::{SamplerConfig, SamplerState, MAX_PENALTY_TOKENS};

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::adapters::lora::LoraExperts;
use crate::adapters::{LoraAdapter, PromptAdapter, Target};
use crate::error::{Error, Result};
use crate::gpu::{blocking, Context, DType, Dispatch, Tensor};
use crate::kernels::lora::{LoraPack, LoraPart};
use crate::kernels::rope::RopeTable;
use crate::kernels::sample::{nll, penalize, sample, RowParams};
use crate::model::forward::{Activations, AttnMode, KvCache, LogitRows, LoraState};
use crate::model::Model;

/// Sizes of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SessionParams {
    /// Tokens each sequence can hold (0: the model's training context, capped by
    /// `kv_budget`).
    pub n_ctx: usize,
    /// Sequences that can be active at once.
    pub n_seq: usize,
    /// Tokens per prefill chunk.
    pub n_batch: usize,
    /// Bytes the key/value cache may take (0: no limit beyond the device's).
    pub kv_budget: u64,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            n_ctx: 2048,
            n_seq: 1,
            n_batch: 256,
            kv_budget: 0,
        }
    }
}

/// Identifies a sequence within its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SeqId(pub u64);

struct Seq {
    id: SeqId,
    /// Adapter index and strength, if any.
    adapter: Option<(usize, f32)>,
    /// Index of its cache region.
    slot: usize,
    /// Virtual tokens of a prompt adapter at the start of its cache region (the real
    /// tokens start at this position).
    virt: usize,
    /// Tokens in the cache, in order.
    tokens: Vec<u32>,
    sampler: SamplerState,
    /// The last sampled token, fed at the next decode step.
    next: Option<u32>,
}

/// Per-row results of [`Session::perplexity`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Tokens in the text.
    pub tokens: usize,
    /// Tokens scored.
    pub scored: usize,
    /// Most likely token at each scored position, in order.
    pub top1: Vec<u32>,
    /// Sum of negative log-likelihoods.
    pub nll_sum: f64,
}

/// A key/value cache with its sequences, and the plans that run them.
pub struct Session {
    model: Arc<Model>,
    params: SessionParams,
    kv: KvCache,
    acts: Activations,
    rope: RopeTable,
    seqs: Vec<Option<Seq>>,
    next_id: u64,
    /// Decode plans by batch size.
    decode_plans: HashMap<usize, Vec<Dispatch>>,
    row_params: Tensor,
    penalty_ids: Tensor,
    sampled: Tensor,
    targets: Tensor,
    nll_out: Tensor,
    /// Dispatches in the last decode step (for benchmarks).
    pub last_dispatches: usize,
    /// Attached adapters by index (None: detached slot).
    adapters: Vec<Option<Attached>>,
    /// Packed adapters for the forward pass (None without adapters).
    lora: Option<LoraState>,
}

/// An adapter attached to a session.
struct Attached {
    name: String,
    kind: AttachedKind,
    scale: f32,
}

enum AttachedKind {
    Lora(Arc<LoraAdapter>),
    Prompt(PromptAdapter),
}

impl Attached {
    fn lora(&self) -> Option<&Arc<LoraAdapter>> {
        match &self.kind {
            AttachedKind::Lora(a) => Some(a),
            AttachedKind::Prompt(_) => None,
        }
    }
}

/// Identifies an adapter attached to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct AdapterId(pub usize);

/// The adapters one sequence runs with: an attached LoRA adapter with its strength, and a
/// prompt adapter (soft prompt or prefix) at the start of its cache. Either may be absent.
#[derive(Debug, Clone, Default)]
pub struct SeqAdapters {
    /// An attached LoRA adapter and its strength.
    pub lora: Option<(AdapterId, f32)>,
    /// A soft prompt or prefix.
    pub prompt: Option<PromptAdapter>,
}

impl From<Option<(AdapterId, f32)>> for SeqAdapters {
    fn from(lora: Option<(AdapterId, f32)>) -> Self {
        SeqAdapters { lora, prompt: None }
    }
}

impl From<PromptAdapter> for SeqAdapters {
    fn from(p: PromptAdapter) -> Self {
        SeqAdapters {
            lora: None,
            prompt: Some(p),
        }
    }
}

impl Session {
    /// Creates a session on `model`.
    pub fn new(model: Arc<Model>, mut params: SessionParams) -> Result<Session> {
        let ctx = model.context().clone();
        let cfg = &model.config;
        if params.n_seq == 0 || params.n_seq > 256 || params.n_batch == 0 || params.n_batch > 4096 {
            return Err(Error::InvalidArgument(format!(
                "session sizes n_seq={} (1..=256), n_batch={} (1..=4096)",
                params.n_seq, params.n_batch
            )));
        }
        let per_token = crate::model::forward::KvCache::bytes_for(cfg, 1);
        if params.n_ctx == 0 {
            params.n_ctx = cfg.train_ctx;
            if params.kv_budget > 0 {
                params.n_ctx = params
                    .n_ctx
                    .min((params.kv_budget / per_token / params.n_seq as u64) as usize);
            }
        }
        let slots = params
            .n_ctx
            .checked_mul(params.n_seq)
            .ok_or_else(|| Error::InvalidArgument("n_ctx * n_seq overflows".into()))?;
        if params.n_ctx < 2 {
            return Err(Error::InvalidArgument(format!(
                "context of {} tokens",
                params.n_ctx
            )));
        }
        if params.kv_budget > 0 && per_token * slots as u64 > params.kv_budget {
            return Err(Error::OutOfMemory(format!(
                "a key/value cache for {} sequences of {} tokens needs {} bytes, the budget is {}",
                params.n_seq,
                params.n_ctx,
                per_token * slots as u64,
                params.kv_budget
            )));
        }
        params.n_batch = params.n_batch.min(params.n_ctx);
        let kv = KvCache::new(&ctx, cfg, slots)?;
        let rows = params.n_batch.max(params.n_seq);
        // Prefill attention scratch: heads x chunk x context, within one binding.
        let max_scores = (ctx.caps().max_binding / 4) as usize;
        let scores = crate::kernels::attention::prefill_scores_len(
            cfg.n_heads,
            params.n_batch,
            params.n_ctx,
        )
        .min(max_scores);
        let acts = Activations::new(&ctx, cfg, rows, rows, scores)?;
        let rope = RopeTable::new(&ctx, cfg.rope, params.n_ctx)?;
        Ok(Session {
            row_params: Tensor::zeros(&ctx, &[rows * 8], DType::U32)?,
            penalty_ids: Tensor::zeros(&ctx, &[params.n_seq * MAX_PENALTY_TOKENS], DType::U32)?,
            sampled: Tensor::zeros(&ctx, &[rows], DType::U32)?,
            targets: Tensor::zeros(&ctx, &[rows], DType::U32)?,
            nll_out: Tensor::zeros(&ctx, &[rows, 2], DType::F32)?,
            seqs: (0..params.n_seq).map(|_| None).collect(),
            model,
            params,
            kv,
            acts,
            rope,
            next_id: 1,
            decode_plans: HashMap::new(),
            last_dispatches: 0,
            adapters: Vec::new(),
            lora: None,
        })
    }

    /// Expert loads of a Mixture-of-Experts model: how many tokens each layer routed to
    /// each expert (`[layer][expert]`) since the session began or
    /// [`Session::reset_expert_counts`]; every forward pass counts (prefill, decode,
    /// logits, perplexity). `None` for a dense model.
    pub fn expert_counts(&self) -> Result<Option<Vec<Vec<u64>>>> {
        match &self.acts.moe {
            None => Ok(None),
            Some(m) => Ok(Some(m.expert_counts(self.model.context())?)),
        }
    }

    /// Zeroes the counters of [`Session::expert_counts`].
    pub fn reset_expert_counts(&mut self) -> Result<()> {
        match &self.acts.moe {
            None => Ok(()),
            Some(m) => m.reset_counts(self.model.context()),
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The session's sizes (with `n_ctx` resolved).
    pub fn params(&self) -> SessionParams {
        self.params
    }

    fn ctx(&self) -> &Context {
        self.model.context()
    }

    /// Starts a sequence with its own sampler.
    pub fn add_sequence(&mut self, sampler: SamplerConfig) -> Result<SeqId> {
        let state = SamplerState::new(sampler)?;
        let slot = self.seqs.iter().position(|s| s.is_none()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "all {} sequences of the session are in use",
                self.params.n_seq
            ))
        })?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs[slot] = Some(Seq {
            id,
            adapter: None,
            slot,
            virt: 0,
            tokens: Vec::new(),
            sampler: state,
            next: None,
        });
        Ok(id)
    }

    /// Ends a sequence, freeing its cache region.
    pub fn remove_sequence(&mut self, id: SeqId) -> Result<()> {
        let i = self.index(id)?;
        self.seqs[i] = None;
        Ok(())
    }

    /// Forgets every sequence.
    pub fn reset(&mut self) {
        self.seqs.iter_mut().for_each(|s| *s = None);
    }

    /// Tokens in a sequence's cache.
    pub fn tokens(&self, id: SeqId) -> Result<&[u32]> {
        Ok(self.seqs[self.index(id)?]
            .as_ref()
            .map(|s| s.tokens.as_slice())
            .unwrap_or(&[]))
    }

    fn index(&self, id: SeqId) -> Result<usize> {
        self.seqs
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.id == id))
            .ok_or_else(|| Error::InvalidArgument(format!("no sequence {id:?} in this session")))
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.config.vocab;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    fn write_u32(&self, t: &Tensor, v: &[u32]) -> Result<()> {
        t.write(self.ctx(), v)
    }

    /// Writes the per-token inputs of `n` tokens of sequence `slot` at positions
    /// `pos0 .. pos0 + n`.
    fn write_chunk_inputs(&self, slot: usize, pos0: usize, chunk: &[u32]) -> Result<()> {
        let base = (slot * self.params.n_ctx) as u32;
        let n = chunk.len() as u32;
        let p0 = pos0 as u32;
        self.write_u32(&self.acts.ids, chunk)?;
        self.write_u32(&self.acts.pos, &(0..n).map(|j| p0 + j).collect::<Vec<_>>())?;
        self.write_u32(
            &self.acts.slots,
            &(0..n).map(|j| base + p0 + j).collect::<Vec<_>>(),
        )?;
        self.write_u32(
            &self.acts.lens,
            &(0..n).map(|j| p0 + j + 1).collect::<Vec<_>>(),
        )?;
        let ad = self.seqs[slot].as_ref().and_then(|s| s.adapter);
        self.write_row_adapters(&vec![ad; chunk.len()])?;
        self.write_u32(
            &self.acts.ranges,
            &(0..n).flat_map(|j| [base, p0 + j + 1]).collect::<Vec<_>>(),
        )?;
        Ok(())
    }

    /// Runs `tokens` through sequence `id` (appending them to its cache). With `logits`
    /// set to `Last` the next token is sampled and returned.
    async fn feed(&mut self, id: SeqId, tokens: &[u32], want_next: bool) -> Result<Option<u32>> {
        self.check_tokens(tokens)?;
        let i = self.index(id)?;
        let (slot, pos0) = {
            let s = self.seqs[i]
                .as_ref()
                .ok_or_else(|| Error::Internal("sequence vanished".into()))?;
            (s.slot, s.virt + s.tokens.len())
        };
        if pos0 + tokens.len() > self.params.n_ctx {
            return Err(Error::InvalidArgument(format!(
                "context full: the sequence holds {pos0} tokens, {} more do not fit in n_ctx = {}",
                tokens.len(),
                self.params.n_ctx
            )));
        }
        if tokens.is_empty() {
            return Ok(None);
        }
        let chunks: Vec<&[u32]> = tokens.chunks(self.params.n_batch).collect();
        let mut next = None;
        for (ci, chunk) in chunks.iter().enumerate() {
            let p = pos0 + ci * self.params.n_batch;
            self.write_chunk_inputs(slot, p, chunk)?;
            let last = ci + 1 == chunks.len();
            let logits = if last && want_next {
                LogitRows::Last
            } else {
                LogitRows::None
            };
            let mode = AttnMode::Prefill {
                first: slot * self.params.n_ctx,
                kv_len: p + chunk.len(),
            };
            let mut ops = self.model.forward(
                &self.acts,
                &self.kv,
                &self.rope,
                chunk.len(),
                mode,
                logits,
                self.lora.as_ref(),
            )?;
            if last && want_next {
                ops.extend(self.sample_ops(i, 1)?);
            }
            if std::env::var_os("EMBER_PROFILE_PREFILL").is_some() {
                for (n, c, s) in self.ctx().profile(&ops)? {
                    eprintln!("prefill {n:<18} x{c:<4} {:8.2} ms", s * 1e3);
                }
            }
            self.ctx().submit(&ops);
        }
        if want_next {
            let id = self.sampled.first(1)?.read_u32_async(self.ctx()).await?[0];
            next = Some(id);
        } else {
            self.ctx().sync()?;
        }
        let s = self.seqs[i]
            .as_mut()
            .ok_or_else(|| Error::Internal("sequence vanished".into()))?;
        s.tokens.extend_from_slice(tokens);
        s.next = next;
        Ok(next)
    }

    /// Writes the sampler inputs of the sequences `seq_idx` (rows in that order) and
    /// returns the penalize + sample dispatches for them (built per call: prefill).
    fn sample_ops(&mut self, seq_idx: usize, rows: usize) -> Result<Vec<Dispatch>> {
        self.write_sampler_rows(&[seq_idx])?;
        let vocab = self.model.config.vocab;
        let ctx = self.ctx();
        Ok(vec![
            penalize(
                ctx,
                &self.acts.logits,
                &self.row_params,
                &self.penalty_ids,
                rows,
                vocab,
                vocab,
            )?,
            sample(
                ctx,
                &self.sampled,
                &self.acts.logits,
                &self.row_params,
                rows,
                vocab,
                vocab,
            )?,
        ])
    }

    fn write_sampler_rows(&mut self, seq_idx: &[usize]) -> Result<()> {
        let mut rows: Vec<RowParams> = Vec::with_capacity(seq_idx.len());
        let mut pen: Vec<(usize, Vec<u32>)> = Vec::new();
        for (r, &i) in seq_idx.iter().enumerate() {
            let s = self.seqs[i]
                .as_mut()
                .ok_or_else(|| Error::Internal("sequence vanished".into()))?;
            let mut history = s.tokens.clone();
            if let Some(n) = s.next {
                history.push(n);
            }
            let ids = s.sampler.penalty_ids(&history);
            let off = r * MAX_PENALTY_TOKENS;
            rows.push(s.sampler.next_row(off as u32, ids.len() as u32));
            if !ids.is_empty() {
                pen.push((off, ids));
            }
        }
        self.row_params
            .write(self.ctx(), bytemuck::cast_slice::<_, u32>(&rows))?;
        for (off, ids) in pen {
            let view = Tensor::view(
                self.penalty_ids.buffer().clone(),
                (off * 4) as u64,
                &[ids.len()],
                DType::U32,
            )?;
            view.write(self.ctx(), &ids)?;
        }
        Ok(())
    }

    fn write_row_adapters(&self, rows: &[Option<(usize, f32)>]) -> Result<()> {
        if let Some(ls) = &self.lora {
            let ad: Vec<u32> = rows
                .iter()
                .map(|a| a.map(|(i, _)| i as u32).unwrap_or(u32::MAX))
                .collect();
            let sc: Vec<f32> = rows
                .iter()
                .map(|a| a.map(|(_, s)| s).unwrap_or(0.0))
                .collect();
            ls.row_ad.write(self.ctx(), &ad)?;
            ls.row_scale.write(self.ctx(), &sc)?;
        }
        Ok(())
    }

    /// Attaches a LoRA adapter (made for this model) under `name`; sequences choose it with
    /// [`Session::set_sequence_adapter`]. Many adapters can be attached: each sequence of a
    /// batch may use a different one (or none) in the same forward pass.
    pub fn attach_adapter(&mut self, name: &str, adapter: Arc<LoraAdapter>) -> Result<AdapterId> {
        if let Some(id) = adapter.base_identity {
            if id != self.model.identity {
                return Err(Error::InvalidArgument(format!(
                    "adapter {name:?} was made for another base model (identity {id:016x}, this model is {:016x})",
                    self.model.identity
                )));
            }
        }
        let c = &self.model.config;
        for (_, t) in adapter.weights.keys() {
            if c.moe.is_some() && matches!(t, Target::Gate | Target::Up | Target::Down) {
                return Err(Error::Unsupported(format!(
                    "adapter {name:?}: a {} adapter on a Mixture-of-Experts model (its \
                     feed-forward is the experts; adapt q, k, v or o)",
                    t.module()
                )));
            }
        }
        adapter.check_fits(c, &format!("adapter {name:?}"))?;
        let slot = self.free_adapter_slot();
        self.adapters[slot] = Some(Attached {
            name: name.to_string(),
            kind: AttachedKind::Lora(adapter),
            scale: 1.0,
        });
        self.rebuild_lora()?;
        Ok(AdapterId(slot))
    }

    fn free_adapter_slot(&mut self) -> usize {
        match self.adapters.iter().position(|a| a.is_none()) {
            Some(i) => i,
            None => {
                self.adapters.push(None);
                self.adapters.len() - 1
            }
        }
    }

    /// Attaches a prompt adapter (soft prompt or prefix) under `name`, in the same id space
    /// as LoRA adapters: [`Session::set_sequence_adapter`] with its id puts it at the start
    /// of an (empty) sequence; a sequence can have one LoRA and one prompt adapter.
    pub fn attach_prompt(&mut self, name: &str, prompt: PromptAdapter) -> Result<AdapterId> {
        self.check_prompt(&prompt)?;
        let slot = self.free_adapter_slot();
        self.adapters[slot] = Some(Attached {
            name: name.to_string(),
            kind: AttachedKind::Prompt(prompt),
            scale: 1.0,
        });
        Ok(AdapterId(slot))
    }

    /// Checks that a prompt adapter fits this model and session.
    fn check_prompt(&self, prompt: &PromptAdapter) -> Result<()> {
        if let Some(id) = prompt.base_identity() {
            if id != self.model.identity {
                return Err(Error::InvalidArgument(format!(
                    "the prompt adapter was made for another base model (identity {id:016x}, this model is {:016x})",
                    self.model.identity
                )));
            }
        }
        let c = &self.model.config;
        let n = prompt.n_virtual();
        if n + 1 > self.params.n_ctx {
            return Err(Error::InvalidArgument(format!(
                "{n} virtual tokens leave no room in n_ctx = {}",
                self.params.n_ctx
            )));
        }
        let fits = match prompt {
            PromptAdapter::Prefix(p) => {
                p.layers.len() == c.n_layers
                    && p.layers.iter().all(|l| l.len() == n * 2 * c.kv_dim())
            }
            PromptAdapter::Soft(p) => p.values.len() == n * c.hidden,
        };
        if !fits {
            return Err(Error::InvalidArgument(format!(
                "the {} does not fit this model ({} layers, hidden {}, {} key/value width)",
                match prompt {
                    PromptAdapter::Prefix(_) => "prefix",
                    PromptAdapter::Soft(_) => "soft prompt",
                },
                c.n_layers,
                c.hidden,
                c.kv_dim()
            )));
        }
        Ok(())
    }

    /// Detaches an adapter; sequences that used it continue without one.
    pub fn detach_adapter(&mut self, id: AdapterId) -> Result<()> {
        if self.adapters.get(id.0).and_then(|a| a.as_ref()).is_none() {
            return Err(Error::InvalidArgument(format!(
                "no adapter {id:?} attached"
            )));
        }
        self.adapters[id.0] = None;
        for s in self.seqs.iter_mut().flatten() {
            if s.adapter.is_some_and(|(i, _)| i == id.0) {
                s.adapter = None;
            }
        }
        self.rebuild_lora()
    }

    /// Replaces an attached adapter's weights in place (hot swap between requests); the
    /// sequences that use it keep using it.
    pub fn replace_adapter(&mut self, id: AdapterId, adapter: Arc<LoraAdapter>) -> Result<()> {
        let (name, scale) = match self.adapters.get(id.0).and_then(|a| a.as_ref()) {
            Some(a) => (a.name.clone(), a.scale),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "no adapter {id:?} attached"
                )))
            }
        };
        let old = self.adapters[id.0].take();
        if let Err(e) = self.attach_at(id.0, &name, adapter, scale) {
            self.adapters[id.0] = old;
            self.rebuild_lora()?;
            return Err(e);
        }
        Ok(())
    }

    fn attach_at(
        &mut self,
        slot: usize,
        name: &str,
        adapter: Arc<LoraAdapter>,
        scale: f32,
    ) -> Result<()> {
        let id = self.attach_adapter(name, adapter)?;
        if id.0 != slot {
            self.adapters.swap(id.0, slot);
        }
        if let Some(a) = self.adapters[slot].as_mut() {
            a.scale = scale;
        }
        self.rebuild_lora()
    }

    /// Sets an adapter's strength for every sequence using it (1 = as trained).
    pub fn set_adapter_scale(&mut self, id: AdapterId, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::InvalidArgument(format!("adapter scale {scale}")));
        }
        match self.adapters.get_mut(id.0).and_then(|a| a.as_mut()) {
            Some(a) => a.scale = scale,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "no adapter {id:?} attached"
                )))
            }
        }
        self.rebuild_lora()
    }

    /// Names and ids of the attached adapters.
    pub fn adapters(&self) -> Vec<(AdapterId, String)> {
        self.adapters
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().map(|a| (AdapterId(i), a.name.clone())))
            .collect()
    }

    /// Chooses the LoRA adapter of a sequence (`None`: the base model) and its strength. With
    /// the id of an attached prompt adapter, puts that at the start of the (empty) sequence
    /// instead (see [`Session::set_sequence_prompt`]; `scale` is not used).
    pub fn set_sequence_adapter(
        &mut self,
        seq: SeqId,
        adapter: Option<AdapterId>,
        scale: f32,
    ) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::InvalidArgument(format!("adapter scale {scale}")));
        }
        if let Some(a) = adapter {
            match self.adapters.get(a.0).and_then(|x| x.as_ref()) {
                None => return Err(Error::InvalidArgument(format!("no adapter {a:?} attached"))),
                Some(Attached {
                    kind: AttachedKind::Prompt(p),
                    ..
                }) => return self.set_sequence_prompt(seq, Some(p.clone())),
                Some(_) => {}
            }
        }
        let i = self.index(seq)?;
        if let Some(s) = self.seqs[i].as_mut() {
            s.adapter = adapter.map(|a| (a.0, scale));
        }
        Ok(())
    }

    /// Starts a sequence that runs with `adapters` (removed again on error).
    pub fn start_sequence(
        &mut self,
        sampler: SamplerConfig,
        adapters: &SeqAdapters,
    ) -> Result<SeqId> {
        let id = self.add_sequence(sampler)?;
        let mut r = Ok(());
        if let Some((a, sc)) = adapters.lora {
            r = self.set_sequence_adapter(id, Some(a), sc);
        }
        if let (Ok(()), Some(p)) = (&r, &adapters.prompt) {
            r = self.set_sequence_prompt(id, Some(p.clone()));
        }
        match r {
            Ok(()) => Ok(id),
            Err(e) => {
                self.remove_sequence(id)?;
                Err(e)
            }
        }
    }

    /// Puts a prompt adapter (soft prompt or prefix, made for this model) at the start of an
    /// empty sequence, or removes it (`None`). Its virtual tokens take the first
    /// `n_virtual` positions of the sequence's context; the real tokens follow, as in PEFT.
    /// A soft prompt runs through the model (with the sequence's LoRA adapter, if it has
    /// one: choose that first); a prefix is written straight into the cache.
    pub fn set_sequence_prompt(&mut self, seq: SeqId, prompt: Option<PromptAdapter>) -> Result<()> {
        let i = self.index(seq)?;
        let (slot, empty) = self.seqs[i]
            .as_ref()
            .map(|s| (s.slot, s.tokens.is_empty()))
            .ok_or_else(|| Error::Internal("sequence vanished".into()))?;
        if !empty {
            return Err(Error::InvalidArgument(format!(
                "sequence {seq:?} already holds tokens: a prompt adapter goes on an empty sequence"
            )));
        }
        let set_virt = |me: &mut Session, v: usize| {
            if let Some(s) = me.seqs[i].as_mut() {
                s.virt = v;
            }
        };
        set_virt(self, 0);
        let Some(prompt) = prompt else {
            return Ok(());
        };
        self.check_prompt(&prompt)?;
        let n = prompt.n_virtual();
        let c = &self.model.config;
        let base = slot * self.params.n_ctx;
        match &prompt {
            PromptAdapter::Prefix(p) => {
                let kv = c.kv_dim();
                for l in 0..c.n_layers {
                    let rows = p.layer_for_model(l, &self.model, true);
                    let (mut k, mut v) = (Vec::with_capacity(n * kv), Vec::with_capacity(n * kv));
                    for r in rows.chunks_exact(2 * kv) {
                        k.extend_from_slice(&r[..kv]);
                        v.extend_from_slice(&r[kv..]);
                    }
                    for (cache, data) in [(&self.kv.k[l], &k), (&self.kv.v[l], &v)] {
                        let view = Tensor::view(
                            cache.buffer().clone(),
                            (base * kv * 4) as u64,
                            &[n * kv],
                            DType::F32,
                        )?;
                        view.write(self.ctx(), data)?;
                    }
                }
            }
            PromptAdapter::Soft(p) => {
                let h = c.hidden;
                let dummy = vec![0u32; self.params.n_batch];
                for (ci, rows) in p.values.chunks(self.params.n_batch * h).enumerate() {
                    let m = rows.len() / h;
                    let p0 = ci * self.params.n_batch;
                    self.write_chunk_inputs(slot, p0, &dummy[..m])?;
                    let x = Tensor::view(self.acts.x.buffer().clone(), 0, &[m * h], DType::F32)?;
                    x.write(self.ctx(), rows)?;
                    let mode = AttnMode::Prefill {
                        first: base,
                        kv_len: p0 + m,
                    };
                    let ops = self.model.forward_input(
                        &self.acts,
                        &self.kv,
                        &self.rope,
                        m,
                        mode,
                        LogitRows::None,
                        self.lora.as_ref(),
                        false,
                    )?;
                    self.ctx().submit(&ops);
                }
                self.ctx().sync()?;
            }
        }
        set_virt(self, n);
        Ok(())
    }

    /// Packs the attached adapters for the forward pass and drops plans built without them.
    fn rebuild_lora(&mut self) -> Result<()> {
        self.decode_plans.clear();
        let live: Vec<(usize, &Attached)> = self
            .adapters
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().map(|a| (i, a)))
            .collect();
        if live.is_empty() {
            self.lora = None;
            return Ok(());
        }
        let ctx = self.model.context().clone();
        let c = &self.model.config;
        let mut keys: Vec<(usize, Target)> = live
            .iter()
            .filter_map(|(_, a)| a.lora())
            .flat_map(|a| a.weights.keys().copied())
            .collect();
        keys.sort();
        keys.dedup();
        let mut packs = HashMap::new();
        let mut max_rank = 1;
        for key in keys {
            let (out, inp) = key.1.dims(c);
            type Converted = (
                crate::adapters::lora::LoraPair,
                usize,
                f32,
                Option<LoraExperts>,
            );
            let converted: Vec<Option<Converted>> = (0..self.adapters.len())
                .map(|i| {
                    self.adapters[i].as_ref().and_then(|att| {
                        let a = att.lora()?;
                        a.weights.get(&key).map(|p| {
                            let w = a.config.width();
                            (
                                p.for_model(key.1, &self.model, w),
                                w,
                                a.config.scale() * att.scale,
                                a.config.experts,
                            )
                        })
                    })
                })
                .collect();
            let parts: Vec<LoraPart<'_>> = converted
                .iter()
                .map(|c| match c {
                    Some((p, r, s, experts)) => LoraPart {
                        a: &p.a,
                        b: &p.b,
                        rank: *r,
                        scale: *s,
                        router: &p.router,
                        experts: *experts,
                    },
                    None => LoraPart::NONE,
                })
                .collect();
            let pack = LoraPack::new(&ctx, inp, out, &parts)?;
            max_rank = max_rank.max(pack.max_rank);
            packs.insert(key, pack);
        }
        let rows = self.acts.rows;
        // Every pack shares one scratch: size it for the largest rank.
        for p in packs.values_mut() {
            p.max_rank = max_rank;
        }
        self.lora = Some(LoraState {
            packs,
            row_ad: Tensor::zeros(&ctx, &[rows], DType::U32)?,
            row_scale: Tensor::zeros(&ctx, &[rows], DType::F32)?,
            t: Tensor::zeros(&ctx, &[rows, max_rank], DType::F32)?,
        });
        Ok(())
    }

    /// Feeds a prompt to a sequence and samples its first new token.
    pub fn prefill(&mut self, id: SeqId, tokens: &[u32]) -> Result<u32> {
        blocking("Session::prefill", self.prefill_async(id, tokens))
    }

    /// [`Session::prefill`], awaiting the device (the form the browser needs).
    pub async fn prefill_async(&mut self, id: SeqId, tokens: &[u32]) -> Result<u32> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        self.feed(id, tokens, true)
            .await?
            .ok_or_else(|| Error::Internal("no token sampled".into()))
    }

    /// Appends tokens to a sequence's cache without sampling (e.g. a prompt prefix).
    pub fn append(&mut self, id: SeqId, tokens: &[u32]) -> Result<()> {
        blocking("Session::append", self.feed(id, tokens, false)).map(|_| ())
    }

    /// One decode step for the given sequences, in one batch: each feeds the token it last
    /// sampled and samples the next. Returns the new tokens in the same order.
    pub fn decode(&mut self, ids: &[SeqId]) -> Result<Vec<u32>> {
        blocking("Session::decode", self.decode_async(ids))
    }

    /// [`Session::decode`], awaiting the device (the form the browser needs).
    pub async fn decode_async(&mut self, ids: &[SeqId]) -> Result<Vec<u32>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let idx: Vec<usize> = ids
            .iter()
            .map(|&id| self.index(id))
            .collect::<Result<_>>()?;
        let mut feed = Vec::with_capacity(idx.len());
        let mut pos = Vec::new();
        let mut slots = Vec::new();
        let mut ranges = Vec::new();
        for (k, &i) in idx.iter().enumerate() {
            if idx[..k].contains(&i) {
                return Err(Error::InvalidArgument(format!(
                    "sequence {:?} appears twice in one step",
                    ids[k]
                )));
            }
            let s = self.seqs[i]
                .as_ref()
                .ok_or_else(|| Error::Internal("sequence vanished".into()))?;
            let t = s.next.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "sequence {:?} has no sampled token to continue from (prefill it first)",
                    s.id
                ))
            })?;
            let p = s.virt + s.tokens.len();
            if p + 1 > self.params.n_ctx {
                return Err(Error::InvalidArgument(format!(
                    "context full: sequence {:?} holds {p} tokens, n_ctx = {}",
                    s.id, self.params.n_ctx
                )));
            }
            let base = (s.slot * self.params.n_ctx) as u32;
            feed.push(t);
            pos.push(p as u32);
            slots.push(base + p as u32);
            ranges.extend([base, p as u32 + 1]);
        }
        let b = idx.len();
        self.write_u32(&self.acts.ids, &feed)?;
        self.write_u32(&self.acts.pos, &pos)?;
        self.write_u32(&self.acts.slots, &slots)?;
        self.write_u32(&self.acts.ranges, &ranges)?;
        self.write_sampler_rows(&idx)?;
        let ads: Vec<Option<(usize, f32)>> = idx
            .iter()
            .map(|&i| self.seqs[i].as_ref().and_then(|s| s.adapter))
            .collect();
        self.write_row_adapters(&ads)?;
        if !self.decode_plans.contains_key(&b) {
            let vocab = self.model.config.vocab;
            let mut ops = self.model.forward(
                &self.acts,
                &self.kv,
                &self.rope,
                b,
                AttnMode::Ranges,
                LogitRows::All,
                self.lora.as_ref(),
            )?;
            let ctx = self.model.context();
            ops.push(penalize(
                ctx,
                &self.acts.logits,
                &self.row_params,
                &self.penalty_ids,
                b,
                vocab,
                vocab,
            )?);
            ops.push(sample(
                ctx,
                &self.sampled,
                &self.acts.logits,
                &self.row_params,
                b,
                vocab,
                vocab,
            )?);
            self.decode_plans.insert(b, ops);
        }
        let plan = &self.decode_plans[&b];
        self.last_dispatches = plan.len();
        self.model.context().submit(plan);
        let out = self.sampled.first(b)?.read_u32_async(self.ctx()).await?;
        for (k, &i) in idx.iter().enumerate() {
            if let Some(s) = self.seqs[i].as_mut() {
                s.tokens.push(feed[k]);
                s.next = Some(out[k]);
            }
        }
        Ok(out)
    }

    /// Runs `tokens` through a fresh sequence and returns the logits of every position
    /// (`[tokens.len()][vocab]`), then removes the sequence. For tests and the C API's
    /// evaluate call; generation never reads logits back.
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.logits_with(tokens, SeqAdapters::default())
    }

    /// [`Session::logits`] through adapters: an attached LoRA (and strength) and/or a
    /// prompt adapter (the logits are those of the real tokens only).
    pub fn logits_with(
        &mut self,
        tokens: &[u32],
        adapters: impl Into<SeqAdapters>,
    ) -> Result<Vec<f32>> {
        let adapters = adapters.into();
        self.check_tokens(tokens)?;
        let virt = adapters.prompt.as_ref().map_or(0, |p| p.n_virtual());
        if tokens.is_empty() || virt + tokens.len() > self.params.n_ctx {
            return Err(Error::InvalidArgument(format!(
                "{} tokens (after {virt} virtual ones) for n_ctx {}",
                tokens.len(),
                self.params.n_ctx
            )));
        }
        let id = self.start_sequence(SamplerConfig::greedy(), &adapters)?;
        let r = self.logits_inner(id, tokens);
        self.remove_sequence(id)?;
        r
    }

    fn logits_inner(&mut self, id: SeqId, tokens: &[u32]) -> Result<Vec<f32>> {
        let i = self.index(id)?;
        let (slot, virt) = self.seqs[i]
            .as_ref()
            .map(|s| (s.slot, s.virt))
            .unwrap_or((0, 0));
        let vocab = self.model.config.vocab;
        let mut out = Vec::with_capacity(tokens.len() * vocab);
        for (ci, chunk) in tokens.chunks(self.params.n_batch).enumerate() {
            let p = virt + ci * self.params.n_batch;
            self.write_chunk_inputs(slot, p, chunk)?;
            let mode = AttnMode::Prefill {
                first: slot * self.params.n_ctx,
                kv_len: p + chunk.len(),
            };
            let ops = self.model.forward(
                &self.acts,
                &self.kv,
                &self.rope,
                chunk.len(),
                mode,
                LogitRows::All,
                self.lora.as_ref(),
            )?;
            self.ctx().submit(&ops);
            let l = Tensor::view(
                self.acts.logits.buffer().clone(),
                0,
                &[chunk.len() * vocab],
                DType::F32,
            )?;
            out.extend(l.read_f32(self.ctx())?);
        }
        Ok(out)
    }

    /// Perplexity of `tokens` as llama.cpp's perplexity tool defines it: consecutive
    /// non-overlapping windows of `window` tokens, each evaluated from an empty cache,
    /// every token but each window's first scored. Only two floats per token are read back.
    pub fn perplexity(&mut self, tokens: &[u32], window: usize) -> Result<Perplexity> {
        self.perplexity_with(tokens, window, SeqAdapters::default())
    }

    /// [`Session::perplexity`] through adapters (each window starts after the virtual
    /// tokens of a prompt adapter).
    pub fn perplexity_with(
        &mut self,
        tokens: &[u32],
        window: usize,
        adapters: impl Into<SeqAdapters>,
    ) -> Result<Perplexity> {
        let adapters = adapters.into();
        self.check_tokens(tokens)?;
        if window < 2 || window > self.params.n_ctx {
            return Err(Error::InvalidArgument(format!(
                "window {window} (2..={})",
                self.params.n_ctx
            )));
        }
        let id = self.start_sequence(SamplerConfig::greedy(), &adapters)?;
        let r = self.perplexity_inner(id, tokens, window);
        self.remove_sequence(id)?;
        r
    }

    fn perplexity_inner(&mut self, id: SeqId, tokens: &[u32], window: usize) -> Result<Perplexity> {
        let i = self.index(id)?;
        let (slot, virt) = self.seqs[i]
            .as_ref()
            .map(|s| (s.slot, s.virt))
            .unwrap_or((0, 0));
        let vocab = self.model.config.vocab;
        if virt + window > self.params.n_ctx {
            return Err(Error::InvalidArgument(format!(
                "window {window} after {virt} virtual tokens exceeds n_ctx {}",
                self.params.n_ctx
            )));
        }
        let mut nll_sum = 0.0f64;
        let mut top1 = Vec::new();
        for win in tokens.chunks(window) {
            if win.len() < 2 {
                continue;
            }
            for (ci, chunk) in win.chunks(self.params.n_batch).enumerate() {
                let p = ci * self.params.n_batch;
                self.write_chunk_inputs(slot, virt + p, chunk)?;
                // Row j predicts the window's token p + j + 1 (the last row has no target).
                let targets: Vec<u32> = (0..chunk.len())
                    .map(|j| win.get(p + j + 1).copied().unwrap_or(0))
                    .collect();
                self.targets.write(self.ctx(), &targets)?;
                let mode = AttnMode::Prefill {
                    first: slot * self.params.n_ctx,
                    kv_len: virt + p + chunk.len(),
                };
                let mut ops = self.model.forward(
                    &self.acts,
                    &self.kv,
                    &self.rope,
                    chunk.len(),
                    mode,
                    LogitRows::All,
                    self.lora.as_ref(),
                )?;
                ops.push(nll(
                    self.ctx(),
                    &self.nll_out,
                    &self.acts.logits,
                    &self.targets,
                    chunk.len(),
                    vocab,
                    vocab,
                )?);
                self.ctx().submit(&ops);
                let r = Tensor::view(
                    self.nll_out.buffer().clone(),
                    0,
                    &[chunk.len() * 2],
                    DType::F32,
                )?;
                let v = r.read_f32(self.ctx())?;
                for j in 0..chunk.len() {
                    if p + j + 1 < win.len() {
                        nll_sum += v[2 * j] as f64;
                        top1.push(v[2 * j + 1].to_bits());
                    }
                }
            }
        }
        let scored = top1.len();
        if scored == 0 {
            return Err(Error::InvalidArgument(
                "no tokens to score (need at least 2)".into(),
            ));
        }
        Ok(Perplexity {
            ppl: (nll_sum / scored as f64).exp(),
            tokens: tokens.len(),
            scored,
            top1,
            nll_sum,
        })
    }
}

impl Session {
    /// Runs the decode plan of batch size `b` once more, one dispatch per submission, and
    /// returns the wall time spent per kernel name (profiling; inputs are whatever the last
    /// step left). Call after at least one `decode` of that batch size.
    pub fn profile_decode(&self, b: usize) -> Result<Vec<(String, usize, f64)>> {
        let plan = self
            .decode_plans
            .get(&b)
            .ok_or_else(|| Error::InvalidArgument(format!("no decode plan for batch {b} yet")))?;
        self.ctx().profile(plan)
    }
}
