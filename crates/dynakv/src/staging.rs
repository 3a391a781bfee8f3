//! `dynakv admin cluster join|leave|replace|force-remove|plan|commit|clear`: membership
//! changes staged, reviewed and then applied together, as Riak's `riak admin cluster`
//! (issue 22).
//!
//! The staged changes are kept in a plan file on the operator's machine (`--plan-file`,
//! `dynakv-cluster-plan.json` in the current directory), not in the cluster: `plan` computes
//! the ring they lead to with the core's claim rules (the ones the claimant runs: joins
//! added, then leaves and removals taken out) from the cluster's current ring, and records
//! the ring version it planned against; `commit` refuses if the ring changed since (plan
//! again), then applies them: force-removals through the member at `--url`, each join on its
//! new node (`/admin/join`), each leave on its node (`/admin/leave`). Joins that reach the
//! claimant in the same gossip round land in one transition, as planned; otherwise the
//! claimant makes more than one, ending at the same members.

use crate::ClientSettings;
use anyhow::{Context as _, Result, bail};
use dynakv_client::Client;
use dynakv_core::ring::{NodeId, Ring, RingNode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;

/// One staged change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The node at `url` (name `node`, zone `zone`) joins through the member at `peer`.
    Join {
        node: String,
        zone: String,
        url: String,
        peer: String,
    },
    /// The member `node` (reached at `url`) leaves, handing its data off.
    Leave { node: String, url: String },
    /// The member `node`, gone for good, is taken out without handoff.
    ForceRemove { node: String },
}

impl Change {
    fn to_json(&self) -> Value {
        match self {
            Change::Join {
                node,
                zone,
                url,
                peer,
            } => json!({"action": "join", "node": node, "zone": zone, "url": url, "peer": peer}),
            Change::Leave { node, url } => json!({"action": "leave", "node": node, "url": url}),
            Change::ForceRemove { node } => json!({"action": "force-remove", "node": node}),
        }
    }

    fn from_json(value: &Value) -> Result<Change> {
        let field = |name: &str| -> Result<String> {
            value[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("a staged change without {name}: {value}"))
        };
        Ok(match value["action"].as_str() {
            Some("join") => Change::Join {
                node: field("node")?,
                zone: field("zone")?,
                url: field("url")?,
                peer: field("peer")?,
            },
            Some("leave") => Change::Leave {
                node: field("node")?,
                url: field("url")?,
            },
            Some("force-remove") => Change::ForceRemove {
                node: field("node")?,
            },
            _ => bail!("an unknown staged change: {value}"),
        })
    }

    fn node(&self) -> &str {
        match self {
            Change::Join { node, .. }
            | Change::Leave { node, .. }
            | Change::ForceRemove { node } => node,
        }
    }

    fn describe(&self) -> String {
        match self {
            Change::Join { node, peer, .. } => format!("join     {node} (through {peer})"),
            Change::Leave { node, .. } => format!("leave    {node}"),
            Change::ForceRemove { node } => format!("force-remove {node} (no handoff)"),
        }
    }
}

/// The plan file: the staged changes, and the ring version `plan` last reviewed them at.
#[derive(Debug, Default)]
pub struct Staged {
    pub changes: Vec<Change>,
    pub planned_at: Option<u64>,
}

impl Staged {
    pub fn load(path: &Path) -> Result<Staged> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Staged::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a plan file", path.display()))?;
        let changes = value["changes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(Change::from_json)
            .collect::<Result<Vec<_>>>()?;
        Ok(Staged {
            changes,
            planned_at: value["planned_at_ring_version"].as_u64(),
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let value = json!({
            "changes": self.changes.iter().map(Change::to_json).collect::<Vec<_>>(),
            "planned_at_ring_version": self.planned_at,
        });
        std::fs::write(path, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Stage `change`, replacing an earlier one for the same node; the plan must be
    /// reviewed again.
    fn stage(&mut self, change: Change) {
        self.changes.retain(|c| c.node() != change.node());
        self.changes.push(change);
        self.planned_at = None;
    }
}

/// What a staging command asks for.
#[derive(Debug, Clone)]
pub enum Command {
    /// The node at --url joins through the member whose peer address is `peer`.
    Join {
        peer: String,
    },
    /// `node` (default: the node at --url) leaves.
    Leave {
        node: Option<String>,
    },
    /// `old` leaves and the node at `new_url` joins in its place.
    Replace {
        old: String,
        new_url: String,
    },
    ForceRemove {
        node: String,
    },
    Plan,
    Commit {
        wait: bool,
    },
    Clear,
}

/// Run one staging command.
pub async fn run(
    settings: &ClientSettings,
    url: &str,
    plan_file: &Path,
    command: Command,
) -> Result<()> {
    let client = settings.client(url)?;
    let mut staged = Staged::load(plan_file)?;
    match command {
        Command::Join { peer } => {
            let change = join_of(&client, url, &peer).await?;
            println!("staged: {}", change.describe());
            staged.stage(change);
        }
        Command::Leave { node } => {
            let node = match node {
                Some(node) => node,
                None => client.get_json("/admin/status").await?["node"]
                    .as_str()
                    .context("the node's status has no name")?
                    .to_owned(),
            };
            let change = Change::Leave {
                url: member_url(&client, url, &node).await?,
                node,
            };
            println!("staged: {}", change.describe());
            staged.stage(change);
        }
        Command::Replace { old, new_url } => {
            let routing = client.get_json("/admin/routing").await?;
            let member = routing["members"]
                .as_object()
                .and_then(|m| m.keys().find(|name| **name != old))
                .context("no other member to join through")?
                .clone();
            let peer = client.get_json("/admin/members").await?["members"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == member.as_str())
                .and_then(|m| m["peer_addr"].as_str())
                .context("the member's peer address")?
                .to_owned();
            let new_client = settings.client(&new_url)?;
            let join = join_of(&new_client, &new_url, &peer).await?;
            let leave = Change::Leave {
                url: member_url(&client, url, &old).await?,
                node: old,
            };
            println!("staged: {}\nstaged: {}", join.describe(), leave.describe());
            staged.stage(join);
            staged.stage(leave);
        }
        Command::ForceRemove { node } => {
            let change = Change::ForceRemove { node };
            println!("staged: {}", change.describe());
            staged.stage(change);
        }
        Command::Plan => {
            let version = plan(settings, &client, url, &staged).await?;
            staged.planned_at = Some(version);
        }
        Command::Commit { wait } => {
            commit(settings, &client, &staged).await?;
            if plan_file.exists() {
                std::fs::remove_file(plan_file)?;
            }
            if wait {
                crate::progress::follow(&client, None).await?;
            } else {
                println!(
                    "committed; follow the transfers with `dynakv admin handoffs` and `ring` \
                     (or commit with --wait)"
                );
            }
            return Ok(());
        }
        Command::Clear => {
            if plan_file.exists() {
                std::fs::remove_file(plan_file)?;
            }
            println!("cleared the staged changes ({})", staged.changes.len());
            return Ok(());
        }
    }
    staged.save(plan_file)
}

/// The staged join of the node at `url` through the member at `peer`.
async fn join_of(client: &Client, url: &str, peer: &str) -> Result<Change> {
    peer.parse::<std::net::SocketAddr>()
        .with_context(|| format!("{peer} is not a member's peer address (HOST:PORT)"))?;
    let status = client.get_json("/admin/status").await?;
    let node = status["node"]
        .as_str()
        .context("the node's status has no name")?;
    let members = client.get_json("/admin/members").await?;
    let own = members["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == node);
    if members["members"].as_array().map_or(0, Vec::len) > 1 {
        bail!("{node} is already a member of a cluster of several nodes");
    }
    Ok(Change::Join {
        node: node.to_owned(),
        zone: own
            .and_then(|m| m["zone"].as_str())
            .unwrap_or_default()
            .to_owned(),
        url: url.to_owned(),
        peer: peer.to_owned(),
    })
}

/// The URL of member `node`'s client port (the scheme of `url`).
async fn member_url(client: &Client, url: &str, node: &str) -> Result<String> {
    let members = client.get_json("/admin/members").await?;
    let addr = members["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == node)
        .and_then(|m| m["http_addr"].as_str())
        .with_context(|| format!("{node} is not a member of this cluster"))?;
    Ok(ClientSettings::member_url(url, addr))
}

/// The ring the staged changes lead to, from `ring`: force-removals, then joins, then leaves
/// (the claimant's order).
pub fn planned_ring(ring: &Ring, changes: &[Change]) -> Result<Ring> {
    let mut target = ring.clone();
    let removals = changes.iter().filter_map(|c| match c {
        Change::ForceRemove { node } => Some(node),
        _ => None,
    });
    for node in removals {
        target = target
            .with_node_removed(&NodeId(node.clone()))
            .with_context(|| format!("force-remove {node}"))?;
    }
    let mut joins: Vec<(&String, &String)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Join { node, zone, .. } => Some((node, zone)),
            _ => None,
        })
        .collect();
    joins.sort();
    for (node, zone) in joins {
        target = target
            .with_node_added(RingNode {
                id: NodeId(node.clone()),
                zone: zone.clone(),
            })
            .with_context(|| format!("join {node}"))?;
    }
    for change in changes {
        if let Change::Leave { node, .. } = change {
            target = target
                .with_node_removed(&NodeId(node.clone()))
                .with_context(|| format!("leave {node}"))?;
        }
    }
    Ok(target)
}

/// Print the plan; returns the ring version it was made at.
async fn plan(
    settings: &ClientSettings,
    client: &Client,
    url: &str,
    staged: &Staged,
) -> Result<u64> {
    let routing = client.get_json("/admin/routing").await?;
    let version = routing["version"].as_u64().context("the ring's version")?;
    if routing["transition"].as_bool() == Some(true) {
        bail!("a ring transition is in progress: plan once `dynakv admin ring` says settled");
    }
    if staged.changes.is_empty() {
        bail!("nothing is staged (cluster join|leave|replace|force-remove first)");
    }
    let ring: Ring = serde_json::from_value(routing["ring"].clone())
        .context("the node's ring could not be read")?;
    let target = planned_ring(&ring, &staged.changes)?;
    println!("staged changes (at ring version {version}):");
    for change in &staged.changes {
        println!("  {}", change.describe());
    }
    // Keys to transfer: each moving partition's keys, as its current owner counts them.
    let mut keys_of: BTreeMap<(String, u32), u64> = BTreeMap::new();
    if let Some(members) = routing["members"].as_object() {
        for (name, member) in members {
            let (Some(addr), true) = (member["http_addr"].as_str(), member["up"] == true) else {
                continue;
            };
            let Ok(node) = settings.client(&ClientSettings::member_url(url, addr)) else {
                continue;
            };
            if let Ok(aae) = node.get_json("/admin/aae").await {
                for p in aae["partitions"].as_array().into_iter().flatten() {
                    if let (Some(partition), Some(keys)) =
                        (p["partition"].as_u64(), p["keys"].as_u64())
                    {
                        let partition = u32::try_from(partition).unwrap_or(u32::MAX);
                        keys_of.insert((name.clone(), partition), keys);
                    }
                }
            }
        }
    }
    let (now, after) = (ring.owners(), target.owners());
    let moving: Vec<(usize, &NodeId, &NodeId)> = now
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(p, (a, b))| (p, a, b))
        .collect();
    let mut keys = 0u64;
    let mut unknown = 0;
    for (p, from, _) in &moving {
        match keys_of.get(&(from.0.clone(), u32::try_from(*p).unwrap_or(u32::MAX))) {
            Some(k) => keys += k,
            None => unknown += 1,
        }
    }
    println!(
        "\n{} of {} partitions move; about {keys} keys to transfer (the moving partitions' \
         keys as their owners count them; replicas whose preference lists shift move too){}",
        moving.len(),
        now.len(),
        if unknown > 0 {
            format!(" (and {unknown} partitions whose owner did not answer)")
        } else {
            String::new()
        }
    );
    for (p, from, to) in moving.iter().take(64) {
        println!("  partition {p:>4}: {from} -> {to}");
    }
    if moving.len() > 64 {
        println!("  ... and {} more", moving.len() - 64);
    }
    let mut names: Vec<&NodeId> = now.iter().chain(after).collect();
    names.sort();
    names.dedup();
    println!("\n{:<20} {:>6} {:>6}", "NODE", "NOW", "AFTER");
    for name in names {
        let count = |owners: &[NodeId]| owners.iter().filter(|o| *o == name).count();
        println!("{:<20} {:>6} {:>6}", name.0, count(now), count(after));
    }
    println!("\n`dynakv admin cluster commit` applies it; `cluster clear` drops it");
    Ok(version)
}

async fn commit(settings: &ClientSettings, client: &Client, staged: &Staged) -> Result<()> {
    let Some(planned) = staged.planned_at else {
        bail!("review the changes first: `dynakv admin cluster plan`");
    };
    let routing = client.get_json("/admin/routing").await?;
    if routing["version"].as_u64() != Some(planned) {
        bail!(
            "the ring changed since the plan (version {planned}, now {}): plan again",
            routing["version"]
        );
    }
    for change in &staged.changes {
        if let Change::ForceRemove { node } = change {
            client
                .post_json("/admin/force-remove", &json!({"node": node}).to_string())
                .await
                .with_context(|| format!("force-remove {node}"))?;
            println!("force-removed {node}");
        }
    }
    for change in &staged.changes {
        if let Change::Join {
            node, url, peer, ..
        } = change
        {
            settings
                .client(url)?
                .post_json("/admin/join", &json!({"peer": peer}).to_string())
                .await
                .with_context(|| format!("join {node}"))?;
            println!("{node} joined");
        }
    }
    for change in &staged.changes {
        if let Change::Leave { node, url } = change {
            settings
                .client(url)?
                .post_json("/admin/leave", "{}")
                .await
                .with_context(|| format!("leave {node}"))?;
            println!("{node} is leaving");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_the_claimants_ring_and_the_file_round_trips() {
        let ring = Ring::new(
            16,
            RingNode {
                id: NodeId("a".into()),
                zone: String::new(),
            },
        )
        .unwrap()
        .with_node_added(RingNode {
            id: NodeId("b".into()),
            zone: String::new(),
        })
        .unwrap();
        let changes = vec![
            Change::Join {
                node: "c".into(),
                zone: String::new(),
                url: "http://127.0.0.1:1".into(),
                peer: "127.0.0.1:2".into(),
            },
            Change::Leave {
                node: "a".into(),
                url: "http://127.0.0.1:3".into(),
            },
        ];
        let target = planned_ring(&ring, &changes).unwrap();
        let expected = ring
            .with_node_added(RingNode {
                id: NodeId("c".into()),
                zone: String::new(),
            })
            .unwrap()
            .with_node_removed(&NodeId("a".into()))
            .unwrap();
        assert_eq!(target.owners(), expected.owners());
        assert!(!target.owners().contains(&NodeId("a".into())));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.json");
        let mut staged = Staged::default();
        for c in changes.clone() {
            staged.stage(c);
        }
        staged.stage(Change::ForceRemove { node: "b".into() });
        staged.planned_at = Some(9);
        staged.save(&path).unwrap();
        let read = Staged::load(&path).unwrap();
        assert_eq!(read.changes.len(), 3);
        assert_eq!(read.changes[..2], changes[..]);
        assert_eq!(read.planned_at, Some(9));
        // Staging again for a node replaces its change and asks for a new review.
        let mut read = read;
        read.stage(Change::Leave {
            node: "b".into(),
            url: "http://127.0.0.1:4".into(),
        });
        assert_eq!(read.changes.len(), 3);
        assert_eq!(read.planned_at, None);
        assert!(planned_ring(&ring, &[Change::ForceRemove { node: "zz".into() }]).is_err());
    }
}
