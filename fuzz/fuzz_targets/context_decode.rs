//! The client context decoder (`X-Riak-Vclock`): no panic on any text, and nothing decodes
//! without the MAC of this key, bucket and key (a forged context is refused).
#![no_main]

use dynakv_core::context::{self, ContextKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let key = ContextKey::from_bytes([5; 32]);
    if let Ok(clock) = context::decode(&key, b"bucket", b"key", text) {
        // Only a context this key signed decodes: it re-encodes to the same text.
        assert_eq!(context::encode(&key, b"bucket", b"key", &clock), text);
    }
});
