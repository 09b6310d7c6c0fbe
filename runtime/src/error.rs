//! The one error type of the library.
//!
//! Every fallible function in Ember returns [`Result<T>`]. Variants carry enough context
//! (operation, shapes, file, tensor name) that the message alone tells a user what went wrong,
//! and they map onto the stable status codes of the C ABI (see [`Error::kind`]).

use std::path::PathBuf;

/// Result alias used throughout Ember.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Coarse classification of an [`Error`]; stable, and mirrored one-to-one by the C ABI's
/// `ember_status` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A caller passed something that can never work (bad shape, bad option, bad index).
    InvalidArgument,
    /// Reading or writing a file failed.
    Io,
    /// A file's contents are malformed or inconsistent.
    Format,
    /// The input is well-formed but uses something Ember does not implement.
    Unsupported,
    /// A memory budget, a device limit or an allocation was exceeded.
    OutOfMemory,
    /// The GPU device was lost or could not be created.
    Device,
    /// The caller asked to stop (abort callback).
    Aborted,
    /// A broken internal invariant: a bug in Ember.
    Internal,
}

/// Everything that can go wrong in Ember.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No GPU adapter matched the request.
    #[error("no GPU adapter found{}: {hint}", if .wanted.is_empty() { String::new() } else { format!(" for {}", .wanted) })]
    NoAdapter {
        /// What was asked for (backend / adapter selector), empty when nothing was specified.
        wanted: String,
        /// How to get one.
        hint: String,
    },
    /// Creating the device (or a required feature/limit) failed.
    #[error("GPU device error: {0}")]
    Device(String),
    /// Shapes given to an operation do not fit together.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// Operation name, e.g. `matmul`.
        op: &'static str,
        /// The shapes and what was expected.
        detail: String,
    },
    /// A caller-supplied value is out of range or otherwise unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A device limit would be exceeded.
    #[error("{what} needs {needed} but the device allows {limit}")]
    Limit {
        /// What would exceed the limit.
        what: String,
        /// Amount required.
        needed: u64,
        /// Amount the device (or budget) allows.
        limit: u64,
    },
    /// A memory budget would be exceeded.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The input uses a feature Ember does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A file is malformed.
    #[error("{}: {detail}", .path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<memory>".into()))]
    Format {
        /// The file, when known.
        path: Option<PathBuf>,
        /// What is wrong and where (offset, tensor, key).
        detail: String,
    },
    /// An I/O error with the file it happened on.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The operation was aborted by the caller.
    #[error("aborted")]
    Aborted,
    /// A broken invariant inside Ember.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The stable classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoAdapter { .. } | Error::Device(_) => ErrorKind::Device,
            Error::Shape { .. } | Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Limit { .. } | Error::OutOfMemory(_) => ErrorKind::OutOfMemory,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Format { .. } => ErrorKind::Format,
            Error::Io { .. } => ErrorKind::Io,
            Error::Aborted => ErrorKind::Aborted,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Shorthand for a [`Error::Shape`] error.
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape {
            op,
            detail: detail.into(),
        }
    }

    /// Shorthand for a [`Error::Format`] error about a file.
    pub fn format(path: Option<&std::path::Path>, detail: impl Into<String>) -> Self {
        Error::Format {
            path: path.map(|p| p.to_path_buf()),
            detail: detail.into(),
        }
    }
}
