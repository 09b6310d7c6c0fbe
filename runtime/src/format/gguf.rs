//! GGUF: llama.cpp's single-file model format — Ember's own bounds-checked reader and a
//! writer.
//!
//! ## Layout (little-endian)
//! ```text
//! magic "GGUF" | u32 version (2, 3) | u64 n_tensors | u64 n_kv
//! n_kv x      { key: string, u32 value type, value }
//! n_tensors x { name: string, u32 n_dims, n_dims x u64 dims (ne[0] first), u32 ggml type, u64 offset }
//! padding to `general.alignment` (default 32)
//! data section: tensor data, each at `data start + offset`, offsets multiples of the alignment
//! ```
//! A string is a u64 byte length followed by UTF-8 bytes; an array is a u32 element type,
//! a u64 count and the elements (arrays may nest).
//!
//! ## Checks
//! The file is untrusted. [`GgufFile::open`] and [`GgufFile::from_bytes`] check, before
//! anything is used: the magic and version; every length and count against the bytes left in
//! the file (so a file claiming 2^60 tensors or a 2^40-byte string fails at once, without a
//! large allocation); UTF-8 of every string; bool bytes (0 or 1); value types; array nesting
//! (at most [`MAX_ARRAY_DEPTH`] levels) and the total number of metadata values (at most
//! [`MAX_METADATA_VALUES`]); duplicate keys; `general.alignment` (a u32, a nonzero power of
//! two); per tensor: a unique name, 1 to [`MAX_DIMS`] dims whose product fits in a u64, a
//! supported type (F32, F16, BF16 or a [`QuantType`]), `ne[0]` a multiple of the block size,
//! an aligned offset, data inside the file; and that no two tensors' data overlap. Errors are
//! [`Error::Format`] naming the byte offset, key or tensor ([`Error::Unsupported`] for a
//! version or tensor type Ember does not read).
//!
//! ## Example
//! ```
//! use ember::format::gguf::{GgufFile, GgufWriter, TensorType, Value};
//! let mut w = GgufWriter::new();
//! w.add("general.architecture", "llama");
//! w.add("llama.block_count", 2u32);
//! let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect();
//! w.add_tensor("output_norm.weight", &[4], TensorType::F32, data);
//! let file = GgufFile::from_bytes(w.to_bytes()?)?;
//! assert_eq!(file.architecture()?, "llama");
//! assert_eq!(file.get_u64("llama.block_count")?, Some(2));
//! let t = file.tensor("output_norm.weight").unwrap();
//! assert_eq!(file.tensor_f32(t)?, vec![1.0, 2.0, 3.0, 4.0]);
//! # Ok::<(), ember::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::quant::QuantType;

/// The file magic.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when the file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the data alignment (a u32).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest array nesting accepted in metadata (an array of arrays is 2 levels).
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Most metadata values (array elements included) a file may hold. Real models hold a
/// few hundred thousand (the tokenizer arrays); the cap bounds the memory a hostile file can
/// make the reader allocate (each value takes 32 bytes in memory, a u8 takes 1 in the file).
pub const MAX_METADATA_VALUES: u64 = 1 << 24;

// GGUF metadata value type codes.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Smallest tensor info in bytes: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 8 + 4 + 8;
/// Smallest key/value in bytes: key length, value type, a one-byte value.
const MIN_KV_BYTES: usize = 8 + 4 + 1;

/// Name of a GGUF value type code, for messages.
fn value_type_name(code: u32) -> &'static str {
    match code {
        T_U8 => "u8",
        T_I8 => "i8",
        T_U16 => "u16",
        T_I16 => "i16",
        T_U32 => "u32",
        T_I32 => "i32",
        T_F32 => "f32",
        T_BOOL => "bool",
        T_STRING => "string",
        T_ARRAY => "array",
        T_U64 => "u64",
        T_I64 => "i64",
        T_F64 => "f64",
        _ => "unknown",
    }
}

/// Fewest bytes a value of type `code` takes in a file (`None` for an unknown code).
fn min_value_bytes(code: u32) -> Option<usize> {
    match code {
        T_U8 | T_I8 | T_BOOL => Some(1),
        T_U16 | T_I16 => Some(2),
        T_U32 | T_I32 | T_F32 => Some(4),
        T_U64 | T_I64 | T_F64 | T_STRING => Some(8),
        T_ARRAY => Some(12),
        _ => None,
    }
}

/// ggml's name for a type id, for every type current ggml defines (`None` for ids it does
/// not, including retired ones).
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return None,
    })
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 12.
    F64(f64),
    /// GGUF type 7 (stored as one byte, 0 or 1).
    Bool(bool),
    /// GGUF type 8 (UTF-8).
    String(String),
    /// GGUF type 9. In a file every element has the same type (checked by [`GgufWriter`]);
    /// the element type of an empty array is not kept.
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF type code of this value.
    pub fn type_code(&self) -> u32 {
        match self {
            Value::U8(_) => T_U8,
            Value::I8(_) => T_I8,
            Value::U16(_) => T_U16,
            Value::I16(_) => T_I16,
            Value::U32(_) => T_U32,
            Value::I32(_) => T_I32,
            Value::U64(_) => T_U64,
            Value::I64(_) => T_I64,
            Value::F32(_) => T_F32,
            Value::F64(_) => T_F64,
            Value::Bool(_) => T_BOOL,
            Value::String(_) => T_STRING,
            Value::Array(_) => T_ARRAY,
        }
    }

    /// The type's name as messages print it (`u32`, `string`, `array`, ...).
    pub fn type_name(&self) -> &'static str {
        value_type_name(self.type_code())
    }

    /// The value as a u64, for any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an i64, for any integer type whose value fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as an f64, for floats and integers (64-bit integers beyond 2^53 round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a bool, for [`Value::Bool`] only.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as a string, for [`Value::String`] only.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, for [`Value::Array`] only.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description for messages: the type and, for scalars, the value.
    fn describe(&self) -> String {
        match self {
            Value::String(s) if s.len() <= 40 => format!("the string {s:?}"),
            Value::String(s) => format!("a string of {} bytes", s.len()),
            Value::Array(a) => match a.first() {
                Some(v) => format!("an array of {} {} values", a.len(), v.type_name()),
                None => "an empty array".to_string(),
            },
            Value::U8(v) => format!("the u8 {v}"),
            Value::I8(v) => format!("the i8 {v}"),
            Value::U16(v) => format!("the u16 {v}"),
            Value::I16(v) => format!("the i16 {v}"),
            Value::U32(v) => format!("the u32 {v}"),
            Value::I32(v) => format!("the i32 {v}"),
            Value::U64(v) => format!("the u64 {v}"),
            Value::I64(v) => format!("the i64 {v}"),
            Value::F32(v) => format!("the f32 {v}"),
            Value::F64(v) => format!("the f64 {v}"),
            Value::Bool(v) => format!("the bool {v}"),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Value {
                Value::$v(x)
            }
        }
    )*};
}
value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64,
    i64 => I64, f32 => F32, f64 => F64, bool => Bool, String => String, Vec<Value> => Array);

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_string())
    }
}

/// The element type of a tensor: the float types and the [`QuantType`] block formats Ember
/// runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    /// 32-bit float, 4 bytes per element.
    F32,
    /// IEEE half, 2 bytes per element.
    F16,
    /// bfloat16, 2 bytes per element.
    BF16,
    /// A block-quantized format.
    Quant(QuantType),
}

impl TensorType {
    /// The type with ggml type id `id`, if Ember reads it.
    pub fn from_ggml_id(id: u32) -> Option<TensorType> {
        match id {
            0 => Some(TensorType::F32),
            1 => Some(TensorType::F16),
            30 => Some(TensorType::BF16),
            _ => QuantType::from_ggml_id(id).map(TensorType::Quant),
        }
    }

    /// ggml's type id (as in GGUF tensor infos).
    pub fn ggml_id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::BF16 => 30,
            TensorType::Quant(q) => q.ggml_id(),
        }
    }

    /// Name as ggml prints it (`F16`, `Q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            TensorType::F32 => "F32",
            TensorType::F16 => "F16",
            TensorType::BF16 => "BF16",
            TensorType::Quant(q) => q.name(),
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_elems(self) -> usize {
        match self {
            TensorType::Quant(q) => q.block_elems(),
            _ => 1,
        }
    }

    /// Bytes per block (bytes per element for the float types).
    pub fn block_bytes(self) -> usize {
        match self {
            TensorType::F32 => 4,
            TensorType::F16 | TensorType::BF16 => 2,
            TensorType::Quant(q) => q.block_bytes(),
        }
    }

    /// Bytes of a row of `cols` elements.
    ///
    /// Errors: [`Error::InvalidArgument`] when `cols` is not a multiple of the block size or
    /// the size overflows `usize`.
    pub fn row_bytes(self, cols: usize) -> Result<usize> {
        let be = self.block_elems();
        if cols % be != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} rows must be a multiple of {be} elements, got {cols}",
                self.name()
            )));
        }
        (cols / be).checked_mul(self.block_bytes()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "a {} row of {cols} elements overflows usize",
                self.name()
            ))
        })
    }
}

/// Element count and byte size of a tensor of type `ty` with dims `dims`; the error says
/// what is wrong (the caller adds where).
fn tensor_size(dims: &[u64], ty: TensorType) -> std::result::Result<(u64, u64), String> {
    let n = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dims {dims:?} overflow: the element count exceeds 2^64"))?;
    let be = ty.block_elems() as u64;
    let ne0 = dims.first().copied().unwrap_or(0);
    if ne0 % be != 0 {
        return Err(format!(
            "ne[0] = {ne0} is not a multiple of the {} block size {be}",
            ty.name()
        ));
    }
    let bytes = (n / be)
        .checked_mul(ty.block_bytes() as u64)
        .ok_or_else(|| format!("dims {dims:?}: the byte size overflows u64"))?;
    Ok((n, bytes))
}

/// Where a tensor lives in a [`GgufFile`] and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The name (`blk.0.attn_q.weight`), unique in its file.
    pub name: String,
    /// ggml dims, `dims[0]` = `ne[0]` first: the innermost, contiguous dimension. A matrix
    /// of `rows x cols` has dims `[cols, rows]`.
    pub dims: Vec<u64>,
    /// The element type.
    pub ty: TensorType,
    /// Absolute byte offset of the data from the start of the file.
    pub offset: u64,
    /// Byte size of the data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of rows: the product of `dims[1..]` (1 for a vector; saturating).
    pub fn rows(&self) -> u64 {
        self.dims
            .iter()
            .skip(1)
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Number of columns: `dims[0]`, the contiguous dimension (0 when `dims` is empty).
    pub fn cols(&self) -> u64 {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Number of elements: the product of the dims (saturating; files are checked not to
    /// overflow).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }
}

/// The bytes of a file: a read-only memory map or an owned buffer.
enum Data {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Mmap(m) => m,
            Data::Owned(v) => v,
        }
    }
}

/// A parsed, validated GGUF file: metadata, tensor infos and the bytes behind them.
///
/// Immutable after opening, `Send + Sync`. Opened from a path it memory-maps the file: the
/// file must not be modified or truncated while the `GgufFile` lives (as with any memory
/// map, that would change or invalidate the tensor data).
pub struct GgufFile {
    path: Option<PathBuf>,
    data: Data,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("bytes", &self.data.bytes().len())
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates the GGUF file at `path`, memory-mapping it.
    ///
    /// Errors: [`Error::Io`] when the file cannot be opened or mapped, [`Error::Format`] when
    /// it is malformed (see the module docs for every check), [`Error::Unsupported`] for a
    /// GGUF version other than 2 or 3 or a tensor type Ember does not read.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this `GgufFile`; as documented on
        // `GgufFile`, the file must not be modified while it is mapped. Every read through
        // the map is bounds-checked against its length.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let parsed = parse(&map, Some(path))?;
        Ok(parsed.into_file(Some(path.to_path_buf()), Data::Mmap(map)))
    }

    /// Parses and validates a GGUF file held in memory (tests, wasm, downloads).
    ///
    /// Errors: as [`GgufFile::open`], without the I/O ones.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        let parsed = parse(&bytes, None)?;
        Ok(parsed.into_file(None, Data::Owned(bytes)))
    }

    /// The file's path (`None` for [`GgufFile::from_bytes`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset where the data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.data.bytes().len() as u64
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    fn wrong_type(&self, key: &str, v: &Value, wanted: &str) -> Error {
        Error::format(
            self.path(),
            format!(
                "metadata key \"{key}\" holds {}, expected {wanted}",
                v.describe()
            ),
        )
    }

    /// Typed lookup: `None` when the key is absent, an error when `conv` rejects the value.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        wanted: &str,
        conv: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, wanted)),
        }
    }

    /// Key `key` as a u64: any integer type holding a non-negative value.
    ///
    /// Errors: [`Error::Format`] naming the key when it holds anything else.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// Key `key` as an f64: f32, f64 or any integer type.
    ///
    /// Errors: [`Error::Format`] naming the key when it holds anything else.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    /// Key `key` as a bool.
    ///
    /// Errors: [`Error::Format`] naming the key when it holds anything else.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    /// Key `key` as a string.
    ///
    /// Errors: [`Error::Format`] naming the key when it holds anything else.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    /// Key `key` as an array of strings (an empty array included).
    ///
    /// Errors: [`Error::Format`] naming the key when it holds anything else.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?.iter().map(Value::as_str).collect()
        })
    }

    /// Key `key` as an array of i64: elements of any integer type whose values fit.
    ///
    /// Errors: [`Error::Format`] naming the key when it holds anything else.
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.typed(key, "an array of integers", |v| {
            v.as_array()?.iter().map(Value::as_i64).collect()
        })
    }

    /// Key `key` as an array of f32: elements of f32, f64 (rounded) or integer types.
    ///
    /// Errors: [`Error::Format`] naming the key when it holds anything else.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.typed(key, "an array of numbers", |v| {
            v.as_array()?
                .iter()
                .map(|e| match *e {
                    Value::F32(x) => Some(x),
                    _ => e.as_f64().map(|x| x as f32),
                })
                .collect()
        })
    }

    /// The model architecture, `general.architecture` (`llama`, `qwen2`, ...).
    ///
    /// Errors: [`Error::Format`] when the key is missing or not a string.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?.ok_or_else(|| {
            Error::format(
                self.path(),
                "missing required metadata key \"general.architecture\"",
            )
        })
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// The raw bytes of tensor `t` (`t.n_bytes` of them, in the file's layout).
    ///
    /// Errors: [`Error::Format`] when `t` does not lie inside this file (an info from another
    /// file or edited by hand; infos of this file always do).
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<&[u8]> {
        let bytes = self.data.bytes();
        let range = usize::try_from(t.offset).ok().and_then(|start| {
            let len = usize::try_from(t.n_bytes).ok()?;
            Some(start..start.checked_add(len)?)
        });
        range.and_then(|r| bytes.get(r)).ok_or_else(|| {
            Error::format(
                self.path(),
                format!(
                    "tensor \"{}\": bytes {}..+{} lie outside the file ({} bytes)",
                    t.name,
                    t.offset,
                    t.n_bytes,
                    bytes.len()
                ),
            )
        })
    }

    /// The elements of tensor `t` as f32, in file order (`ne[0]` fastest): F16 and BF16
    /// converted exactly, quantized types dequantized with [`crate::quant::dequantize`].
    ///
    /// Errors: as [`GgufFile::tensor_data`], and [`Error::Format`] when the data length does
    /// not fit the type.
    pub fn tensor_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let data = self.tensor_data(t)?;
        let bb = t.ty.block_bytes();
        if data.len() % bb != 0 {
            return Err(Error::format(
                self.path(),
                format!(
                    "tensor \"{}\": {} bytes are not a whole number of {}-byte {} blocks",
                    t.name,
                    data.len(),
                    bb,
                    t.ty.name()
                ),
            ));
        }
        Ok(match t.ty {
            TensorType::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            TensorType::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            TensorType::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            TensorType::Quant(q) => crate::quant::dequantize(q, data)?,
        })
    }
}

/// Everything parsed from a file, before it is joined with the bytes.
struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl Parsed {
    fn into_file(self, path: Option<PathBuf>, data: Data) -> GgufFile {
        GgufFile {
            path,
            data,
            version: self.version,
            alignment: self.alignment,
            data_offset: self.data_offset,
            metadata: self.metadata,
            meta_index: self.meta_index,
            tensors: self.tensors,
            tensor_index: self.tensor_index,
        }
    }
}

/// A bounds-checked cursor over the file bytes; `ctx` names the entry being read, for
/// messages.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: Option<&'a Path>,
    ctx: String,
}

impl<'a> Cursor<'a> {
    fn err(&self, detail: impl fmt::Display) -> Error {
        if self.ctx.is_empty() {
            Error::format(self.path, detail.to_string())
        } else {
            Error::format(self.path, format!("{}: {detail}", self.ctx))
        }
    }

    fn unsupported(&self, detail: impl fmt::Display) -> Error {
        let path = self
            .path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<memory>".into());
        if self.ctx.is_empty() {
            Error::Unsupported(format!("{path}: {detail}"))
        } else {
            Error::Unsupported(format!("{path}: {}: {detail}", self.ctx))
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let slice = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end));
        match slice {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.err(format!(
                "file truncated: {what} at byte offset {} needs {n} bytes, but the file ends at \
                 byte {}",
                self.pos,
                self.buf.len()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let left = self.remaining();
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= left)
            .ok_or_else(|| {
                self.err(format!(
                    "{what}: string length {len} at byte offset {at} exceeds the {left} bytes \
                     left in the file"
                ))
            })?;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(self.err(format!(
                "{what}: the string at byte offset {at} is not valid UTF-8 ({e})"
            ))),
        }
    }

    /// A value of type code `ty`; `depth` = arrays enclosing it, `budget` = values left.
    fn value(&mut self, ty: u32, depth: usize, budget: &mut u64) -> Result<Value> {
        if *budget == 0 {
            return Err(self.err(format!(
                "more than {MAX_METADATA_VALUES} metadata values (the limit)"
            )));
        }
        *budget -= 1;
        let at = self.pos;
        Ok(match ty {
            T_U8 => Value::U8(self.u8("u8 value")?),
            T_I8 => Value::I8(self.u8("i8 value")? as i8),
            T_U16 => Value::U16(self.u16("u16 value")?),
            T_I16 => Value::I16(self.u16("i16 value")? as i16),
            T_U32 => Value::U32(self.u32("u32 value")?),
            T_I32 => Value::I32(self.u32("i32 value")? as i32),
            T_U64 => Value::U64(self.u64("u64 value")?),
            T_I64 => Value::I64(self.u64("i64 value")? as i64),
            T_F32 => Value::F32(f32::from_bits(self.u32("f32 value")?)),
            T_F64 => Value::F64(f64::from_bits(self.u64("f64 value")?)),
            T_BOOL => match self.u8("bool value")? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(self.err(format!(
                        "invalid bool byte {b} at byte offset {at} (must be 0 or 1)"
                    )))
                }
            },
            T_STRING => Value::String(self.string("string value")?),
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "arrays nested deeper than {MAX_ARRAY_DEPTH} levels at byte offset {at}"
                    )));
                }
                let et = self.u32("array element type")?;
                let min = min_value_bytes(et).ok_or_else(|| {
                    self.err(format!(
                        "unknown array element type {et} at byte offset {at}"
                    ))
                })?;
                let count_at = self.pos;
                let count = self.u64("array length")?;
                let left = self.remaining();
                let count = usize::try_from(count)
                    .ok()
                    .filter(|&c| c <= left / min)
                    .ok_or_else(|| {
                        self.err(format!(
                            "array length {count} at byte offset {count_at} cannot fit: {count} \
                             {} elements need at least {min} bytes each, {left} bytes are left \
                             in the file",
                            value_type_name(et)
                        ))
                    })?;
                if count as u64 > *budget {
                    return Err(self.err(format!(
                        "array of {count} elements at byte offset {count_at} exceeds the limit \
                         of {MAX_METADATA_VALUES} metadata values"
                    )));
                }
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(et, depth + 1, budget)?);
                }
                Value::Array(items)
            }
            _ => {
                return Err(self.err(format!(
                    "unknown value type {ty} at byte offset {}",
                    at.saturating_sub(4)
                )))
            }
        })
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two).
fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// Parses and validates a whole file.
fn parse(buf: &[u8], path: Option<&Path>) -> Result<Parsed> {
    let mut c = Cursor {
        buf,
        pos: 0,
        path,
        ctx: "header".to_string(),
    };
    let magic = c.array::<4>("magic")?;
    if &magic != MAGIC {
        return Err(c.err(format!(
            "not a GGUF file: the magic is \"{}\" (expected \"GGUF\")",
            magic.escape_ascii()
        )));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(c.unsupported(
                "GGUF version 1 is not supported (Ember reads versions 2 and 3; re-convert the \
                 model with a current llama.cpp)",
            ))
        }
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(c.unsupported(format!(
                "GGUF version {v} is byte-swapped: this is a big-endian GGUF file, Ember reads \
                 little-endian ones"
            )))
        }
        v => {
            return Err(c.unsupported(format!(
                "unsupported GGUF version {v} (Ember reads versions 2 and 3)"
            )))
        }
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    let left = c.remaining();
    if n_kv > (left / MIN_KV_BYTES) as u64 {
        return Err(c.err(format!(
            "metadata count {n_kv} at byte offset 16 cannot fit: each key/value needs at least \
             {MIN_KV_BYTES} bytes, {left} bytes are left in the file"
        )));
    }
    if n_tensors > (left / MIN_TENSOR_INFO_BYTES) as u64 {
        return Err(c.err(format!(
            "tensor count {n_tensors} at byte offset 8 cannot fit: each tensor info needs at \
             least {MIN_TENSOR_INFO_BYTES} bytes, {left} bytes are left in the file"
        )));
    }

    // Metadata. Both counts are bounded by the file size now, so they fit in usize.
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut meta_index = HashMap::with_capacity(n_kv as usize);
    let mut budget = MAX_METADATA_VALUES;
    for i in 0..n_kv {
        c.ctx = format!("metadata entry {i} at byte offset {}", c.pos);
        let key = c.string("key")?;
        c.ctx = format!("metadata key \"{key}\"");
        let ty = c.u32("value type")?;
        let value = c.value(ty, 0, &mut budget)?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(c.err("duplicate metadata key"));
        }
        metadata.push((key, value));
    }

    c.ctx = String::new();
    let alignment = match meta_index.get(ALIGNMENT_KEY).and_then(|&i| metadata.get(i)) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, Value::U32(a))) => {
            return Err(c.err(format!(
                "{ALIGNMENT_KEY} = {a} is not a nonzero power of two"
            )))
        }
        Some((_, v)) => {
            return Err(c.err(format!(
                "{ALIGNMENT_KEY} must be a u32, the file holds {}",
                v.describe()
            )))
        }
    };

    // Tensor infos, with offsets relative to the data section for now.
    let n_tensors = n_tensors as usize;
    let mut tensors = Vec::with_capacity(n_tensors.min(c.remaining() / MIN_TENSOR_INFO_BYTES));
    let mut tensor_index = HashMap::with_capacity(tensors.capacity());
    for i in 0..n_tensors {
        let info_at = c.pos;
        c.ctx = format!("tensor info {i} at byte offset {info_at}");
        let name = c.string("tensor name")?;
        c.ctx = format!("tensor \"{name}\" (info {i} at byte offset {info_at})");
        if let Some(j) = tensor_index.get(&name) {
            return Err(c.err(format!("duplicate tensor name (tensor infos {j} and {i})")));
        }
        let n_dims = c.u32("n_dims")?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(c.err(format!("n_dims = {n_dims}, must be 1 to {MAX_DIMS}")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64("dims")?);
        }
        if dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .is_none()
        {
            return Err(c.err(format!(
                "dims {dims:?} overflow: the element count exceeds 2^64"
            )));
        }
        let type_at = c.pos;
        let id = c.u32("ggml type")?;
        let ty = TensorType::from_ggml_id(id).ok_or_else(|| match ggml_type_name(id) {
            Some(tn) => c.unsupported(format!(
                "ggml type {tn} (id {id}) is not supported; Ember reads F32, F16, BF16, Q4_0, \
                 Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K"
            )),
            None => c.unsupported(format!(
                "unknown ggml type id {id} at byte offset {type_at}"
            )),
        })?;
        let (_, n_bytes) = tensor_size(&dims, ty).map_err(|e| c.err(e))?;
        let offset = c.u64("data offset")?;
        if offset % alignment != 0 {
            return Err(c.err(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        tensor_index.insert(name.clone(), tensors.len());
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_bytes,
        });
    }

    // The data section, and every tensor inside the file.
    c.ctx = String::new();
    let file_len = buf.len() as u64;
    let data_offset = align_up(c.pos as u64, alignment)
        .ok_or_else(|| c.err("the data section offset overflows"))?;
    for t in &mut tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => t.offset = start,
            _ => {
                return Err(c.err(format!(
                    "tensor \"{}\": its {} bytes of data at offset {} (data section at {}) run \
                     past the end of the file ({file_len} bytes)",
                    t.name, t.n_bytes, t.offset, data_offset
                )))
            }
        }
    }

    // No two tensors' data overlap: sort by start, compare each with the furthest end so far.
    let mut order: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors.get(i).is_some_and(|t| t.n_bytes > 0))
        .collect();
    order.sort_by_key(|&i| tensors.get(i).map(|t| (t.offset, t.n_bytes)));
    let mut furthest: Option<&TensorInfo> = None;
    for t in order.iter().filter_map(|&i| tensors.get(i)) {
        if let Some(p) = furthest {
            let p_end = p.offset + p.n_bytes;
            if t.offset < p_end {
                return Err(c.err(format!(
                    "the data of tensors \"{}\" (bytes {}..{}) and \"{}\" (bytes {}..{}) overlap",
                    p.name,
                    p.offset,
                    p_end,
                    t.name,
                    t.offset,
                    t.offset + t.n_bytes
                )));
            }
        }
        if furthest.is_none_or(|p| t.offset + t.n_bytes > p.offset + p.n_bytes) {
            furthest = Some(t);
        }
    }

    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        meta_index,
        tensors,
        tensor_index,
    })
}

/// Builds GGUF files (version 3, little-endian) from metadata and tensors.
///
/// Metadata keeps insertion order ([`GgufWriter::add`] replaces an existing key in place);
/// tensors are written in insertion order, each at an offset padded to the alignment, the
/// last one padded too (as llama.cpp and the `gguf` Python package do). The alignment is
/// `general.alignment` when set (see [`GgufWriter::set_alignment`]), else 32. The output
/// reads back with [`GgufFile`], llama.cpp and the `gguf` Python package.
///
/// ```
/// use ember::format::gguf::{GgufWriter, TensorType, Value};
/// let mut w = GgufWriter::new();
/// w.add("general.architecture", "llama")
///     .add("tokenizer.ggml.tokens", Value::Array(vec!["a".into(), "b".into()]))
///     .add_tensor("token_embd.weight", &[2, 2], TensorType::F16, vec![0u8; 8]);
/// let bytes = w.to_bytes()?;
/// assert_eq!(&bytes[..4], b"GGUF");
/// # Ok::<(), ember::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<WriterTensor>,
}

#[derive(Clone)]
struct WriterTensor {
    name: String,
    dims: Vec<u64>,
    ty: TensorType,
    data: Vec<u8>,
}

impl fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufWriter")
            .field(
                "metadata",
                &self.metadata.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field(
                "tensors",
                &self.tensors.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn pad_to(out: &mut Vec<u8>, alignment: usize) {
    let rem = out.len() % alignment;
    if rem != 0 {
        out.resize(out.len() + alignment - rem, 0);
    }
}

/// Writes the payload of `v` (without its type code).
fn put_value(out: &mut Vec<u8>, key: &str, v: &Value, depth: usize) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(Error::InvalidArgument(format!(
                    "GgufWriter: metadata key \"{key}\": arrays nested deeper than \
                     {MAX_ARRAY_DEPTH} levels"
                )));
            }
            let et = items.first().map_or(T_U8, Value::type_code);
            if let Some(bad) = items.iter().find(|e| e.type_code() != et) {
                return Err(Error::InvalidArgument(format!(
                    "GgufWriter: metadata key \"{key}\": array mixes {} and {} elements",
                    value_type_name(et),
                    bad.type_name()
                )));
            }
            put_u32(out, et);
            put_u64(out, items.len() as u64);
            // Each element is a bare payload; a nested array's payload starts with its own
            // element type and length.
            for e in items {
                put_value(out, key, e, depth + 1)?;
            }
        }
    }
    Ok(())
}

impl GgufWriter {
    /// An empty file: no metadata, no tensors.
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Sets metadata key `key` (replacing its value if already set, keeping its position).
    /// An empty array is written with element type u8.
    pub fn add(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        let key = key.into();
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Sets the data alignment (`general.alignment`); must be a nonzero power of two,
    /// checked by [`GgufWriter::to_bytes`].
    pub fn set_alignment(&mut self, alignment: u32) -> &mut Self {
        self.add(ALIGNMENT_KEY, Value::U32(alignment))
    }

    /// Adds a tensor: `dims` in ggml order (`ne[0]`, the contiguous dimension, first; a
    /// `rows x cols` matrix is `[cols, rows]`), `data` its bytes in the file layout of `ty`.
    /// Sizes are checked by [`GgufWriter::to_bytes`].
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: TensorType,
        data: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.tensors.push(WriterTensor {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
            data: data.into(),
        });
        self
    }

    /// The alignment the file will use.
    fn alignment(&self) -> Result<u64> {
        match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, Value::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some((_, v)) => Err(Error::InvalidArgument(format!(
                "GgufWriter: {ALIGNMENT_KEY} must be a u32 nonzero power of two, got {}",
                v.describe()
            ))),
        }
    }

    /// The file's bytes.
    ///
    /// Errors: [`Error::InvalidArgument`] for an alignment that is not a nonzero power of two,
    /// an array mixing element types or nested too deep, a tensor with 0 or more than
    /// [`MAX_DIMS`] dims, a data length that does not match its dims and type, or a duplicate
    /// tensor name.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let alignment = self.alignment()?;
        let align = usize::try_from(alignment)
            .map_err(|_| Error::InvalidArgument("GgufWriter: alignment too large".into()))?;
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        put_u32(&mut out, 3);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.metadata.len() as u64);
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            put_u32(&mut out, v.type_code());
            put_value(&mut out, k, v, 0)?;
        }
        let mut offset = 0u64;
        let mut names = HashMap::new();
        for t in &self.tensors {
            let bad = |detail: String| {
                Error::InvalidArgument(format!("GgufWriter: tensor \"{}\": {detail}", t.name))
            };
            if names.insert(t.name.as_str(), ()).is_some() {
                return Err(bad("duplicate tensor name".into()));
            }
            if t.dims.is_empty() || t.dims.len() > MAX_DIMS {
                return Err(bad(format!(
                    "{} dims, must be 1 to {MAX_DIMS}",
                    t.dims.len()
                )));
            }
            let (_, n_bytes) = tensor_size(&t.dims, t.ty).map_err(bad)?;
            if n_bytes != t.data.len() as u64 {
                return Err(bad(format!(
                    "{} dims {:?} take {n_bytes} bytes, the data has {}",
                    t.ty.name(),
                    t.dims,
                    t.data.len()
                )));
            }
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.ty.ggml_id());
            put_u64(&mut out, offset);
            offset = offset
                .checked_add(n_bytes)
                .and_then(|o| align_up(o, alignment))
                .ok_or_else(|| bad("the data section overflows u64".into()))?;
        }
        pad_to(&mut out, align);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad_to(&mut out, align);
        }
        Ok(out)
    }

    /// Writes the file to `path` atomically: into a temporary file next to it, synced, then
    /// renamed over `path`.
    ///
    /// Errors: as [`GgufWriter::to_bytes`], and [`Error::Io`] when writing fails (the
    /// temporary file is removed, `path` is left as it was).
    pub fn write_to(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;
    use half::{bf16, f16};

    /// Little-endian byte builder for hand-made (often malformed) files.
    #[derive(Default, Clone)]
    struct B(Vec<u8>);

    impl B {
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
            B::default()
                .raw(b"GGUF")
                .u32(version)
                .u64(n_tensors)
                .u64(n_kv)
        }
        fn raw(mut self, b: &[u8]) -> B {
            self.0.extend_from_slice(b);
            self
        }
        fn u8(self, v: u8) -> B {
            self.raw(&[v])
        }
        fn u32(self, v: u32) -> B {
            self.raw(&v.to_le_bytes())
        }
        fn u64(self, v: u64) -> B {
            self.raw(&v.to_le_bytes())
        }
        fn str(self, s: &str) -> B {
            self.u64(s.len() as u64).raw(s.as_bytes())
        }
        fn kv(self, key: &str, ty: u32, payload: B) -> B {
            self.str(key).u32(ty).raw(&payload.0)
        }
        fn info(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> B {
            let mut b = self.str(name).u32(dims.len() as u32);
            for &d in dims {
                b = b.u64(d);
            }
            b.u32(ty).u64(offset)
        }
        fn pad(mut self, a: usize) -> B {
            pad_to(&mut self.0, a);
            self
        }
        fn zeros(mut self, n: usize) -> B {
            self.0.resize(self.0.len() + n, 0);
            self
        }
    }

    /// A file with tensor infos `infos` (name, dims, ggml type id, relative offset), no
    /// metadata, data section padded to 32, then `data_len` zero bytes.
    fn tensor_file(infos: &[(&str, &[u64], u32, u64)], data_len: usize) -> Vec<u8> {
        let mut b = B::header(3, infos.len() as u64, 0);
        for &(name, dims, ty, off) in infos {
            b = b.info(name, dims, ty, off);
        }
        b.pad(32).zeros(data_len).0
    }

    /// Parses `bytes`, which must fail; returns the message.
    fn err(bytes: Vec<u8>) -> String {
        match GgufFile::from_bytes(bytes) {
            Ok(f) => panic!("parsed a malformed file: {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Parses `bytes`, which must fail with a message containing every needle.
    #[track_caller]
    fn assert_err(bytes: Vec<u8>, needles: &[&str]) {
        let msg = err(bytes);
        for n in needles {
            assert!(msg.contains(n), "message {msg:?} does not mention {n:?}");
        }
    }

    fn f32_bytes(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// A small valid file with every kind of metadata and four tensors; the last tensor's
    /// data ends exactly at the end of the file, so every prefix is invalid.
    fn sample_writer() -> GgufWriter {
        let mut rng = Rng::new(7);
        let mut w = GgufWriter::new();
        w.add("general.architecture", "llama")
            .add("general.name", "tiny")
            .add("llama.block_count", 2u32)
            .add("llama.rope.freq_base", 10000.0f32)
            .add("flag", true)
            .add("i8", -3i8)
            .add("u16", 65535u16)
            .add("i64", i64::MIN)
            .add("f64", 0.25f64)
            .add(
                "tokenizer.ggml.tokens",
                Value::Array(vec!["<s>".into(), "a".into(), "é".into()]),
            )
            .add(
                "tokenizer.ggml.scores",
                Value::Array(vec![0.5f32.into(), (-1.0f32).into(), 2.0f32.into()]),
            )
            .add(
                "nested",
                Value::Array(vec![
                    Value::Array(vec![1u8.into(), 2u8.into()]),
                    Value::Array(vec!["x".into()]),
                ]),
            );
        let h: Vec<u8> = (0..8)
            .flat_map(|i| f16::from_f32(i as f32 * 0.5).to_le_bytes())
            .collect();
        w.add_tensor("h", &[4, 2], TensorType::F16, h);
        let q = crate::quant::random_blocks(QuantType::Q8_0, &mut rng, 2);
        w.add_tensor("q", &[32, 2], TensorType::Quant(QuantType::Q8_0), q);
        w.add_tensor("one", &[1], TensorType::F32, f32_bytes(&[9.0]));
        w.add_tensor(
            "last",
            &[8],
            TensorType::F32,
            f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]),
        );
        w
    }

    fn sample() -> Vec<u8> {
        sample_writer().to_bytes().unwrap()
    }

    #[test]
    fn sample_is_valid_and_ends_at_last_tensor() {
        let bytes = sample();
        let n = bytes.len() as u64;
        let f = GgufFile::from_bytes(bytes).unwrap();
        let last = f.tensor("last").unwrap();
        assert_eq!(last.offset + last.n_bytes, n);
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.data_offset() % 32, 0);
        for t in f.tensors() {
            assert_eq!(t.offset % 32, 0, "{}", t.name);
        }
    }

    #[test]
    fn wrong_magic() {
        let mut b = sample();
        b[..4].copy_from_slice(b"GGML");
        assert_err(b, &["not a GGUF file", "GGML"]);
    }

    #[test]
    fn versions() {
        let mut b = sample();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_err(b.clone(), &["version 1 is not supported"]);
        b[4..8].copy_from_slice(&99u32.to_le_bytes());
        assert_err(b.clone(), &["unsupported GGUF version 99"]);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_err(b.clone(), &["big-endian"]);
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(GgufFile::from_bytes(b).unwrap().version(), 2);
        let e = GgufFile::from_bytes(B::header(99, 0, 0).0).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let msg = err(bytes[..len].to_vec());
            assert!(
                msg.contains("truncated")
                    || msg.contains("cannot fit")
                    || msg.contains("exceeds")
                    || msg.contains("past the end"),
                "prefix {len}: {msg}"
            );
        }
        assert!(err(Vec::new()).contains("file truncated: magic at byte offset 0"));
    }

    #[test]
    fn string_length_beyond_eof() {
        let b = B::header(3, 0, 1).u64(1 << 40).raw(b"abc").zeros(16).0;
        assert_err(
            b,
            &[
                "string length 1099511627776",
                "offset 24",
                "exceeds the 19 bytes",
            ],
        );
        let b = B::header(3, 0, 1)
            .str("k")
            .u32(T_STRING)
            .u64(u64::MAX)
            .zeros(8)
            .0;
        assert_err(
            b,
            &["metadata key \"k\"", "string length 18446744073709551615"],
        );
    }

    #[test]
    fn huge_counts() {
        assert_err(
            B::header(3, 1 << 60, 0).zeros(64).0,
            &["tensor count 1152921504606846976", "cannot fit"],
        );
        assert_err(
            B::header(3, 0, 1 << 60).zeros(64).0,
            &["metadata count 1152921504606846976", "cannot fit"],
        );
        assert_err(
            B::header(3, u64::MAX, u64::MAX).0,
            &["metadata count 18446744073709551615"],
        );
        let b = B::header(3, 0, 1)
            .kv("arr", T_ARRAY, B::default().u32(T_U8).u64(1 << 62))
            .zeros(100)
            .0;
        assert_err(
            b,
            &[
                "metadata key \"arr\"",
                "array length 4611686018427387904",
                "cannot fit",
            ],
        );
        let b = B::header(3, 0, 1)
            .kv("arr", T_ARRAY, B::default().u32(T_STRING).u64(20))
            .zeros(100)
            .0;
        assert_err(b, &["array length 20", "cannot fit"]);
    }

    #[test]
    fn nested_arrays() {
        let nest = |levels: usize| {
            let mut p = B::default();
            for _ in 1..levels {
                p = p.u32(T_ARRAY).u64(1);
            }
            B::header(3, 0, 1)
                .kv("deep", T_ARRAY, p.u32(T_U8).u64(1).u8(7))
                .0
        };
        let f = GgufFile::from_bytes(nest(MAX_ARRAY_DEPTH)).unwrap();
        let mut v = f.get("deep").unwrap();
        for _ in 0..MAX_ARRAY_DEPTH {
            v = &v.as_array().unwrap()[0];
        }
        assert_eq!(v, &Value::U8(7));
        assert_err(
            nest(MAX_ARRAY_DEPTH + 1),
            &["metadata key \"deep\"", "nested deeper than 4 levels"],
        );
        assert_err(nest(100), &["nested deeper"]);
    }

    #[test]
    fn invalid_bool() {
        let b = B::header(3, 0, 1).kv("b", T_BOOL, B::default().u8(2)).0;
        assert_err(
            b,
            &["metadata key \"b\"", "invalid bool byte 2", "offset 37"],
        );
        let b = B::header(3, 0, 1)
            .kv("b", T_ARRAY, B::default().u32(T_BOOL).u64(2).u8(1).u8(255))
            .0;
        assert_err(b, &["invalid bool byte 255"]);
    }

    #[test]
    fn invalid_utf8() {
        let b = B::header(3, 0, 1)
            .u64(2)
            .raw(&[0xC3, 0x28])
            .u32(T_U8)
            .u8(0)
            .0;
        assert_err(b, &["metadata entry 0", "offset 24", "not valid UTF-8"]);
        let b = B::header(3, 0, 1)
            .kv("s", T_STRING, B::default().u64(1).u8(0xFF))
            .0;
        assert_err(b, &["metadata key \"s\"", "not valid UTF-8"]);
        let b = B::header(3, 1, 0).u64(1).u8(0x80).raw(&[0; 40]).0;
        assert_err(b, &["tensor info 0", "tensor name", "not valid UTF-8"]);
    }

    #[test]
    fn unknown_value_types() {
        let b = B::header(3, 0, 1).kv("k", 13, B::default().u64(0)).0;
        assert_err(b, &["metadata key \"k\"", "unknown value type 13"]);
        let b = B::header(3, 0, 1)
            .kv("k", T_ARRAY, B::default().u32(77).u64(0))
            .zeros(8)
            .0;
        assert_err(b, &["metadata key \"k\"", "unknown array element type 77"]);
    }

    #[test]
    fn duplicate_metadata_key() {
        let b = B::header(3, 0, 2)
            .kv("k", T_U8, B::default().u8(1))
            .kv("k", T_U8, B::default().u8(2))
            .0;
        assert_err(b, &["metadata key \"k\"", "duplicate metadata key"]);
    }

    #[test]
    fn n_dims_out_of_range() {
        let b = B::header(3, 1, 0).str("t").u32(0).zeros(64).0;
        assert_err(b, &["tensor \"t\"", "n_dims = 0"]);
        let b = B::header(3, 1, 0).str("t").u32(5).zeros(64).0;
        assert_err(b, &["tensor \"t\"", "n_dims = 5"]);
    }

    #[test]
    fn dims_overflow() {
        let b = tensor_file(&[("big", &[1 << 32, 1 << 32], 0, 0)], 64);
        assert_err(b, &["tensor \"big\"", "overflow"]);
        // The element count fits, the byte count does not.
        let b = tensor_file(&[("big", &[1 << 62, 2], 0, 0)], 64);
        assert_err(b, &["tensor \"big\"", "overflows"]);
        let b = tensor_file(&[("big", &[1 << 31, 1 << 31], 1, 0)], 64);
        assert_err(b, &["tensor \"big\"", "past the end of the file"]);
    }

    #[test]
    fn tensor_types() {
        let e = GgufFile::from_bytes(tensor_file(&[("w", &[32], 31, 0)], 64)).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        let msg = e.to_string();
        assert!(
            msg.contains("tensor \"w\"") && msg.contains("unknown ggml type id 31"),
            "{msg}"
        );
        let e = GgufFile::from_bytes(tensor_file(
            &[("blk.0.ffn_down.weight", &[256], 10, 0)],
            256,
        ))
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        let msg = e.to_string();
        assert!(
            msg.contains("tensor \"blk.0.ffn_down.weight\"") && msg.contains("Q2_K (id 10)"),
            "{msg}"
        );
        assert_err(tensor_file(&[("w", &[32], 20, 0)], 64), &["IQ4_NL (id 20)"]);
        // Every supported id parses.
        for id in [0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30] {
            let ty = TensorType::from_ggml_id(id).unwrap();
            assert_eq!(ty.ggml_id(), id);
            let n = tensor_size(&[256], ty).unwrap().1 as usize;
            let f = GgufFile::from_bytes(tensor_file(&[("w", &[256], id, 0)], n)).unwrap();
            assert_eq!(f.tensors()[0].ty, ty);
            assert_eq!(f.tensors()[0].n_bytes, n as u64);
            assert_eq!(ty.row_bytes(256).unwrap(), n);
        }
    }

    #[test]
    fn ne0_not_a_multiple_of_block() {
        let b = tensor_file(&[("w", &[48, 2], 8, 0)], 256);
        assert_err(b, &["tensor \"w\"", "ne[0] = 48", "Q8_0 block size 32"]);
        let b = tensor_file(&[("w", &[32, 1], 12, 0)], 256);
        assert_err(b, &["tensor \"w\"", "ne[0] = 32", "Q4_K block size 256"]);
        assert!(TensorType::Quant(QuantType::Q4_0).row_bytes(33).is_err());
        assert_eq!(TensorType::F16.row_bytes(33).unwrap(), 66);
    }

    #[test]
    fn tensor_data_beyond_eof() {
        let b = tensor_file(&[("w", &[16], 0, 0)], 63);
        assert_err(b, &["tensor \"w\"", "64 bytes", "past the end of the file"]);
        let b = tensor_file(&[("w", &[16], 0, 1 << 40)], 64);
        assert_err(b, &["tensor \"w\"", "past the end of the file"]);
        let b = tensor_file(&[("w", &[16], 0, u64::MAX - 31)], 64);
        assert_err(b, &["tensor \"w\"", "past the end of the file"]);
    }

    #[test]
    fn misaligned_offset() {
        let b = tensor_file(&[("a", &[4], 0, 0), ("b", &[4], 0, 16)], 64);
        assert_err(
            b,
            &[
                "tensor \"b\"",
                "offset 16",
                "not a multiple of the alignment 32",
            ],
        );
    }

    #[test]
    fn overlapping_tensors() {
        let b = tensor_file(
            &[("a", &[16], 0, 32), ("b", &[16], 0, 0), ("c", &[8], 0, 64)],
            128,
        );
        let msg = err(b);
        assert!(
            msg.contains("\"b\"") && msg.contains("\"a\"") && msg.contains("overlap"),
            "{msg}"
        );
        // One tensor inside another, and the same with the file order reversed.
        let b = tensor_file(
            &[
                ("long", &[64], 0, 0),
                ("x", &[8], 0, 32),
                ("y", &[8], 0, 128),
            ],
            256,
        );
        assert_err(b, &["\"long\"", "\"x\"", "overlap"]);
        let b = tensor_file(
            &[
                ("long", &[64], 0, 0),
                ("x", &[8], 0, 256),
                ("y", &[8], 0, 224),
            ],
            320,
        );
        assert_err(b, &["\"long\"", "\"y\"", "overlap"]);
        // Adjacent and empty tensors do not overlap.
        let b = tensor_file(
            &[("a", &[8], 0, 0), ("b", &[8], 0, 32), ("e", &[0], 0, 32)],
            64,
        );
        let f = GgufFile::from_bytes(b).unwrap();
        assert_eq!(f.tensor("e").unwrap().n_bytes, 0);
        assert!(f.tensor_data(f.tensor("e").unwrap()).unwrap().is_empty());
    }

    #[test]
    fn duplicate_tensor_names() {
        let b = tensor_file(&[("w", &[8], 0, 0), ("w", &[8], 0, 32)], 64);
        assert_err(
            b,
            &["tensor \"w\"", "duplicate tensor name", "infos 0 and 1"],
        );
    }

    #[test]
    fn alignment_key() {
        for (a, ok) in [(0u32, false), (3, false), (1, true), (64, true)] {
            let b = B::header(3, 1, 1)
                .kv(ALIGNMENT_KEY, T_U32, B::default().u32(a))
                .info("w", &[4], 0, 0)
                .pad(64)
                .zeros(16)
                .0;
            match GgufFile::from_bytes(b) {
                Ok(f) => {
                    assert!(ok, "alignment {a} accepted");
                    assert_eq!(f.alignment(), u64::from(a));
                    assert_eq!(f.data_offset() % u64::from(a), 0);
                }
                Err(e) => {
                    assert!(!ok, "alignment {a}: {e}");
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!(
                            "general.alignment = {a} is not a nonzero power of two"
                        )),
                        "{msg}"
                    );
                }
            }
        }
        let b = B::header(3, 0, 1)
            .kv(ALIGNMENT_KEY, T_U64, B::default().u64(32))
            .0;
        assert_err(b, &["general.alignment must be a u32", "u64 32"]);
    }

    #[test]
    fn typed_getters() {
        let mut w = GgufWriter::new();
        w.add("u", 7u32)
            .add("neg", -1i32)
            .add("big", u64::MAX)
            .add("s", "hi")
            .add("b", false)
            .add("f", 1.5f64)
            .add("ints", Value::Array(vec![1u16.into(), 2u16.into()]))
            .add(
                "mixed_ok",
                Value::Array(vec![Value::I64(-5), Value::I64(6)]),
            )
            .add("strs", Value::Array(vec!["a".into()]))
            .add("empty", Value::Array(vec![]));
        let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
        assert_eq!(f.get_u64("u").unwrap(), Some(7));
        assert_eq!(f.get_u64("missing").unwrap(), None);
        assert_eq!(f.get_f64("u").unwrap(), Some(7.0));
        assert_eq!(f.get_f64("f").unwrap(), Some(1.5));
        assert_eq!(f.get_u64("big").unwrap(), Some(u64::MAX));
        assert_eq!(f.get_str("s").unwrap(), Some("hi"));
        assert_eq!(f.get_bool("b").unwrap(), Some(false));
        assert_eq!(f.get_i64_array("ints").unwrap(), Some(vec![1, 2]));
        assert_eq!(f.get_i64_array("mixed_ok").unwrap(), Some(vec![-5, 6]));
        assert_eq!(f.get_f32_array("ints").unwrap(), Some(vec![1.0, 2.0]));
        assert_eq!(f.get_str_array("strs").unwrap(), Some(vec!["a"]));
        assert_eq!(f.get_str_array("empty").unwrap(), Some(vec![]));
        let msg = f.get_str("u").unwrap_err().to_string();
        assert!(
            msg.contains("metadata key \"u\"")
                && msg.contains("u32 7")
                && msg.contains("expected a string"),
            "{msg}"
        );
        let msg = f.get_u64("neg").unwrap_err().to_string();
        assert!(
            msg.contains("\"neg\"") && msg.contains("non-negative"),
            "{msg}"
        );
        let msg = f.get_bool("u").unwrap_err().to_string();
        assert!(
            msg.contains("\"u\"") && msg.contains("expected a bool"),
            "{msg}"
        );
        let msg = f.get_str_array("ints").unwrap_err().to_string();
        assert!(
            msg.contains("\"ints\"") && msg.contains("array of 2 u16"),
            "{msg}"
        );
        let msg = f.get_i64_array("s").unwrap_err().to_string();
        assert!(
            msg.contains("\"s\"") && msg.contains("array of integers"),
            "{msg}"
        );
        let msg = f.architecture().unwrap_err().to_string();
        assert!(
            msg.contains("missing required metadata key \"general.architecture\""),
            "{msg}"
        );
        let e = f.get_f64("s").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Format);
    }

    #[test]
    fn round_trip_metadata_and_tensors() {
        let w = sample_writer();
        let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
        assert_eq!(f.metadata(), &w.metadata[..]);
        let keys: Vec<_> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys[..3],
            ["general.architecture", "general.name", "llama.block_count"]
        );
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get("i64"), Some(&Value::I64(i64::MIN)));
        assert_eq!(
            f.get("tokenizer.ggml.tokens")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap()[2],
            "é"
        );
        assert_eq!(f.tensors().len(), w.tensors.len());
        for (t, wt) in f.tensors().iter().zip(&w.tensors) {
            assert_eq!(t.name, wt.name);
            assert_eq!(t.dims, wt.dims);
            assert_eq!(t.ty, wt.ty);
            assert_eq!(f.tensor_data(t).unwrap(), &wt.data[..]);
            assert_eq!(f.tensor(&t.name), Some(t));
        }
        let q = f.tensor("q").unwrap();
        assert_eq!((q.cols(), q.rows(), q.n_elements()), (32, 2, 64));
        assert!(f.tensor("nope").is_none());

        // Every value type at the top level and in arrays, extremes included.
        let mut w = GgufWriter::new();
        let all = vec![
            Value::U8(255),
            Value::I8(-128),
            Value::U16(65535),
            Value::I16(-32768),
            Value::U32(u32::MAX),
            Value::I32(i32::MIN),
            Value::U64(u64::MAX),
            Value::I64(i64::MIN),
            Value::F32(-1.25e-7),
            Value::F64(std::f64::consts::PI),
            Value::Bool(true),
            Value::String(String::new()),
            Value::String("ünï ✓".into()),
            Value::Array(vec![
                Value::Array(vec![]),
                Value::Array(vec![Value::Bool(false)]),
            ]),
        ];
        for (i, v) in all.iter().enumerate() {
            w.add(format!("k{i}"), v.clone());
            w.add(format!("a{i}"), Value::Array(vec![v.clone(), v.clone()]));
        }
        let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
        assert_eq!(f.metadata(), &w.metadata[..]);
        assert!(f.tensors().is_empty());
    }

    #[test]
    fn tensor_f32_conversions() {
        let mut rng = Rng::new(3);
        let x = rng.vec(64, -4.0, 4.0);
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let q = crate::quant::random_blocks(QuantType::Q8_0, &mut rng, 4);
        let q4 = crate::quant::random_blocks(QuantType::Q4_K, &mut rng, 1);
        let mut w = GgufWriter::new();
        w.add_tensor("f32", &[16, 4], TensorType::F32, f32_bytes(&x))
            .add_tensor(
                "f16",
                &[16, 4],
                TensorType::F16,
                h.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
            )
            .add_tensor(
                "bf16",
                &[64],
                TensorType::BF16,
                b.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
            )
            .add_tensor(
                "q8",
                &[64, 2],
                TensorType::Quant(QuantType::Q8_0),
                q.clone(),
            )
            .add_tensor(
                "q4k",
                &[256],
                TensorType::Quant(QuantType::Q4_K),
                q4.clone(),
            );
        let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
        let get = |n: &str| f.tensor_f32(f.tensor(n).unwrap()).unwrap();
        assert_eq!(get("f32"), x);
        assert_eq!(get("f16"), h.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
        assert_eq!(
            get("bf16"),
            b.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
        );
        assert_eq!(
            get("q8"),
            crate::quant::dequantize(QuantType::Q8_0, &q).unwrap()
        );
        assert_eq!(get("q8").len(), 128);
        assert_eq!(
            get("q4k"),
            crate::quant::dequantize(QuantType::Q4_K, &q4).unwrap()
        );

        // An info that does not belong to the file is rejected, not read out of bounds.
        let mut t = f.tensor("f32").unwrap().clone();
        t.offset = f.file_size() - 8;
        assert!(f
            .tensor_data(&t)
            .unwrap_err()
            .to_string()
            .contains("outside the file"));
        t.offset = u64::MAX;
        assert!(f.tensor_f32(&t).is_err());
        let mut t = f.tensor("f32").unwrap().clone();
        t.n_bytes = 6;
        assert!(f
            .tensor_f32(&t)
            .unwrap_err()
            .to_string()
            .contains("whole number"));
    }

    #[test]
    fn writer_rejects_bad_input() {
        let check = |w: &GgufWriter, needle: &str| {
            let e = w.to_bytes().unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
            assert!(e.to_string().contains(needle), "{e}");
        };
        let mut w = GgufWriter::new();
        w.add_tensor("w", &[4], TensorType::F32, vec![0u8; 15]);
        check(&w, "take 16 bytes, the data has 15");
        let mut w = GgufWriter::new();
        w.add_tensor("w", &[], TensorType::F32, vec![]);
        check(&w, "0 dims");
        let mut w = GgufWriter::new();
        w.add_tensor("w", &[4], TensorType::F32, vec![0u8; 16]);
        w.add_tensor("w", &[4], TensorType::F32, vec![0u8; 16]);
        check(&w, "duplicate tensor name");
        let mut w = GgufWriter::new();
        w.add("a", Value::Array(vec![1u8.into(), 1u16.into()]));
        check(&w, "mixes u8 and u16");
        let mut w = GgufWriter::new();
        w.set_alignment(48);
        check(&w, "general.alignment");
        let mut deep = Value::U8(1);
        for _ in 0..=MAX_ARRAY_DEPTH {
            deep = Value::Array(vec![deep]);
        }
        let mut w = GgufWriter::new();
        w.add("deep", deep);
        check(&w, "nested deeper");
        // Replacing a key keeps its position and the file valid.
        let mut w = GgufWriter::new();
        w.add("a", 1u8).add("b", 2u8).add("a", 3u8);
        let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
        assert_eq!(
            f.metadata(),
            &[("a".into(), Value::U8(3)), ("b".into(), Value::U8(2))]
        );
    }

    #[test]
    fn non_default_alignment_round_trip() {
        let mut w = sample_writer();
        w.set_alignment(256);
        let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
        assert_eq!(f.alignment(), 256);
        for t in f.tensors() {
            assert_eq!(t.offset % 256, 0);
        }
        assert_eq!(f.tensor_f32(f.tensor("one").unwrap()).unwrap(), vec![9.0]);
    }

    #[test]
    fn open_from_path() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("ember-gguf-test-{}.gguf", std::process::id()));
        sample_writer().write_to(&path).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.path(), Some(path.as_path()));
        assert_eq!(f.tensor_f32(f.tensor("last").unwrap()).unwrap()[7], 8.0);
        drop(f);
        std::fs::write(&path, b"GGUF\x03\0\0\0").unwrap();
        let msg = GgufFile::open(&path).unwrap_err().to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("truncated"),
            "{msg}"
        );
        std::fs::write(&path, b"").unwrap();
        assert!(GgufFile::open(&path).is_err());
        std::fs::remove_file(&path).unwrap();
        let e = GgufFile::open(&path).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Io);
        assert!(e.to_string().contains("ember-gguf-test"), "{e}");
    }

    /// Random byte mutations of a valid file must never panic (nor allocate wildly): every
    /// outcome is a parsed file whose accessors work, or an error.
    #[test]
    fn fuzz_mutations_never_panic() {
        let base = sample();
        let data_start = GgufFile::from_bytes(base.clone()).unwrap().data_offset() as usize;
        let mut rng = Rng::new(0x5eed);
        let (mut ok, mut bad) = (0, 0);
        for _ in 0..2000 {
            let mut b = base.clone();
            for _ in 0..1 + rng.below(4) {
                // Mostly the header, metadata and infos, where the structure is.
                let limit = if rng.below(8) == 0 {
                    b.len()
                } else {
                    data_start
                };
                let i = rng.below(limit as u64) as usize;
                b[i] = match rng.below(4) {
                    0 => 0,
                    1 => 0xFF,
                    2 => b[i] ^ (1 << rng.below(8)),
                    _ => rng.next_u32() as u8,
                };
            }
            if rng.below(10) == 0 {
                b.truncate(rng.below(b.len() as u64) as usize);
            }
            match GgufFile::from_bytes(b) {
                Ok(f) => {
                    ok += 1;
                    for (k, _) in f.metadata() {
                        let _ = (f.get_u64(k), f.get_f64(k), f.get_bool(k), f.get_str(k));
                        let _ = (f.get_str_array(k), f.get_i64_array(k), f.get_f32_array(k));
                    }
                    let _ = f.architecture();
                    for t in f.tensors() {
                        let d = f.tensor_data(t).unwrap();
                        assert_eq!(d.len() as u64, t.n_bytes);
                        let x = f.tensor_f32(t).unwrap();
                        assert_eq!(x.len() as u64, t.n_elements());
                    }
                }
                Err(_) => bad += 1,
            }
        }
        eprintln!("fuzz: {ok} mutated files parsed, {bad} rejected");
        assert!(
            bad > 500,
            "mutations should mostly hit the structure ({bad} rejected)"
        );
    }

    /// The real SmolLM2-135M-Instruct Q4_1 file, when `EMBER_TEST_MODEL` points at it
    /// (`scripts/fetch-model.sh` prints the path; `scripts/test.sh` sets it).
    #[test]
    fn real_model_smollm2() {
        let Some(path) = std::env::var_os("EMBER_TEST_MODEL") else {
            eprintln!("note: EMBER_TEST_MODEL not set, skipping the real-model GGUF test");
            return;
        };
        let f = GgufFile::open(Path::new(&path)).unwrap();
        eprintln!(
            "{}: GGUF v{}, {} metadata keys, {} tensors, alignment {}, data at {}",
            f.path().unwrap().display(),
            f.version(),
            f.metadata().len(),
            f.tensors().len(),
            f.alignment(),
            f.data_offset()
        );
        for (k, v) in f.metadata() {
            eprintln!("  {k}: {}", v.describe());
        }
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for t in f.tensors() {
            *counts.entry(t.ty.name()).or_default() += 1;
        }
        eprintln!("  tensor types: {counts:?}");
        assert_eq!(f.version(), 3);
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.tensors().len(), 272);
        assert_eq!(f.get_u64("llama.block_count").unwrap(), Some(30));
        let emb = f.tensor("token_embd.weight").unwrap();
        assert_eq!(emb.ty, TensorType::Quant(QuantType::Q8_0));
        assert_eq!(emb.dims, vec![576, 49152]);
        assert_eq!((emb.cols(), emb.rows()), (576, 49152));
        let q = f.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.ty, TensorType::Quant(QuantType::Q4_1));
        assert_eq!(q.dims, vec![576, 576]);
        assert_eq!(q.n_bytes, 576 / 32 * 20 * 576);
        let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
        assert_eq!(tokens.len(), 49152);
        let x = f.tensor_f32(q).unwrap();
        assert_eq!(x.len(), 576 * 576);
        assert!(x.iter().all(|v| v.is_finite()));
        let norm = f.tensor("blk.0.attn_norm.weight").unwrap();
        assert!(f.tensor_f32(norm).unwrap().iter().all(|v| v.is_finite()));
    }
}
