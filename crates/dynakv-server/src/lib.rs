//! dynakv-server
