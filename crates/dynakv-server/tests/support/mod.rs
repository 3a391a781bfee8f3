//! Helpers shared by the in-process cluster tests.
#![allow(clippy::unwrap_used, dead_code)]

/// One cluster secret file for every node these tests start (the operator's copy).
pub fn shared_secret_file() -> std::path::PathBuf {
    static FILE: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        dynakv_server::secrets::ClusterSecret::generate()
            .write(&path)
            .unwrap();
        (dir, path)
    })
    .1
    .clone()
}
