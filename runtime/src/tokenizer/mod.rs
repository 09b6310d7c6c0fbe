//! Text <-> token ids: GGUF vocabularies, HF `tokenizer.json`, chat templates, streaming.
//!
//! A [`Tokenizer`] comes from one of two sources:
//!
//! - a GGUF file's `tokenizer.ggml.*` metadata ([`Tokenizer::from_gguf`]): the vocabulary is
//!   rebuilt as an equivalent `tokenizers` pipeline whose ids equal llama.cpp's
//!   `llama_tokenize(text, add_special, parse_special)`, and
//!   special tokens are split out the way llama.cpp does;
//! - a Hugging Face `tokenizer.json` ([`Tokenizer::from_json_file`], or a model directory with
//!   its `tokenizer_config.json` and `generation_config.json`: [`Tokenizer::from_hf_dir`]),
//!   run by the `tokenizers` crate with HF semantics.
//!
//! Either way the same API encodes, decodes, streams ([`StreamDecoder`]) and renders the
//! model's chat template ([`Tokenizer::apply_chat_template`], MiniJinja with Python string
//! methods). A `Tokenizer` is `Send + Sync` and cloning it is cheap (one `Arc`).

mod chat;
mod gguf_vocab;
mod stream;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value as Json;

pub use stream::StreamDecoder;

use crate::error::{Error, Result};
use crate::format::gguf::GgufFile;

/// Token attribute bits (llama.cpp's `llama_token_attr`, the subset Ember uses).
pub(crate) mod attr {
    /// An ordinary vocabulary token.
    pub const NORMAL: u8 = 1;
    /// The unknown token.
    pub const UNKNOWN: u8 = 2;
    /// A control token (`<|im_start|>`, `</s>`): split out only when parsing special tokens,
    /// rendered only when asked.
    pub const CONTROL: u8 = 4;
    /// A user-defined token: always split out of text, always rendered.
    pub const USER_DEFINED: u8 = 8;
    /// An unused token: renders as nothing.
    pub const UNUSED: u8 = 16;
    /// A byte token (`<0x41>`).
    pub const BYTE: u8 = 32;
}

/// One message of a conversation, as chat templates see it (`message['role']`,
/// `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever the template knows).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A special token of a GGUF vocabulary, for llama.cpp's partition of text around them.
#[derive(Debug, Clone)]
pub(crate) struct GgufSpecial {
    pub text: String,
    pub id: u32,
    pub attr: u8,
}

/// Which semantics encoding and decoding follow.
pub(crate) enum Mode {
    /// llama.cpp's: special tokens partitioned here, text fragments through `hf`.
    Gguf {
        /// Control / user-defined / unknown tokens, longest text first.
        specials: Vec<GgufSpecial>,
        /// Leading space stripped from the first decoded token (SentencePiece).
        add_space_prefix: bool,
    },
    /// HF `tokenizers` semantics for a `tokenizer.json`.
    Hf,
}

pub(crate) struct Inner {
    /// GGUF: runs one text fragment (special tokens already split out, none split again).
    /// HF: the tokenizer as loaded (special tokens split out of the text).
    pub hf: tokenizers::Tokenizer,
    /// HF only: the same tokenizer with special tokens treated as text.
    pub hf_plain: Option<tokenizers::Tokenizer>,
    pub mode: Mode,
    /// Raw bytes of each token, indexed by id.
    pub pieces: Vec<Box<[u8]>>,
    /// [`attr`] bits of each token, indexed by id.
    pub attrs: Vec<u8>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// End-of-generation ids, sorted.
    pub eog: Vec<u32>,
    pub chat_template: Option<String>,
    pub bos_text: Option<String>,
    pub eos_text: Option<String>,
    /// For `Debug`: where the vocabulary came from.
    pub description: String,
}

/// A tokenizer: encodes text to token ids and back, renders chat templates.
///
/// `Send + Sync`; `clone()` shares the same vocabulary.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.inner.description)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.inner.bos)
            .field("eos", &self.inner.eos)
            .field("add_bos", &self.inner.add_bos)
            .field("eog", &self.inner.eog)
            .finish()
    }
}

fn tk_err(what: &str, e: impl fmt::Display) -> Error {
    Error::Internal(format!("tokenizer: {what}: {e}"))
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` keys (and its
    /// `tokenizer.chat_template`).
    ///
    /// Supported `tokenizer.ggml.model`s: `gpt2` (byte-level BPE, with the pre-tokenizer
    /// named by `tokenizer.ggml.pre`; unknown names fall back to GPT-2's split with a warning)
    /// and `llama` (SentencePiece with byte fallback).
    ///
    /// Errors: [`Error::Unsupported`] for another model type; [`Error::Format`] naming the
    /// key when the vocabulary is malformed (a token-type / score count that differs from the
    /// token count, duplicate tokens, a merge naming an unknown token, a special-token id out
    /// of range, a key of the wrong type).
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let vocab = gguf_vocab::GgufVocab::read(g)?;
        Self::from_gguf_vocab(vocab, g.path())
    }

    pub(crate) fn from_gguf_vocab(v: gguf_vocab::GgufVocab, path: Option<&Path>) -> Result<Self> {
        Ok(Tokenizer {
            inner: Arc::new(gguf_vocab::build(v, path)?),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// Without a `tokenizer_config.json` the BOS/EOS tokens and the add-BOS flag are taken
    /// from the file's post-processor (what it adds around a sequence) and, failing that,
    /// from well-known special-token texts (`</s>`, `<|endoftext|>`, ...).
    ///
    /// Errors: [`Error::Io`] when the file cannot be read, [`Error::Format`] when it is not a
    /// tokenizer the `tokenizers` crate can load.
    pub fn from_json_file(path: &Path) -> Result<Tokenizer> {
        Self::from_hf_parts(path, &HfConfig::default())
    }

    /// Loads a Hugging Face model directory: `tokenizer.json`, plus `tokenizer_config.json`
    /// (`bos_token`, `eos_token`, `add_bos_token`, `add_eos_token`, `chat_template`) and
    /// `generation_config.json` (`eos_token_id`, one id or a list: all of them end
    /// generation) when present. A `chat_template.jinja` (or `chat_template.json`) file next
    /// to them supplies the template when the config has none.
    ///
    /// Errors: as [`Tokenizer::from_json_file`], and [`Error::Format`] when a config file is
    /// not valid JSON or names a token the vocabulary lacks.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let read_json = |name: &str| -> Result<Option<Json>> {
            let p = dir.join(name);
            match std::fs::read(&p) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::format(Some(&p), format!("not valid JSON: {e}"))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(Error::Io { path: p, source }),
            }
        };
        let mut cfg = HfConfig::default();
        if let Some(tc) = read_json("tokenizer_config.json")? {
            cfg.bos_token = token_content(tc.get("bos_token"));
            cfg.eos_token = token_content(tc.get("eos_token"));
            cfg.add_bos = tc.get("add_bos_token").and_then(Json::as_bool);
            cfg.add_eos = tc.get("add_eos_token").and_then(Json::as_bool);
            cfg.chat_template = template_from_config(tc.get("chat_template"));
            cfg.config_path = Some(dir.join("tokenizer_config.json"));
        }
        if cfg.chat_template.is_none() {
            let p = dir.join("chat_template.jinja");
            match std::fs::read_to_string(&p) {
                Ok(t) => cfg.chat_template = Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(j) = read_json("chat_template.json")? {
                        cfg.chat_template = template_from_config(j.get("chat_template"));
                    }
                }
                Err(source) => return Err(Error::Io { path: p, source }),
            }
        }
        if let Some(gc) = read_json("generation_config.json")? {
            match gc.get("eos_token_id") {
                Some(Json::Array(a)) => {
                    cfg.generation_eos.extend(a.iter().filter_map(Json::as_u64))
                }
                Some(v) => cfg.generation_eos.extend(v.as_u64()),
                None => {}
            }
        }
        Self::from_hf_parts(&dir.join("tokenizer.json"), &cfg)
    }

    fn from_hf_parts(path: &Path, cfg: &HfConfig) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Json = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format(Some(path), format!("not valid JSON: {e}")))?;
        let hf = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::format(
                Some(path),
                format!("not a tokenizer.json this build can load: {e}"),
            )
        })?;
        let mut hf_plain = hf.clone();
        hf_plain.set_encode_special_tokens(true);

        // Vocabulary size: highest id + 1 (model and added tokens).
        let n = hf
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let added = hf.get_added_tokens_decoder();
        let byte_level = json_mentions_type(json.get("decoder"), "ByteLevel")
            || json_mentions_type(json.get("pre_tokenizer"), "ByteLevel");
        let mut attrs = vec![0u8; n];
        let mut pieces: Vec<Box<[u8]>> = vec![Box::default(); n];
        for (id, (a, p)) in attrs.iter_mut().zip(pieces.iter_mut()).enumerate() {
            let id = id as u32;
            if let Some(t) = added.get(&id) {
                *a = if t.special {
                    attr::CONTROL
                } else {
                    attr::USER_DEFINED
                };
                *p = t.content.as_bytes().into();
            } else if let Some(text) = hf.id_to_token(id) {
                if let Some(b) = parse_byte_token(&text).filter(|_| !byte_level) {
                    *a = attr::BYTE;
                    *p = Box::new([b]);
                } else {
                    *a = attr::NORMAL;
                    *p = if byte_level {
                        byte_level_decode(&text).into()
                    } else {
                        text.replace('▁', " ").into_bytes().into()
                    };
                }
            }
        }

        // BOS / EOS: the config's, else what the post-processor adds, else well-known texts.
        let lookup = |text: &str| -> Result<u32> {
            hf.token_to_id(text).ok_or_else(|| {
                Error::format(
                    cfg.config_path.as_deref().or(Some(path)),
                    format!("special token {text:?} is not in the vocabulary"),
                )
            })
        };
        let around = hf
            .encode_fast("", true)
            .map_err(|e| tk_err("encode", e))?
            .get_ids()
            .to_vec();
        let post_bos = around
            .first()
            .copied()
            .filter(|&i| attrs.get(i as usize) == Some(&attr::CONTROL));
        let post_eos = around
            .last()
            .copied()
            .filter(|&i| attrs.get(i as usize) == Some(&attr::CONTROL) && around.len() > 1);
        let well_known = |texts: &[&str]| {
            texts.iter().find_map(|t| {
                hf.token_to_id(t)
                    .filter(|&i| attrs.get(i as usize) == Some(&attr::CONTROL))
            })
        };
        let bos = match &cfg.bos_token {
            Some(t) => Some(lookup(t)?),
            None => post_bos.or_else(|| well_known(&["<s>", "<|begin_of_text|>", "<bos>"])),
        };
        let mut eos = match &cfg.eos_token {
            Some(t) => Some(lookup(t)?),
            None => post_eos.or_else(|| {
                well_known(&[
                    "</s>",
                    "<|endoftext|>",
                    "<|end_of_text|>",
                    "<|im_end|>",
                    "<|eot_id|>",
                    "<eos>",
                ])
            }),
        };
        if eos.is_none() {
            eos = cfg.generation_eos.first().map(|&e| e as u32);
        }
        let add_bos = cfg.add_bos.unwrap_or(post_bos.is_some() && post_bos == bos);
        let add_eos = cfg.add_eos.unwrap_or(post_eos.is_some() && post_eos == eos);

        let mut eog: Vec<u32> = Vec::new();
        eog.extend(eos);
        eog.extend(
            cfg.generation_eos
                .iter()
                .filter(|&&e| (e as usize) < n)
                .map(|&e| e as u32),
        );
        for (&id, t) in &added {
            if t.special && gguf_vocab::EOG_TEXTS.contains(&t.content.as_str()) {
                eog.push(id);
            }
        }
        eog.sort_unstable();
        eog.dedup();

        let text_of = |id: Option<u32>| id.and_then(|i| hf.id_to_token(i));
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                bos_text: text_of(bos),
                eos_text: text_of(eos),
                hf,
                hf_plain: Some(hf_plain),
                mode: Mode::Hf,
                pieces,
                attrs,
                bos,
                eos,
                add_bos: add_bos && bos.is_some(),
                add_eos: add_eos && eos.is_some(),
                eog,
                chat_template: cfg.chat_template.clone(),
                description: format!("tokenizer.json {}", path.display()),
            }),
        })
    }

    /// Encodes `text` to token ids, exactly as llama.cpp's `tokenize(text, add_bos, special)`
    /// for GGUF vocabularies.
    ///
    /// - `add_bos`: add the model's special tokens around the text, i.e. prepend BOS when the
    ///   vocabulary's add-BOS flag is set (and append EOS when its add-EOS flag is); with the
    ///   flag off nothing is added even when `add_bos` is true.
    /// - `parse_special`: `true` turns the text of a control token (`<|im_start|>`) into that
    ///   token; `false` tokenizes it as plain text. User-defined tokens are always matched.
    ///
    /// Errors: [`Error::Internal`] if the underlying `tokenizers` pipeline fails.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>> {
        let inner = &*self.inner;
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos && inner.add_bos {
            out.extend(inner.bos);
        }
        match &inner.mode {
            Mode::Gguf { specials, .. } => {
                if !text.is_empty() {
                    for frag in partition(text, specials, parse_special) {
                        match frag {
                            Fragment::Token(id) => out.push(id),
                            Fragment::Text(t) => {
                                let enc = inner
                                    .hf
                                    .encode_fast(t, false)
                                    .map_err(|e| tk_err("encode", e))?;
                                out.extend_from_slice(enc.get_ids());
                            }
                        }
                    }
                }
            }
            Mode::Hf => {
                let tok = if parse_special {
                    &inner.hf
                } else {
                    inner.hf_plain.as_ref().unwrap_or(&inner.hf)
                };
                let enc = tok
                    .encode_fast(text, false)
                    .map_err(|e| tk_err("encode", e))?;
                out.extend_from_slice(enc.get_ids());
            }
        }
        if add_bos && inner.add_eos {
            out.extend(inner.eos);
        }
        Ok(out)
    }

    /// Decodes token ids to text. `skip_special` drops control (and unknown) tokens, otherwise
    /// their text is rendered; bytes that are not valid UTF-8 become U+FFFD.
    ///
    /// GGUF vocabularies: the tokens' bytes joined (llama.cpp's `token_to_piece` of each), so
    /// `decode(encode(text))` gives `text` back; a SentencePiece vocabulary's first rendered
    /// token loses the leading space its encoding added (after a BOS too, unlike
    /// `llama_detokenize`, which keeps it there). llama.cpp's optional `clean_spaces` pass
    /// (`" ,"` -> `","`) is not applied: it would break round trips and streaming. A
    /// `tokenizer.json` vocabulary uses the file's decoder.
    ///
    /// Errors: [`Error::InvalidArgument`] for an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let inner = &*self.inner;
        for &id in ids {
            self.check_id(id)?;
        }
        match &inner.mode {
            Mode::Hf => inner
                .hf
                .decode(ids, skip_special)
                .map_err(|e| tk_err("decode", e)),
            Mode::Gguf {
                add_space_prefix, ..
            } => {
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                let mut remove_space = *add_space_prefix;
                for &id in ids {
                    let a = inner.attrs[id as usize];
                    if skip_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                        continue;
                    }
                    let p = &inner.pieces[id as usize][..];
                    let p = match p {
                        [b' ', rest @ ..] if remove_space => rest,
                        _ => p,
                    };
                    bytes.extend_from_slice(p);
                    remove_space = false;
                }
                Ok(match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
        }
    }

    /// The raw bytes of token `id` (byte-level BPE decoded, SentencePiece `▁` as a space,
    /// `<0xNN>` as that byte, special tokens as their text, unused tokens empty); `None` when
    /// `id` is outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.inner.pieces.get(id as usize).map(|p| p.to_vec())
    }

    /// Raw bytes of `id` without copying (crate-internal).
    pub(crate) fn piece(&self, id: u32) -> Option<&[u8]> {
        self.inner.pieces.get(id as usize).map(|p| &p[..])
    }

    /// Whether `id` is a control or unknown token (hidden when decoding with `skip_special`).
    pub fn is_control(&self, id: u32) -> bool {
        self.inner
            .attrs
            .get(id as usize)
            .is_some_and(|&a| a & (attr::CONTROL | attr::UNKNOWN) != 0)
    }

    fn check_id(&self, id: u32) -> Result<()> {
        if (id as usize) < self.inner.pieces.len() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.inner.pieces.len()
            )))
        }
    }

    /// Number of token ids (the embedding rows a model needs at least).
    pub fn vocab_size(&self) -> usize {
        self.inner.pieces.len()
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        self.inner.bos
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        self.inner.eos
    }

    /// Whether [`Tokenizer::encode`] with `add_bos = true` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.inner.add_bos
    }

    /// Whether `id` ends generation: EOS, the end-of-turn token (`tokenizer.ggml.eot_token_id`
    /// or detected), and the tokens llama.cpp recognizes by text (`<|im_end|>`, `<|eot_id|>`,
    /// `<|endoftext|>`, `<end_of_turn>`, ...); for `tokenizer.json` also the ids of
    /// `generation_config.json`'s `eos_token_id`.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.inner.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.inner.eog
    }

    /// The model's chat template (Jinja source), if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    /// Renders `messages` with the model's chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    ///
    /// The template sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and
    /// can call `raise_exception(msg)` and `strftime_now(fmt)`; Python string methods
    /// (`.strip()`, `.startswith()`, ...) work.
    ///
    /// Errors: [`Error::Unsupported`] when the model has no template; [`Error::Format`] when
    /// the template does not compile; [`Error::InvalidArgument`] when rendering fails,
    /// including a `raise_exception` from the template (its message is kept).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template().ok_or_else(|| {
            Error::Unsupported(
                "this model has no chat template (tokenizer.chat_template / chat_template)".into(),
            )
        })?;
        chat::render(
            template,
            messages,
            add_generation_prompt,
            self.inner.bos_text.as_deref().unwrap_or(""),
            self.inner.eos_text.as_deref().unwrap_or(""),
        )
    }

    /// The underlying `tokenizers` pipeline. For GGUF vocabularies it tokenizes text that
    /// has had llama.cpp's special tokens split out already (special tokens are not split
    /// again); prefer [`Tokenizer::encode`].
    pub fn hf_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner.hf
    }

    /// Serializes the vocabulary as a Hugging Face `tokenizer.json` (for a GGUF vocabulary:
    /// the equivalent pipeline, with control and user-defined tokens as added tokens).
    ///
    /// Errors: [`Error::Internal`] if serialization fails.
    pub fn to_hf_json(&self, pretty: bool) -> Result<String> {
        let mut t = self.inner.hf.clone();
        t.set_encode_special_tokens(false);
        t.to_string(pretty).map_err(|e| tk_err("serialize", e))
    }
}

/// Settings a `tokenizer.json` takes from the files around it.
#[derive(Debug, Default)]
struct HfConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    chat_template: Option<String>,
    generation_eos: Vec<u64>,
    config_path: Option<std::path::PathBuf>,
}

/// `"text"` or `{"content": "text", ...}` (tokenizer_config.json's token entries).
fn token_content(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `"template"` or `[{"name": "default", "template": "..."}, ...]`.
fn template_from_config(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |name: &str| {
                list.iter().find_map(|e| {
                    (e.get("name")?.as_str()? == name)
                        .then(|| e.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            named("default").or_else(|| {
                list.first()
                    .and_then(|e| e.get("template")?.as_str().map(str::to_string))
            })
        }
        _ => None,
    }
}

/// Whether a `tokenizer.json` component (or one inside a `Sequence`) has `"type": ty`.
fn json_mentions_type(v: Option<&Json>, ty: &str) -> bool {
    match v {
        Some(Json::Object(o)) => {
            o.get("type").and_then(Json::as_str) == Some(ty)
                || o.values().any(|c| json_mentions_type(Some(c), ty))
        }
        Some(Json::Array(a)) => a.iter().any(|c| json_mentions_type(Some(c), ty)),
        _ => false,
    }
}

/// A piece of input text after special tokens were split out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// llama.cpp's `tokenizer_st_partition`: for each special token, longest first, split every
/// remaining text fragment at each of its occurrences. Control and unknown tokens take part
/// only when `parse_special` is set.
fn partition<'t>(
    text: &'t str,
    specials: &[GgufSpecial],
    parse_special: bool,
) -> Vec<Fragment<'t>> {
    let mut frags = vec![Fragment::Text(text)];
    for sp in specials {
        if !parse_special && sp.attr & (attr::CONTROL | attr::UNKNOWN) != 0 {
            continue;
        }
        let needle = sp.text.as_str();
        if !frags
            .iter()
            .any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)))
        {
            continue;
        }
        let mut next = Vec::with_capacity(frags.len() + 2);
        for f in frags {
            match f {
                Fragment::Text(mut t) => {
                    while let Some(pos) = t.find(needle) {
                        if pos > 0 {
                            next.push(Fragment::Text(&t[..pos]));
                        }
                        next.push(Fragment::Token(sp.id));
                        t = &t[pos + needle.len()..];
                    }
                    if !t.is_empty() {
                        next.push(Fragment::Text(t));
                    }
                }
                tok => next.push(tok),
            }
        }
        frags = next;
    }
    frags
}

/// `<0xNN>` -> the byte.
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The byte a GPT-2 byte-level character stands for.
pub(crate) fn byte_of_char(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(c as u8),
        0x100..=0x143 => {
            // The 68 bytes without a printable stand-in, in order: 0x00-0x20, 0x7F-0xA0, 0xAD.
            let k = c - 0x100;
            Some(match k {
                0..=32 => k as u8,
                33..=66 => (0x7F + (k - 33)) as u8,
                _ => 0xAD,
            })
        }
        _ => None,
    }
}

/// The GPT-2 byte-level character standing for byte `b`.
#[cfg(test)]
pub(crate) fn char_of_byte(b: u8) -> char {
    let c = match b {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => b as u32,
        0x00..=0x20 => 0x100 + b as u32,
        0x7F..=0xA0 => 0x100 + 33 + (b as u32 - 0x7F),
        _ => 0x143, // 0xAD
    };
    char::from_u32(c).unwrap_or('\u{FFFD}')
}

/// Decodes a byte-level BPE token text to its bytes (characters outside the byte alphabet
/// are kept as their UTF-8).
pub(crate) fn byte_level_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match byte_of_char(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// Token id lookup by exact token text, for callers building prompts by hand.
impl Tokenizer {
    /// The id of the token whose text is exactly `text` (a special token such as
    /// `<|im_end|>`, or a vocabulary entry in the model's own spelling).
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        match &self.inner.mode {
            Mode::Gguf { specials, .. } => specials
                .iter()
                .find(|s| s.text == text)
                .map(|s| s.id)
                .or_else(|| self.inner.hf.token_to_id(text)),
            Mode::Hf => self.inner.hf.token_to_id(text),
        }
    }
}

#[cfg(test)]
mod tests;
