//! Packing training sequences into fixed-size row blocks.
//!
//! A step's sequences are laid out one after another in blocks of `rows` rows (the
//! micro-batches); each row holds one token with its position, the token it must predict
//! (or none), and the key range it may attend to (its own sequence up to itself), so that
//! sequences of any lengths share one forward pass without attending across each other.
//! Virtual rows (soft prompt or prefix tokens) open each sequence. Unused rows are padding
//! that attends to itself and predicts nothing.

use crate::error::{Error, Result};

/// One training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// `loss[i]`: token `i` is predicted (scored). `loss[0]` counts only after a soft
    /// prompt (whose last virtual token predicts the first real one, as in PEFT); otherwise
    /// nothing precedes token 0.
    pub loss: Vec<bool>,
    /// Distilled: the scored positions learn the frozen base model's whole next-token
    /// distribution (KL divergence to it) instead of the next token itself. Mixed into
    /// new data, such sequences hold the adapted model to the base on text it should not
    /// change, so new facts do not erase general ability.
    pub distill: bool,
}

impl Example {
    /// A sequence scored where `loss` says (predicting its own next tokens).
    pub fn new(tokens: Vec<u32>, loss: Vec<bool>) -> Example {
        Example {
            tokens,
            loss,
            distill: false,
        }
    }

    /// Every token after the first is scored (plain language modeling).
    pub fn all(tokens: Vec<u32>) -> Example {
        let loss = vec![true; tokens.len()];
        Example::new(tokens, loss)
    }

    /// The same positions scored against the base model's distribution (see
    /// [`Example::distill`]).
    pub fn distilled(self) -> Example {
        Example {
            distill: true,
            ..self
        }
    }

    /// Tokens that are scored (before any soft prompt).
    pub fn n_targets(&self) -> usize {
        self.loss.iter().skip(1).filter(|&&b| b).count()
    }
}

/// Virtual tokens that open every sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Virtual {
    /// None.
    None,
    /// Soft prompt rows: learned embeddings in place of token embeddings; they take the
    /// first positions and the real tokens follow them.
    Prompt(usize),
    /// Prefix rows: only their keys and values exist (learned, per layer, without RoPE);
    /// the real tokens follow at positions `n, n+1, ...` (as in PEFT, where the prefix is
    /// a key/value cache of length `n`).
    Prefix(usize),
}

impl Virtual {
    /// Virtual rows per sequence.
    pub fn rows(self) -> usize {
        match self {
            Virtual::None => 0,
            Virtual::Prompt(n) | Virtual::Prefix(n) => n,
        }
    }
}

/// "No row" in the u32 maps and targets.
pub const NONE: u32 = u32::MAX;

/// The target of a row that learns the base model's distribution (a distilled example).
pub const DISTILL: u32 = crate::kernels::train::DISTILL;

/// The per-row inputs of one block.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// Token id per row (0 for virtual and padding rows).
    pub ids: Vec<u32>,
    /// Position per row.
    pub pos: Vec<u32>,
    /// Token each row predicts, or [`NONE`].
    pub targets: Vec<u32>,
    /// `[start, end)` row range each row attends to, flattened.
    pub ranges: Vec<u32>,
    /// Virtual row index of each row, or [`NONE`].
    pub virt: Vec<u32>,
    /// Rows used (the rest is padding).
    pub used: usize,
    /// Sequences in the block.
    pub sequences: usize,
}

impl Packed {
    /// Token rows (not virtual, not padding).
    pub fn n_tokens(&self) -> usize {
        self.virt[..self.used]
            .iter()
            .filter(|&&v| v == NONE)
            .count()
    }

    /// Rows with a target.
    pub fn n_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != NONE).count()
    }

    /// Whether some row is distilled (the block needs the base model's logits).
    pub fn has_distill(&self) -> bool {
        self.targets.contains(&DISTILL)
    }

    fn empty(rows: usize) -> Packed {
        Packed {
            ids: vec![0; rows],
            pos: vec![0; rows],
            targets: vec![NONE; rows],
            ranges: (0..rows as u32).flat_map(|r| [r, r + 1]).collect(),
            virt: vec![NONE; rows],
            used: 0,
            sequences: 0,
        }
    }

    fn push(&mut self, e: &Example, v: Virtual) {
        let start = self.used;
        let nv = v.rows();
        for j in 0..nv {
            let r = start + j;
            self.virt[r] = j as u32;
            self.pos[r] = match v {
                Virtual::Prompt(_) => j as u32,
                _ => 0,
            };
        }
        let pos0 = v.rows();
        if let Virtual::Prompt(n) = v {
            if n > 0 && e.loss[0] {
                self.targets[start + n - 1] = e.tokens[0];
            }
        }
        for (i, &t) in e.tokens.iter().enumerate() {
            let r = start + nv + i;
            self.ids[r] = t;
            self.pos[r] = (pos0 + i) as u32;
            if i + 1 < e.tokens.len() && e.loss[i + 1] {
                self.targets[r] = if e.distill { DISTILL } else { e.tokens[i + 1] };
            }
        }
        let end = start + nv + e.tokens.len();
        for r in start..end {
            self.ranges[2 * r] = start as u32;
            self.ranges[2 * r + 1] = r as u32 + 1;
        }
        self.used = end;
        self.sequences += 1;
    }
}

/// Packs `examples` in order into blocks of `rows` rows (a new block when the next
/// sequence does not fit). A sequence longer than a block is an error naming it.
pub fn pack(examples: &[Example], rows: usize, v: Virtual) -> Result<Vec<Packed>> {
    let mut out: Vec<Packed> = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        if e.tokens.is_empty() || e.loss.len() != e.tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "training example {i}: {} tokens with {} loss flags",
                e.tokens.len(),
                e.loss.len()
            )));
        }
        if e.distill && v != Virtual::None {
            return Err(Error::InvalidArgument(format!(
                "training example {i} is distilled from the base model, which needs a LoRA adapter trained without a soft prompt or prefix"
            )));
        }
        let need = v.rows() + e.tokens.len();
        if need > rows {
            return Err(Error::InvalidArgument(format!(
                "training example {i} needs {need} rows ({} tokens{}) but a step holds {rows}: raise the sequence length or shorten the example",
                e.tokens.len(),
                if v.rows() > 0 { " and the virtual tokens" } else { "" }
            )));
        }
        match out.last_mut() {
            Some(p) if p.used + need <= rows => p.push(e, v),
            _ => {
                let mut p = Packed::empty(rows);
                p.push(e, v);
                out.push(p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_sequences_with_ranges_targets_and_virtual_rows() {
        let a = Example::new(vec![10, 11, 12], vec![false, false, true]);
        let b = Example::all(vec![20, 21]);
        let p = pack(&[a.clone(), b.clone(), a.clone()], 8, Virtual::Prompt(1)).unwrap();
        assert_eq!(p.len(), 2);
        let q = &p[0];
        assert_eq!(q.used, 7);
        assert_eq!(q.ids, vec![0, 10, 11, 12, 0, 20, 21, 0]);
        assert_eq!(q.pos, vec![0, 1, 2, 3, 0, 1, 2, 0]);
        assert_eq!(q.virt, vec![0, NONE, NONE, NONE, 0, NONE, NONE, NONE]);
        // Token 11 -> 12 is scored; 10 -> 11 is masked; the soft prompt predicts 20, and
        // 20 -> 21 is scored.
        assert_eq!(q.targets, vec![NONE, NONE, 12, NONE, 20, 21, NONE, NONE]);
        assert_eq!(
            q.ranges,
            vec![0, 1, 0, 2, 0, 3, 0, 4, 4, 5, 4, 6, 4, 7, 7, 8]
        );
        assert_eq!(q.n_targets(), 3);
        let pre = pack(&[b], 4, Virtual::Prefix(2)).unwrap();
        assert_eq!(pre[0].pos, vec![0, 0, 2, 3]);
        let long = Example::all(vec![1; 9]);
        let e = pack(&[long], 8, Virtual::None).unwrap_err().to_string();
        assert!(e.contains("example 0 needs 9 rows"), "{e}");
    }

    #[test]
    fn distilled_rows_are_marked_and_need_plain_lora() {
        let a = Example::new(vec![10, 11, 12], vec![false, true, true]).distilled();
        let b = Example::all(vec![20, 21]);
        let p = pack(&[b.clone(), a.clone()], 8, Virtual::None).unwrap();
        assert_eq!(
            p[0].targets,
            vec![21, NONE, DISTILL, DISTILL, NONE, NONE, NONE, NONE]
        );
        assert_eq!(p[0].n_targets(), 3);
        assert!(p[0].has_distill());
        assert!(!pack(&[b], 8, Virtual::None).unwrap()[0].has_distill());
        let e = pack(&[a], 8, Virtual::Prompt(2)).unwrap_err().to_string();
        assert!(e.contains("distilled") && e.contains("soft prompt"), "{e}");
    }
}
