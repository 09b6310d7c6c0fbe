//! Incremental detokenization for streaming output.

use super::Tokenizer;
use crate::error::{Error, Result};

/// Turns generated token ids into text as they arrive.
///
/// Byte-level vocabularies split multi-byte characters (emoji, CJK) across tokens; the
/// decoder holds back an incomplete UTF-8 sequence until the tokens that complete it arrive,
/// so every string it returns is whole characters. Bytes that can never form valid UTF-8
/// come out as U+FFFD. Control tokens (`<|im_end|>`) produce no text unless
/// [`StreamDecoder::with_special`] asks for them. Tokens are rendered as they are (no
/// leading-space stripping): the stream continues a prompt.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
    render_special: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder for ids of `t`, hiding control tokens.
    pub fn new(t: &'a Tokenizer) -> Self {
        StreamDecoder {
            tokenizer: t,
            pending: Vec::new(),
            render_special: false,
        }
    }

    /// A decoder that renders control tokens as their text when `render_special` is set.
    pub fn with_special(t: &'a Tokenizer, render_special: bool) -> Self {
        StreamDecoder {
            render_special,
            ..Self::new(t)
        }
    }

    /// Feeds one token; returns the text it completes (empty while a UTF-8 sequence is still
    /// incomplete, or for a hidden control token).
    ///
    /// Errors: [`Error::InvalidArgument`] for an id outside the vocabulary (nothing is
    /// consumed).
    pub fn push(&mut self, id: u32) -> Result<String> {
        let piece = self.tokenizer.piece(id).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.tokenizer.vocab_size()
            ))
        })?;
        if !self.render_special && self.tokenizer.is_control(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(piece);
        Ok(self.take_complete())
    }

    /// Everything still held back (an incomplete sequence comes out as U+FFFD); the decoder
    /// is empty afterwards and can be reused.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Removes and returns the longest prefix of `pending` that is complete text.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `valid` bytes were just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(
                        &self.pending[start..start + valid],
                    ));
                    start += valid;
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for more bytes.
                        None => break,
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += bad;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}
