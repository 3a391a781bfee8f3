//! The anti-entropy trees live in `dynakv_core::aae_trees` (shared with the simulator), and
//! the per-partition exchange records in `dynakv_core::anti_entropy`; this module
//! re-exports them.

pub use dynakv_core::aae_trees::*;
pub use dynakv_core::anti_entropy::AaeRecord;
