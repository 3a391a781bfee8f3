//! Progress of a ring transition (issue 22): `dynakv admin leave --wait` and `dynakv admin
//! cluster commit --wait` follow it from the node at --url until the ring has settled,
//! printing a line whenever the partitions still moving or the nodes done handing off
//! change.

use anyhow::Result;
use dynakv_client::Client;
use std::time::{Duration, Instant};

/// How often the node is asked.
const POLL: Duration = Duration::from_millis(500);
/// A change that starts no transition within this long needs none.
const NO_TRANSITION: Duration = Duration::from_secs(5);

/// Follow the ring from `client`'s node until it has settled (and, with `leaving`, until
/// that node has exited).
pub async fn follow(client: &Client, leaving: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let mut last = String::new();
    // A change is planned by the claimant at its next gossip round: wait for it to start.
    let mut seen_transition = false;
    loop {
        let handoffs = client.get_json("/admin/handoffs").await?;
        let in_progress = handoffs["in_progress"].as_bool() == Some(true);
        seen_transition |= in_progress;
        let moving = handoffs["partitions_moving"].as_array().map_or(0, Vec::len);
        let nodes = handoffs["nodes"].as_array().cloned().unwrap_or_default();
        let done = nodes.iter().filter(|n| n["done"] == true).count();
        let hints: u64 = handoffs["hints"]["held_per_target"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["keys"].as_u64())
            .sum();
        let exited = match leaving {
            None => true,
            Some(name) => client.get_json("/admin/members").await?["members"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["name"] == name && m["status"] == "exiting"),
        };
        let line = if in_progress {
            format!(
                "transition {}: {moving} partitions moving; {done} of {} nodes done handing off; {hints} hints held here",
                handoffs["transition"],
                nodes.len()
            )
        } else if seen_transition || exited {
            format!("ring settled; {hints} hints held here")
        } else {
            "waiting for the claimant to plan the change".to_owned()
        };
        if line != last {
            eprintln!("{:>6.1} s  {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        // Settled after a transition; or no transition came within a few gossip rounds (a
        // change that needs none, such as a force-removal).
        if !in_progress && exited && (seen_transition || started.elapsed() > NO_TRANSITION) {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}
