//! The cost of the peer links' encryption on this machine: Noise handshakes per second, and
//! sealing + opening throughput for frames of the sizes the cluster sends (a 1 KiB replica
//! write, a 64 KiB batch). Run: `cargo run --release -p dynakv-server --example link_bench`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use dynakv_server::link::{self, LinkKeys, Opener, Sealer};
use dynakv_server::secrets::{ClusterSecret, NodeKey};
use std::time::Instant;

fn pair() -> ((Sealer, Opener), (Sealer, Opener)) {
    let secret = ClusterSecret::generate();
    let link = link::in_memory_link(
        &LinkKeys::new(&secret, &NodeKey::generate()),
        &LinkKeys::new(&secret, &NodeKey::generate()),
        b"hello",
    )
    .unwrap();
    let ends = |state: std::sync::Arc<link::TransportState>| {
        (
            Sealer::new(state.clone()),
            Opener::new(state, BytesMut::new()),
        )
    };
    (ends(link.initiator.0), ends(link.responder.0))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds = 2_000;
    let started = Instant::now();
    for _ in 0..rounds {
        let _ = pair();
    }
    let per = started.elapsed() / rounds;
    println!("handshake (both sides, 3 messages, in memory): {per:?} each");

    for (size, frames_per_batch) in [(1024_usize, 1_usize), (1024, 32), (64 * 1024, 1)] {
        let ((mut sealer, _), (_, mut opener)) = pair();
        let mut frame = (size as u32).to_be_bytes().to_vec();
        frame.extend(std::iter::repeat_n(7_u8, size));
        let plain: Vec<u8> = frame.repeat(frames_per_batch);
        let batches = (64 * 1024 * 1024 / plain.len()).max(100);
        let mut sealed = Vec::new();
        let started = Instant::now();
        for _ in 0..batches {
            sealed.clear();
            sealer.seal(&plain, &mut sealed).unwrap();
            let mut reader = &sealed[..];
            for _ in 0..frames_per_batch {
                opener
                    .read_frame(&mut reader, 1 << 20)
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
        let elapsed = started.elapsed();
        let frames = batches * frames_per_batch;
        let bytes = (frames * size) as f64;
        println!(
            "{size} B frames, {frames_per_batch} per write: seal+open {:.2} us/frame, {:.0} MB/s",
            elapsed.as_secs_f64() * 1e6 / frames as f64,
            bytes / elapsed.as_secs_f64() / 1e6
        );
    }
}
