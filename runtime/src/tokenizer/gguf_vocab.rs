//! GGUF vocabularies (`tokenizer.ggml.*`) turned into a `tokenizers` pipeline that produces
//! llama.cpp's token ids.
//!
//! Two vocabulary kinds are read:
//!
//! - `gpt2`: byte-level BPE. The tokens and `"a b"` merges become a [`BPE`] model (with
//!   `ignore_merges` where llama.cpp sets it), the pre-tokenizer named by `tokenizer.ggml.pre`
//!   becomes the same sequence of regex splits llama.cpp runs (each regex isolates its matches,
//!   the text between matches stays a piece of its own), followed by the GPT-2 byte mapping.
//! - `llama`: SentencePiece. llama.cpp merges the adjacent pair whose concatenation is the
//!   highest-scoring vocabulary token; that is a BPE whose merges are every split of every
//!   token into two tokens, ranked by the merged token's score (the way HF's SentencePiece
//!   converters build them), with `<0xNN>` byte fallback. Spaces become `▁` and every text
//!   fragment gets a leading `▁` when `tokenizer.ggml.add_space_prefix` is on (default).
//!
//! Special tokens are split out before any of this, exactly as llama.cpp's
//! `tokenizer_st_partition` does: control, user-defined and unknown tokens, longest text
//! first; control and unknown ones only when the caller asks to parse special tokens. Token
//! attributes and the end-of-generation set follow llama.cpp's loader, including its
//! auto-detection by token text (`<|im_end|>`, `<|eot_id|>`, FIM tokens, ...).
//!
//! Deliberate differences from llama.cpp, all about malformed files: a token-type, score or
//! special-token id that does not fit the vocabulary, a merge that names an unknown token and
//! a missing or unparsable required key are errors here (llama.cpp warns and falls back, or
//! crashes); a `gpt2` vocabulary without BOS/EOS keys has no BOS/EOS (llama.cpp defaults both
//! to id 11). Per-model token attributes llama.cpp sets by model name (`lstrip`/`rstrip` for
//! Phi-3, Jina and ModernBERT masks) are not applied, nor is llama.cpp's optional
//! `clean_spaces` detokenization pass (see [`Tokenizer::decode`](super::Tokenizer::decode)).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::{attr, byte_level_decode, parse_byte_token, GgufSpecial, Inner, Mode};
use crate::error::{Error, Result};
use crate::format::gguf::GgufFile;

/// The `tokenizer.ggml.*` metadata of a GGUF file, read but not yet checked.
#[derive(Debug, Clone, Default)]
pub(crate) struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2`, `llama`, ...
    pub model: String,
    /// `tokenizer.ggml.pre` (BPE pre-tokenizer name).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte).
    pub token_types: Option<Vec<i64>>,
    /// `tokenizer.ggml.scores` (SentencePiece piece scores).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.merges`, `"left right"` strings, best first.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u64>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u64>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u64>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u64>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot: Option<u64>,
    /// `tokenizer.ggml.eom_token_id`.
    pub eom: Option<u64>,
    /// `tokenizer.ggml.fim_{pre,suf,mid,pad,rep,sep}_token_id`, in that order.
    pub fim: [Option<u64>; 6],
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

const FIM_KEYS: [&str; 6] = [
    "tokenizer.ggml.fim_pre_token_id",
    "tokenizer.ggml.fim_suf_token_id",
    "tokenizer.ggml.fim_mid_token_id",
    "tokenizer.ggml.fim_pad_token_id",
    "tokenizer.ggml.fim_rep_token_id",
    "tokenizer.ggml.fim_sep_token_id",
];

impl GgufVocab {
    /// Reads the tokenizer keys of `g`.
    ///
    /// Errors: [`Error::Format`] when a key holds the wrong type or `tokenizer.ggml.model` /
    /// `tokenizer.ggml.tokens` is missing.
    pub fn read(g: &GgufFile) -> Result<GgufVocab> {
        let missing =
            |key: &str| Error::format(g.path(), format!("missing tokenizer key \"{key}\""));
        let model = g
            .get_str("tokenizer.ggml.model")?
            .ok_or_else(|| missing("tokenizer.ggml.model"))?
            .to_string();
        let strings = |key: &str| -> Result<Option<Vec<String>>> {
            Ok(g.get_str_array(key)?
                .map(|v| v.into_iter().map(str::to_string).collect()))
        };
        let mut fim = [None; 6];
        for (slot, key) in fim.iter_mut().zip(FIM_KEYS) {
            *slot = g.get_u64(key)?;
        }
        Ok(GgufVocab {
            pre: g.get_str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens: if matches!(model.as_str(), "gpt2" | "llama") {
                strings("tokenizer.ggml.tokens")?.ok_or_else(|| missing("tokenizer.ggml.tokens"))?
            } else {
                Vec::new() // rejected by `build` with a clearer message
            },
            token_types: g.get_i64_array("tokenizer.ggml.token_type")?,
            scores: g.get_f32_array("tokenizer.ggml.scores")?,
            merges: strings("tokenizer.ggml.merges")?,
            bos: g.get_u64("tokenizer.ggml.bos_token_id")?,
            eos: g.get_u64("tokenizer.ggml.eos_token_id")?,
            unk: g.get_u64("tokenizer.ggml.unknown_token_id")?,
            pad: g.get_u64("tokenizer.ggml.padding_token_id")?,
            eot: g.get_u64("tokenizer.ggml.eot_token_id")?,
            eom: g.get_u64("tokenizer.ggml.eom_token_id")?,
            fim,
            add_bos: g.get_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: g.get_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: g.get_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: g.get_str("tokenizer.chat_template")?.map(str::to_string),
            model,
        })
    }
}

// --- pre-tokenizers -------------------------------------------------------------------------

/// GPT-2's split, used alone or as a stage by many vocabularies.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split (case-insensitive contractions spelled out as llama.cpp does).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split: as Llama 3 but one digit at a time.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split (upper/lower case runs through lookaheads, as llama.cpp adapts it).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o / Llama 4 split.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// CJK ranges shared by the DeepSeek splits.
const DEEPSEEK_CJK: &str = "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+";
/// DeepSeek LLM's Latin/Greek/Cyrillic/... letter runs (llama.cpp's literal class).
const DEEPSEEK_LETTERS: &str = "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+";

/// How a BPE vocabulary's text is split before the merges run, plus the flags llama.cpp ties
/// to the pre-tokenizer name.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PreTokenizerSpec {
    /// Canonical name (the llama.cpp `LLAMA_VOCAB_PRE_TYPE_*` it maps to, lower case).
    pub name: &'static str,
    /// Regexes applied in order; each isolates its matches within the current pieces.
    pub regexes: &'static [&'static str],
    /// A whole pre-token that is itself a vocabulary token is taken as is (Llama 3, Tekken).
    pub ignore_merges: bool,
    /// Default of `add_bos_token` when the file does not say.
    pub add_bos: bool,
    /// The vocabulary has no BOS token (ChatGLM).
    pub no_bos: bool,
}

impl PreTokenizerSpec {
    const fn new(name: &'static str, regexes: &'static [&'static str]) -> Self {
        PreTokenizerSpec {
            name,
            regexes,
            ignore_merges: false,
            add_bos: false,
            no_bos: false,
        }
    }
    const fn llama3_flags(mut self) -> Self {
        self.ignore_merges = true;
        self.add_bos = true;
        self
    }
}

const SPEC_DEFAULT: PreTokenizerSpec = PreTokenizerSpec::new(
    "default",
    &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
);
const SPEC_GPT2: PreTokenizerSpec = PreTokenizerSpec::new("gpt2", &[GPT2]);
const SPEC_LLAMA3: PreTokenizerSpec = PreTokenizerSpec::new("llama3", &[LLAMA3]);
const SPEC_STARCODER: PreTokenizerSpec = PreTokenizerSpec::new("starcoder", &[r"\p{N}", GPT2]);
const SPEC_QWEN2: PreTokenizerSpec = PreTokenizerSpec::new("qwen2", &[QWEN2]);
const SPEC_DEEPSEEK_LLM: PreTokenizerSpec = PreTokenizerSpec::new(
    "deepseek-llm",
    &[
        "[\r\n]",
        DEEPSEEK_LETTERS,
        "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
        r"\s+$",
        DEEPSEEK_CJK,
        r"\p{N}+",
    ],
);
const SPEC_DEEPSEEK_CODER: PreTokenizerSpec = PreTokenizerSpec::new(
    "deepseek-coder",
    &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"],
);
const SPEC_DEEPSEEK3: PreTokenizerSpec = PreTokenizerSpec::new(
    "deepseek3-llm",
    &[
        r"\p{N}{1,3}",
        "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
        r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
    ],
);
const SPEC_FALCON: PreTokenizerSpec = PreTokenizerSpec::new(
    "falcon",
    &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
);
const SPEC_TEKKEN: PreTokenizerSpec = PreTokenizerSpec::new("tekken", &[TEKKEN]).llama3_flags();
const SPEC_GPT4O: PreTokenizerSpec = PreTokenizerSpec::new("gpt-4o", &[GPT4O]);
const SPEC_BLOOM: PreTokenizerSpec = PreTokenizerSpec::new(
    "bloom",
    &[" ?[^(\\s|.,!?\u{2026}\u{3002}\u{ff0c}\u{3001}\u{964}\u{6d4}\u{60c})]+"],
);

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre = pre`, and whether the name is
/// known (unknown names fall back to GPT-2's split; a missing name means llama.cpp's
/// `default`).
pub(crate) fn pre_tokenizer_spec(pre: Option<&str>) -> (PreTokenizerSpec, bool) {
    let Some(pre) = pre else {
        return (SPEC_DEFAULT, true);
    };
    let spec = match pre {
        "" | "default" => SPEC_DEFAULT,
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "gigachat" | "exaone4" | "mellum"
        | "a.x-4.0" | "trillion" | "granite-docling" => SPEC_GPT2,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => SPEC_LLAMA3.llama3_flags(),
        "dbrx" | "smaug-bpe" => SPEC_LLAMA3,
        "glm4" | "chatglm-bpe" => PreTokenizerSpec {
            no_bos: true,
            ..SPEC_LLAMA3
        },
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            SPEC_STARCODER
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open"
        | "stablelm2" | "megrez" => SPEC_QWEN2,
        "deepseek-llm" => SPEC_DEEPSEEK_LLM,
        "deepseek-coder" => SPEC_DEEPSEEK_CODER,
        "deepseek-v3" => SPEC_DEEPSEEK3,
        "falcon" => SPEC_FALCON,
        "tekken" => SPEC_TEKKEN,
        "gpt-4o" | "llama4" => SPEC_GPT4O,
        "bloom" | "gpt3-finnish" | "poro-chat" => SPEC_BLOOM,
        _ => return (SPEC_GPT2, false),
    };
    (spec, true)
}

/// The `tokenizers` pre-tokenizer for `spec`: its regex splits, then the GPT-2 byte mapping.
pub(crate) fn byte_level_pre_tokenizer(spec: &PreTokenizerSpec) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for re in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| {
            Error::Internal(format!(
                "pre-tokenizer \"{}\": regex {re:?} does not compile: {e}",
                spec.name
            ))
        })?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(PreTokenizerSequence::new(steps).into())
}

// --- token attributes and special tokens -----------------------------------------------------

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_TEXTS: [&[&str]; 6] = [
    &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ],
    &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ],
    &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ],
    &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ],
    &["<|file_sep|>"],
];
/// Token texts llama.cpp treats as end of generation wherever they are in the vocabulary.
pub(crate) const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

fn attr_of_type(t: i64) -> u8 {
    match t {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => 0, // undefined: never rendered, never split out
    }
}

/// Checks an id key against the vocabulary size.
fn check_id(path: Option<&Path>, key: &str, id: Option<u64>, n: usize) -> Result<Option<u32>> {
    match id {
        None => Ok(None),
        Some(v) if v < n as u64 => Ok(Some(v as u32)),
        Some(v) => Err(Error::format(
            path,
            format!("tokenizer key \"{key}\" = {v} is out of range (vocabulary has {n} tokens)"),
        )),
    }
}

// --- building ---------------------------------------------------------------------------------

/// Builds the tokenizer for a GGUF vocabulary. `path` names the file in errors.
pub(crate) fn build(v: GgufVocab, path: Option<&Path>) -> Result<Inner> {
    let spm = match v.model.as_str() {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(Error::Unsupported(format!(
                "GGUF tokenizer model \"{other}\"{}: Ember reads \"gpt2\" (byte-level BPE) and \
                 \"llama\" (SentencePiece) vocabularies",
                path.map(|p| format!(" in {}", p.display()))
                    .unwrap_or_default()
            )))
        }
    };
    let bad = |detail: String| Error::format(path, detail);
    let n = v.tokens.len();
    if n == 0 {
        return Err(bad("tokenizer.ggml.tokens is empty".into()));
    }
    if n > i32::MAX as usize {
        return Err(bad(format!(
            "tokenizer.ggml.tokens has {n} tokens, too many"
        )));
    }

    // Token texts (llama.cpp renames empty ones) and the text -> id map; duplicates are fatal.
    let mut texts = v.tokens;
    let mut ids: HashMap<String, u32> = HashMap::with_capacity(n);
    for (i, t) in texts.iter_mut().enumerate() {
        if t.is_empty() {
            log::warn!("tokenizer: empty token at index {i}");
            *t = format!("[EMPTY_{i}]");
        }
        if let Some(prev) = ids.insert(t.clone(), i as u32) {
            return Err(bad(format!(
                "duplicate token {t:?} in tokenizer.ggml.tokens (ids {prev} and {i})"
            )));
        }
    }

    // Attributes from token types.
    let mut attrs = match &v.token_types {
        None => vec![attr::NORMAL; n],
        Some(tt) if tt.len() != n => {
            return Err(bad(format!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n}",
                tt.len()
            )))
        }
        Some(tt) => tt.iter().map(|&t| attr_of_type(t)).collect(),
    };
    if let Some(s) = &v.scores {
        if s.len() != n {
            return Err(bad(format!(
                "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {n}",
                s.len()
            )));
        }
    }

    // Pre-tokenizer flags (BPE only).
    let spec = if spm {
        None
    } else {
        let (spec, known) = pre_tokenizer_spec(v.pre.as_deref());
        match (&v.pre, known) {
            (None, _) => log::warn!(
                "tokenizer: GGUF has no tokenizer.ggml.pre; using llama.cpp's \"default\" \
                 pre-tokenizer (token ids may differ from the original tokenizer)"
            ),
            (Some(p), false) => log::warn!(
                "tokenizer: unknown pre-tokenizer \"{p}\"; falling back to GPT-2's split \
                 (token ids may differ from llama.cpp)"
            ),
            _ => {}
        }
        Some(spec)
    };

    // Special ids: llama.cpp's defaults for SentencePiece, the file's keys otherwise.
    let check = |key: &str, id| check_id(path, key, id, n);
    let spm_default = |d: u64| {
        if spm && (d as usize) < n {
            Some(d)
        } else {
            None
        }
    };
    let mut bos = check(
        "tokenizer.ggml.bos_token_id",
        v.bos.or_else(|| spm_default(1)),
    )?;
    let eos = check(
        "tokenizer.ggml.eos_token_id",
        v.eos.or_else(|| spm_default(2)),
    )?;
    let unk = check(
        "tokenizer.ggml.unknown_token_id",
        v.unk.or_else(|| spm_default(0)),
    )?;
    check("tokenizer.ggml.padding_token_id", v.pad)?;
    if spec.as_ref().is_some_and(|s| s.no_bos) {
        bos = None;
    }
    let mut eot = check("tokenizer.ggml.eot_token_id", v.eot)?;
    let mut eom = check("tokenizer.ggml.eom_token_id", v.eom)?;
    let mut fim = [None; 6];
    for i in 0..6 {
        fim[i] = check(FIM_KEYS[i], v.fim[i])?;
    }
    let add_bos = v
        .add_bos
        .unwrap_or(spm || spec.as_ref().is_some_and(|s| s.add_bos));
    let add_eos = v.add_eos.unwrap_or(false);
    if add_bos && bos.is_none() {
        return Err(bad(
            "tokenizer.ggml.add_bos_token is true but the vocabulary has no BOS token".into(),
        ));
    }
    if add_eos && eos.is_none() {
        return Err(bad(
            "tokenizer.ggml.add_eos_token is true but the vocabulary has no EOS token".into(),
        ));
    }

    // llama.cpp's auto-detection by text: EOT/EOM/FIM tokens become control tokens.
    let find_first = |candidates: &[&str]| -> Option<u32> {
        texts
            .iter()
            .position(|t| candidates.contains(&t.as_str()))
            .map(|i| i as u32)
    };
    let mut force_control = Vec::new();
    if eot.is_none() {
        eot = find_first(EOT_TEXTS);
        force_control.extend(eot);
    }
    if eom.is_none() {
        eom = find_first(EOM_TEXTS);
        force_control.extend(eom);
    }
    for (slot, candidates) in fim.iter_mut().zip(FIM_TEXTS) {
        if slot.is_none() {
            *slot = find_first(candidates);
            force_control.extend(*slot);
        }
    }
    for id in force_control {
        attrs[id as usize] |= attr::CONTROL;
    }
    // Control tokens named "unused" are unused.
    for (a, t) in attrs.iter_mut().zip(&texts) {
        if *a & attr::CONTROL != 0 && t.contains("unused") {
            *a |= attr::UNUSED;
        }
    }
    // End of generation: FIM pad/repo/sep, every EOG-looking token (made control), eos/eot/eom.
    let mut eog: BTreeSet<u32> = fim[3..].iter().flatten().copied().collect();
    for (i, t) in texts.iter().enumerate() {
        if EOG_TEXTS.contains(&t.as_str()) {
            eog.insert(i as u32);
            attrs[i] |= attr::CONTROL;
        }
    }
    // gpt-oss: these are always rendered.
    for (i, t) in texts.iter().enumerate() {
        if matches!(
            t.as_str(),
            "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
        ) {
            attrs[i] = attr::USER_DEFINED;
        }
    }
    eog.extend(eos);
    eog.extend(eot);
    eog.extend(eom);
    let find_eog = |eog: &BTreeSet<u32>, s: &str| {
        eog.iter()
            .copied()
            .find(|&id| texts[id as usize].as_str() == s)
    };
    let has = |eog: &BTreeSet<u32>, s: &str| find_eog(eog, s).is_some();
    // o200k_harmony / solar-open: "<|end|>" is not an end of generation there.
    if (has(&eog, "<|return|>") && has(&eog, "<|call|>"))
        || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>"))
    {
        if let Some(id) = find_eog(&eog, "<|end|>") {
            eog.remove(&id);
            attrs[id as usize] = attr::USER_DEFINED;
        }
    }
    // Gemma 4 / PaddleOCR: "</s>" is not an end of generation there.
    if has(&eog, "<|tool_response>") {
        if let Some(id) = find_eog(&eog, "</s>") {
            eog.remove(&id);
            attrs[id as usize] = attr::NORMAL;
        }
    }

    // The special-token partition list, longest text first (ties by id, deterministic).
    let mut specials: Vec<GgufSpecial> = attrs
        .iter()
        .enumerate()
        .filter(|(_, &a)| a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
        .map(|(i, &a)| GgufSpecial {
            text: texts[i].clone(),
            id: i as u32,
            attr: a,
        })
        .collect();
    specials.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));

    // Raw bytes of every token (llama.cpp's token_to_piece with special = true).
    let pieces: Vec<Box<[u8]>> = texts
        .iter()
        .zip(&attrs)
        .map(|(t, &a)| token_piece(t, a, spm))
        .collect();

    // The tokenizers pipeline.
    let mut vocab = Vocab::with_capacity(n);
    for (i, t) in texts.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    let model = if spm {
        let merges = spm_merges(&texts, &attrs, v.scores.as_deref(), &ids);
        let mut b = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true);
        if let Some(u) = unk {
            b = b.unk_token(texts[u as usize].clone());
        }
        b.build()
            .map_err(|e| bad(format!("cannot build the SentencePiece model: {e}")))?
    } else {
        let raw = v
            .merges
            .as_deref()
            .ok_or_else(|| bad("gpt2 vocabulary without tokenizer.ggml.merges".into()))?;
        let merges = bpe_merges(raw, &ids, path)?;
        BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(spec.as_ref().is_some_and(|s| s.ignore_merges))
            .build()
            .map_err(|e| bad(format!("cannot build the BPE model: {e}")))?
    };
    let mut hf = tokenizers::Tokenizer::new(model);
    let add_space_prefix = v.add_space_prefix.unwrap_or(spm);
    if let Some(spec) = &spec {
        hf.with_pre_tokenizer(Some(byte_level_pre_tokenizer(spec)?));
        hf.with_decoder(Some(ByteLevel::new(false, false, false)));
    } else {
        let escape = Replace::new(" ", "▁")
            .map_err(|e| Error::Internal(format!("tokenizer normalizer: {e}")))?;
        let mut steps: Vec<NormalizerWrapper> = Vec::new();
        if add_space_prefix {
            steps.push(Prepend::new("▁".into()).into());
        }
        steps.push(escape.into());
        hf.with_normalizer(Some(NormalizerSequence::new(steps)))
            .map_err(|e| Error::Internal(format!("tokenizer normalizer: {e}")))?;
        let unescape = Replace::new("▁", " ")
            .map_err(|e| Error::Internal(format!("tokenizer decoder: {e}")))?;
        let mut dec: Vec<DecoderWrapper> = vec![
            unescape.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            dec.push(Strip::new(' ', 1, 0).into());
        }
        hf.with_decoder(Some(DecoderSequence::new(dec)));
    }
    // Control/unknown tokens are special added tokens, user-defined ones plain added tokens.
    // Encoding splits them out itself (llama.cpp's partition), so the HF tokenizer is told
    // not to split special ones again: raw text that still holds them is text.
    let special: Vec<AddedToken> = specials
        .iter()
        .filter(|s| s.attr & attr::USER_DEFINED == 0)
        .map(|s| AddedToken::from(s.text.clone(), true).normalized(false))
        .collect();
    let user: Vec<AddedToken> = specials
        .iter()
        .filter(|s| s.attr & attr::USER_DEFINED != 0)
        .map(|s| AddedToken::from(s.text.clone(), false).normalized(false))
        .collect();
    hf.add_special_tokens(special)
        .map_err(|e| Error::Internal(format!("tokenizer special tokens: {e}")))?;
    hf.add_tokens(user)
        .map_err(|e| Error::Internal(format!("tokenizer added tokens: {e}")))?;
    hf.set_encode_special_tokens(true);

    let bos_text = bos.map(|b| texts[b as usize].clone());
    let eos_text = eos.map(|e| texts[e as usize].clone());
    Ok(Inner {
        hf,
        hf_plain: None,
        mode: Mode::Gguf {
            specials,
            add_space_prefix,
        },
        pieces,
        attrs,
        bos,
        eos,
        add_bos,
        add_eos,
        eog: eog.into_iter().collect(),
        chat_template: v.chat_template,
        bos_text,
        eos_text,
        description: match &spec {
            Some(s) => format!("GGUF gpt2 (pre-tokenizer {})", s.name),
            None => "GGUF llama (SentencePiece)".to_string(),
        },
    })
}

/// Raw bytes of a token as llama.cpp renders it with `special = true`.
fn token_piece(text: &str, a: u8, spm: bool) -> Box<[u8]> {
    if a & (attr::CONTROL | attr::UNKNOWN | attr::USER_DEFINED) != 0 {
        text.as_bytes().into()
    } else if a & attr::NORMAL != 0 {
        if spm {
            text.replace('▁', " ").into_bytes().into()
        } else {
            byte_level_decode(text).into()
        }
    } else if a & attr::BYTE != 0 {
        match parse_byte_token(text) {
            Some(b) => Box::new([b]),
            None if !spm => byte_level_decode(text).into(),
            None => text.as_bytes().into(),
        }
    } else {
        Box::default() // unused / undefined tokens render as nothing
    }
}

/// Parses GGUF `"left right"` merges, keeping the first rank of a duplicated pair (as
/// llama.cpp does) and checking that both sides and their concatenation are tokens.
fn bpe_merges(
    raw: &[String],
    ids: &HashMap<String, u32>,
    path: Option<&Path>,
) -> Result<Vec<(String, String)>> {
    let mut seen: std::collections::HashSet<(&str, &str)> =
        std::collections::HashSet::with_capacity(raw.len());
    let mut merges = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte (so " a" + ... works).
        let split = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(p, _)| p);
        let Some(p) = split else {
            return Err(Error::format(
                path,
                format!(
                    "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
                ),
            ));
        };
        let (a, b) = (&m[..p], &m[p + 1..]);
        for side in [a, b] {
            if !ids.contains_key(side) {
                return Err(Error::format(
                    path,
                    format!("tokenizer.ggml.merges[{i}] = {m:?} names unknown token {side:?}"),
                ));
            }
        }
        let merged = format!("{a}{b}");
        if !ids.contains_key(&merged) {
            return Err(Error::format(
                path,
                format!(
                    "tokenizer.ggml.merges[{i}] = {m:?} makes {merged:?}, which is not a token"
                ),
            ));
        }
        if seen.insert((a, b)) {
            merges.push((a.to_string(), b.to_string()));
        }
    }
    Ok(merges)
}

/// SentencePiece merges: every split of every (non-byte) token into two tokens, ranked by
/// the merged token's score, best first (ties: lower merged id, then shorter left part).
fn spm_merges(
    texts: &[String],
    attrs: &[u8],
    scores: Option<&[f32]>,
    ids: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let score = |id: u32| {
        scores
            .and_then(|s| s.get(id as usize))
            .copied()
            .unwrap_or(0.0)
    };
    let mut cands: Vec<(f32, u32, usize)> = Vec::new(); // (score, merged id, split byte offset)
    for (id, t) in texts.iter().enumerate() {
        if attrs[id] & attr::BYTE != 0 {
            continue;
        }
        for (p, _) in t.char_indices().skip(1) {
            if ids.contains_key(&t[..p]) && ids.contains_key(&t[p..]) {
                cands.push((score(id as u32), id as u32, p));
            }
        }
    }
    // NaN scores sort last.
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    cands.sort_by(|x, y| {
        key(y.0)
            .total_cmp(&key(x.0))
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
    });
    cands
        .into_iter()
        .map(|(_, id, p)| {
            let t = &texts[id as usize];
            (t[..p].to_string(), t[p..].to_string())
        })
        .collect()
}
