//! What can be wrong with an experiment: a configuration that cannot run, or a file that
//! cannot be written.

use core::fmt;
use std::path::PathBuf;

use nsa_burn::NsaConfigError;

/// An experiment that cannot run, naming the setting and the rule it breaks.
#[derive(Debug)]
pub enum RecallError {
    /// A size that must be at least 1 is 0.
    Zero {
        /// The setting.
        field: &'static str,
    },
    /// A list that must not be empty is.
    Empty {
        /// The setting.
        field: &'static str,
    },
    /// A number that must be finite and positive is not.
    NotPositive {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// Fewer distinct keys than pairs per sequence.
    TooFewKeys {
        /// Distinct key tokens.
        keys: usize,
        /// Pairs per sequence.
        pairs: usize,
    },
    /// A depth band that is not `0 <= from < to <= 1`.
    DepthRange {
        /// Start of the band.
        from: f64,
        /// End of the band.
        to: f64,
    },
    /// The pairs do not fit in their depth band of the sequence.
    BandTooShort {
        /// Sequence length.
        seq_len: usize,
        /// Start of the band.
        from: f64,
        /// End of the band.
        to: f64,
        /// Pairs per sequence (two tokens each).
        pairs: usize,
    },
    /// The NSA layer's configuration is invalid.
    Nsa(NsaConfigError),
    /// A file or folder could not be written.
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl fmt::Display for RecallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero { field } => write!(f, "`{field}` must be at least 1, got 0"),
            Self::Empty { field } => write!(f, "`{field}` must list at least one value"),
            Self::NotPositive { field, value } => {
                write!(f, "`{field}` must be finite and positive, got {value}")
            }
            Self::TooFewKeys { keys, pairs } => write!(
                f,
                "`keys` ({keys}) must be at least `pairs` ({pairs}): the keys of a sequence \
                 are distinct"
            ),
            Self::DepthRange { from, to } => write!(
                f,
                "a depth band must satisfy 0 <= from < to <= 1, got {from}..{to}"
            ),
            Self::BandTooShort {
                seq_len,
                from,
                to,
                pairs,
            } => write!(
                f,
                "{pairs} pairs (two tokens each) do not fit in the depth band {from}..{to} of \
                 a sequence of {seq_len} tokens"
            ),
            Self::Nsa(error) => write!(f, "NSA layer: {error}"),
            Self::Io { path, source } => write!(f, "cannot write {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for RecallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Nsa(error) => Some(error),
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<NsaConfigError> for RecallError {
    fn from(error: NsaConfigError) -> Self {
        Self::Nsa(error)
    }
}

/// `Err(NotPositive)` unless `value` is finite and positive.
pub(crate) fn positive(field: &'static str, value: f64) -> Result<(), RecallError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(RecallError::NotPositive { field, value })
    }
}

/// `Err(Zero)` if `value` is 0.
pub(crate) fn nonzero(field: &'static str, value: usize) -> Result<(), RecallError> {
    if value == 0 {
        Err(RecallError::Zero { field })
    } else {
        Ok(())
    }
}
