//! The accepting side of the peer handshake on an arbitrary first message and third message:
//! the prefix check and the Noise responder refuse without panicking, whatever arrives.
#![no_main]

use dynakv_server::link::LinkKeys;
use dynakv_server::secrets::{ClusterSecret, NodeKey};
use dynakv_server::transport::{
    PREVIOUS_PROTOCOL_VERSION, PROTOCOL_VERSION, check_handshake_prefix, older_version_in_refusal,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a current node and as a node playing the previous version; and a refusal's text as
    // the connecting side reads it.
    for newest in [PROTOCOL_VERSION, PREVIOUS_PROTOCOL_VERSION] {
        if let Ok(version) = check_handshake_prefix(data, newest) {
            assert!(version <= newest);
        }
    }
    if let Some(version) =
        older_version_in_refusal(&String::from_utf8_lossy(data), PROTOCOL_VERSION)
    {
        assert!(version < PROTOCOL_VERSION);
    }
    let keys = LinkKeys::new(
        &ClusterSecret::from_bytes([1; 32]),
        &NodeKey::from_private([2; 32]),
    );
    let mut responder = keys.responder().unwrap();
    let mut payload = vec![0_u8; 65_535];
    let (first, third) = data.split_at(data.len() / 2);
    if responder.read_message(first, &mut payload).is_ok() {
        let mut message = vec![0_u8; 1024];
        if responder.write_message(&[], &mut message).is_ok() {
            let _ = responder.read_message(third, &mut payload);
        }
    }
});
