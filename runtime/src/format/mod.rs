//! Model file formats: the first step of the data flow (file -> format -> model weights).
//!
//! Every file is untrusted input. Readers check each count, offset and size against the
//! file before using it (checked arithmetic, no allocation sized by an unchecked count, no
//! out-of-bounds read), and a malformed file is an [`Error::Format`](crate::Error::Format)
//! that names what is wrong and where (byte offset, key, tensor), never a panic.
//!
//! - [`gguf`]: Ember's own GGUF reader (memory-mapped, bounds-checked) and writer.

pub mod gguf;
