//! The test network: a bridge in its own namespace (`dk-br`), one namespace per node
//! (`dk-n1`..`dk-n5`) and one for the clients (`dk-cl`), joined by veth pairs created directly
//! inside those namespaces. Nothing in the root namespace is touched: no interface, address,
//! route or firewall rule is added there, and deleting the namespaces removes everything
//! (veth pairs, the bridge, nftables tables).
//!
//! Faults are nftables rules in table `inet dk_nemesis` inside each node's namespace.

use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// Prefix of every namespace this harness creates.
pub const NS_PREFIX: &str = "dk-";
/// Namespace holding the bridge.
pub const BRIDGE_NS: &str = "dk-br";
/// The bridge's name.
pub const BRIDGE: &str = "dkbr0";
/// Namespace of the clients (and of the inner harness process).
pub const CLIENT_NS: &str = "dk-cl";
/// The client namespace's address.
pub const CLIENT_IP: &str = "10.77.0.2";
/// The nftables table of the faults (inside node namespaces only).
pub const TABLE: &str = "dk_nemesis";
/// HTTP port of every node (each has its own address).
pub const HTTP_PORT: u16 = 8098;
/// Peer port of every node.
pub const PEER_PORT: u16 = 9098;

/// Namespace of node `i` (1-based).
pub fn node_ns(i: usize) -> String {
    format!("dk-n{i}")
}

/// Address of node `i` (1-based).
pub fn node_ip(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nft -f -` inside namespace `ns` with `script` on standard input.
pub fn nft_in(ns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning nft in {ns}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .with_context(|| format!("writing nft script for {ns}"))?;
    }
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed ({}): {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespaces that exist now and belong to this harness.
pub fn our_namespaces() -> Result<BTreeSet<String>> {
    let text = run("ip", &["netns", "list"])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Builds the network for `nodes` nodes. Fails if any of our namespaces already exists
/// (run `cleanup` first).
pub fn setup(nodes: usize) -> Result<()> {
    let existing = our_namespaces()?;
    if !existing.is_empty() {
        bail!("leftover namespaces {existing:?}: run `dynakv-nemesis cleanup` first");
    }
    run("ip", &["netns", "add", BRIDGE_NS])?;
    run("ip", &["-n", BRIDGE_NS, "link", "set", "lo", "up"])?;
    run(
        "ip",
        &["-n", BRIDGE_NS, "link", "add", BRIDGE, "type", "bridge"],
    )?;
    run("ip", &["-n", BRIDGE_NS, "link", "set", BRIDGE, "up"])?;
    let mut members: Vec<(String, String, String)> = (1..=nodes)
        .map(|i| (node_ns(i), node_ip(i), format!("dkv-n{i}")))
        .collect();
    members.push((
        CLIENT_NS.to_owned(),
        CLIENT_IP.to_owned(),
        "dkv-cl".to_owned(),
    ));
    for (ns, ip, veth) in &members {
        run("ip", &["netns", "add", ns])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n", BRIDGE_NS, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ],
        )?;
        run(
            "ip",
            &["-n", BRIDGE_NS, "link", "set", veth, "master", BRIDGE],
        )?;
        run("ip", &["-n", BRIDGE_NS, "link", "set", veth, "up"])?;
        let cidr = format!("{ip}/24");
        run("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
    }
    for i in 1..=nodes {
        nft_in(&node_ns(i), &base_table_script())?;
    }
    Ok(())
}

/// The (empty) fault table of a node namespace: input and output chains, policy accept.
fn base_table_script() -> String {
    format!(
        "table inet {TABLE} {{\n  chain input {{ type filter hook input priority 0; policy accept; }}\n  chain output {{ type filter hook output priority 0; policy accept; }}\n}}\n"
    )
}

/// Replaces the rules of node `i`'s table: drop everything from and to `blocked` addresses,
/// and drop `loss_percent` of the packets from `lossy` addresses (nftables `numgen`).
pub fn set_rules(i: usize, blocked: &[String], lossy: &[String], loss_percent: u32) -> Result<()> {
    let mut script = format!("flush chain inet {TABLE} input\nflush chain inet {TABLE} output\n");
    if !blocked.is_empty() {
        let set = blocked.join(", ");
        let _ = write!(
            script,
            "add rule inet {TABLE} input ip saddr {{ {set} }} drop\nadd rule inet {TABLE} output ip daddr {{ {set} }} drop\n"
        );
    }
    if !lossy.is_empty() && loss_percent > 0 {
        let set = lossy.join(", ");
        let _ = writeln!(
            script,
            "add rule inet {TABLE} input ip saddr {{ {set} }} numgen random mod 100 < {loss_percent} drop"
        );
    }
    nft_in(&node_ns(i), &script)
}

/// The pids of the processes in namespace `ns` (`ip netns pids`).
pub fn pids_in(ns: &str) -> Vec<u32> {
    run("ip", &["netns", "pids", ns])
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Sends `signal` (e.g. "KILL", "CONT") to `pid`; errors are ignored (the process may be gone).
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes everything a run may have left: kills every process in our namespaces (except
/// this one), then deletes the namespaces (which removes the veths, the bridge and the
/// nftables tables). Idempotent; returns what it removed.
pub fn cleanup() -> Vec<String> {
    let me = std::process::id();
    let mut removed = Vec::new();
    let Ok(namespaces) = our_namespaces() else {
        return removed;
    };
    for ns in &namespaces {
        for pid in pids_in(ns) {
            if pid != me {
                signal(pid, "KILL");
                signal(pid, "CONT");
                removed.push(format!("process {pid} in {ns}"));
            }
        }
    }
    // Give the kernel a moment to reap killed processes before deleting their namespaces.
    if removed.iter().any(|r| r.starts_with("process")) {
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    for ns in &namespaces {
        if run("ip", &["netns", "del", ns]).is_ok() {
            removed.push(format!("namespace {ns}"));
        }
    }
    removed
}
