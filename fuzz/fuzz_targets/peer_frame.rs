//! The peer transport's frame decoder and message decoder on arbitrary bytes (what a peer's
//! decrypted stream may hold), and the record layer's opener on arbitrary ciphertext: no
//! panic, no allocation beyond what was received, and a decoded message re-encodes.
#![no_main]

use bytes::BytesMut;
use dynakv_core::message::PeerMessage;
use dynakv_server::link::{self, LinkKeys, Opener};
use dynakv_server::secrets::{ClusterSecret, NodeKey};
use dynakv_server::transport::{
    Envelope, PREVIOUS_PROTOCOL_VERSION, decode_envelope, decode_envelope_payload, decode_frame,
    encode_envelope, encode_frame,
};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

const LIMIT: usize = 1 << 20;

/// A finished link's receiving state (the fuzz input is what arrives on it).
fn state() -> Arc<link::TransportState> {
    static STATE: OnceLock<Arc<link::TransportState>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let secret = ClusterSecret::from_bytes([1; 32]);
            let initiator = LinkKeys::new(&secret, &NodeKey::from_private([2; 32]));
            let responder = LinkKeys::new(&secret, &NodeKey::from_private([3; 32]));
            link::in_memory_link(&initiator, &responder, b"")
                .unwrap()
                .responder
                .0
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut buffer = BytesMut::from(data);
    while let Ok(Some(envelope)) = decode_envelope::<PeerMessage>(&mut buffer, LIMIT) {
        let frame = encode_frame(&envelope, LIMIT).unwrap();
        let mut again = BytesMut::from(&frame[..]);
        let decoded: Envelope<PeerMessage> = decode_envelope(&mut again, LIMIT).unwrap().unwrap();
        assert_eq!(decoded, envelope);
    }
    // The same bytes from a peer speaking the previous version (a node not yet upgraded):
    // read as version 3's messages, converted; what converts back reads back the same.
    let mut buffer = BytesMut::from(data);
    let peer = "127.0.0.1:1".parse().unwrap();
    while let Ok(Some(payload)) = decode_frame(&mut buffer, LIMIT) {
        let Ok(envelope) =
            decode_envelope_payload::<PeerMessage>(&payload, PREVIOUS_PROTOCOL_VERSION)
        else {
            break;
        };
        if let Ok(frame) = encode_envelope(envelope.clone(), PREVIOUS_PROTOCOL_VERSION, peer, LIMIT)
        {
            let again: Envelope<PeerMessage> =
                decode_envelope_payload(&frame[4..], PREVIOUS_PROTOCOL_VERSION).unwrap();
            assert_eq!(again, envelope);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut opener = Opener::new(state(), BytesMut::new());
    let mut reader = data;
    runtime
        .block_on(async { while let Ok(Some(_)) = opener.read_frame(&mut reader, LIMIT).await {} });
});
