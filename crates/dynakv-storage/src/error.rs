//! Errors of opening an engine, and the conversion of engine errors into [`EngineFailure`].
//!
//! The operations of the `Storage` trait have their own error enums in `dynakv-core`; opening an
//! engine is not part of the trait, so its error lives here.

use std::path::PathBuf;

use dynakv_core::storage::EngineFailure;
use thiserror::Error;

/// Failure to open (create or recover) a storage engine.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The options are out of the engine's accepted range.
    #[error("invalid storage options: {0}")]
    InvalidOptions(String),
    /// The data directory could not be created.
    #[error("cannot create data directory {}: {source}", path.display())]
    CreateDir {
        /// The directory that could not be created.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The engine's files fail their checksums or cannot be decoded: the data directory is
    /// damaged, and opening it again will fail the same way.
    #[error("the stored data is corrupt: {0}")]
    Corrupt(EngineFailure),
    /// The engine gave up recovering its files without saying why beyond its log: a damaged
    /// file, or a file it does not expect in its directories (fjall's `Unrecoverable`).
    #[error("the engine cannot recover its files: {0}")]
    Unrecoverable(EngineFailure),
    /// The engine refused to open or recover its files (I/O error, lock held by another
    /// process).
    #[error("open failed: {0}")]
    Engine(#[from] EngineFailure),
}

/// An [`EngineFailure`] from any displayable engine error.
pub(crate) fn failure(engine: &'static str, error: impl std::fmt::Display) -> EngineFailure {
    EngineFailure {
        engine,
        message: error.to_string(),
    }
}
