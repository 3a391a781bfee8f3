//! dynakv-client
