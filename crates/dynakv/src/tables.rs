//! `dynakv admin status|members|ring|handoffs|aae` for people: the node's JSON answers
//! rendered as aligned tables (`--json` prints the JSON itself, for scripts).
//!
//! Rendering never fails on an answer of an unexpected shape (a newer or older node): a
//! missing field prints as `-`.

use serde_json::Value;
use std::fmt::Write as _;

/// Which answer a table renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Status,
    Members,
    Ring,
    Handoffs,
    Aae,
    Pbs,
}

/// The text of `view` for the node's answer `value`.
pub fn render(view: View, value: &Value) -> String {
    match view {
        View::Status => status(value),
        View::Members => members(value),
        View::Ring => ring(value),
        View::Handoffs => handoffs(value),
        View::Aae => aae(value),
        View::Pbs => pbs(value),
    }
}

/// A cell of a JSON field: strings bare, numbers as they are, booleans as yes/no, a missing
/// or null field as `-`.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(_) => value.to_string(),
    }
}

/// An aligned table: a header row, then the rows; numeric columns right-aligned.
#[derive(Debug, Default)]
struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        // A column whose every cell is a number (or `-`) is right-aligned.
        let numeric: Vec<bool> = (0..columns)
            .map(|i| {
                let number = |c: &String| c.parse::<f64>().is_ok() || c.ends_with('%');
                self.rows.iter().any(|row| row.get(i).is_some_and(number))
                    && self
                        .rows
                        .iter()
                        .all(|row| row.get(i).is_none_or(|c| c == "-" || number(c)))
            })
            .collect();
        let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
            let mut text = String::new();
            for (i, cell) in cells.enumerate().take(columns) {
                if i > 0 {
                    text.push_str("  ");
                }
                let width = widths[i];
                if numeric[i] {
                    let _ = write!(text, "{cell:>width$}");
                } else {
                    let _ = write!(text, "{cell:<width$}");
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut self.headers.iter().copied(), out);
        for row in &self.rows {
            line(&mut row.iter().map(String::as_str), out);
        }
    }
}

/// `name: value` lines, the names aligned.
fn pairs(out: &mut String, pairs: &[(&str, String)]) {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (name, value) in pairs {
        let _ = writeln!(out, "{:<width$} {value}", format!("{name}:"));
    }
}

fn items(value: &Value, field: &str) -> Vec<Value> {
    value
        .get(field)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn status(value: &Value) -> String {
    let mut out = String::new();
    let members = items(value, "members");
    let names: Vec<String> = members.iter().map(cell).collect();
    pairs(
        &mut out,
        &[
            ("node", cell(&value["node"])),
            ("cluster", cell(&value["cluster"])),
            ("version", cell(&value["version"])),
            (
                "peer protocol",
                format!(
                    "{} (accepts {})",
                    cell(&value["protocol_version"]),
                    items(value, "protocol_versions_accepted")
                        .iter()
                        .map(cell)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            ("actor", cell(&value["actor"])),
            ("storage engine", cell(&value["storage_engine"])),
            (
                "ring",
                format!(
                    "{} partitions, version {}, {}",
                    cell(&value["ring_partitions"]),
                    cell(&value["ring_version"]),
                    if value["settled"].as_bool() == Some(true) {
                        "settled"
                    } else {
                        "in transition"
                    }
                ),
            ),
            ("members", format!("{} ({})", names.len(), names.join(", "))),
            ("max value bytes", cell(&value["max_value_bytes"])),
        ],
    );
    out
}

fn members(value: &Value) -> String {
    let members = items(value, "members");
    let total: u64 = members
        .iter()
        .filter_map(|m| m["partitions"].as_u64())
        .sum();
    let mut table = Table::new(&[
        "NAME",
        "STATUS",
        "UP",
        "ZONE",
        "PARTITIONS",
        "RING",
        "NEXT",
        "PROTO",
        "PEER",
        "HTTP",
    ]);
    for m in &members {
        let share = m["partitions"]
            .as_u64()
            .filter(|_| total > 0)
            .map_or_else(|| "-".into(), |p| percent(p, total));
        table.row(vec![
            cell(&m["name"]),
            cell(&m["status"]),
            cell(&m["up"]),
            cell(&m["zone"]),
            cell(&m["partitions"]),
            share,
            cell(&m["partitions_next"]),
            cell(&m["protocol"]),
            cell(&m["peer_addr"]),
            cell(&m["http_addr"]),
        ]);
    }
    let mut out = String::new();
    table.render(&mut out);
    let up = members
        .iter()
        .filter(|m| m["up"].as_bool() == Some(true))
        .count();
    let _ = writeln!(out, "{} members, {up} up", members.len());
    out
}

fn percent(part: u64, total: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // partition counts are small
    let share = part as f64 * 100.0 / total as f64;
    format!("{share:.1}%")
}

fn ring(value: &Value) -> String {
    let mut out = String::new();
    let partitions = value["partitions"].as_u64().unwrap_or(0);
    let settled = value["settled"].as_bool() == Some(true);
    pairs(
        &mut out,
        &[
            ("partitions", cell(&value["partitions"])),
            ("version", cell(&value["version"])),
            (
                "state",
                if settled {
                    "settled".into()
                } else {
                    "in transition".into()
                },
            ),
            ("claimant", cell(&value["claimant"])),
        ],
    );
    out.push('\n');
    let owners: Vec<String> = items(value, "owners").iter().map(cell).collect();
    let next: Option<Vec<String>> = value["next_owners"]
        .as_array()
        .map(|n| n.iter().map(cell).collect());
    let mut table = Table::new(&["NODE", "PARTITIONS", "SHARE", "AFTER TRANSITION"]);
    for entry in items(value, "ownership") {
        let node = cell(&entry["node"]);
        let count = entry["partitions"].as_u64().unwrap_or(0);
        let after = next.as_ref().map_or_else(
            || "-".into(),
            |next| next.iter().filter(|o| **o == node).count().to_string(),
        );
        table.row(vec![
            node,
            count.to_string(),
            if partitions > 0 {
                percent(count, partitions)
            } else {
                "-".into()
            },
            after,
        ]);
    }
    table.render(&mut out);
    // The ring drawn: one letter per partition, in ring order (the legend gives the node).
    if !owners.is_empty() {
        let mut legend: Vec<&str> = owners.iter().map(String::as_str).collect();
        legend.sort_unstable();
        legend.dedup();
        let letter = |owner: &str| {
            legend
                .iter()
                .position(|n| *n == owner)
                .and_then(|i| u8::try_from(i).ok())
                .filter(|i| *i < 26)
                .map_or('?', |i| char::from(b'a' + i))
        };
        out.push('\n');
        let _ = writeln!(out, "ring (partition 0 first, 64 per line):");
        let draw = |owners: &[String], out: &mut String| {
            for chunk in owners.chunks(64) {
                let line: String = chunk.iter().map(|o| letter(o)).collect();
                let _ = writeln!(out, "  {line}");
            }
        };
        draw(&owners, &mut out);
        if let Some(next) = &next {
            let _ = writeln!(out, "after the transition:");
            draw(next, &mut out);
        }
        let legend: Vec<String> = legend
            .iter()
            .map(|n| format!("{}={n}", letter(n)))
            .collect();
        let _ = writeln!(out, "  {}", legend.join(" "));
    }
    out
}

fn handoffs(value: &Value) -> String {
    let mut out = String::new();
    if value["in_progress"].as_bool() == Some(true) {
        let moving = items(value, "partitions_moving");
        let _ = writeln!(
            out,
            "ring transition {}: {} partitions moving",
            cell(&value["transition"]),
            moving.len()
        );
        let mut table = Table::new(&["PARTITION", "FROM", "TO"]);
        for m in &moving {
            table.row(vec![
                cell(&m["partition"]),
                cell(&m["from"]),
                cell(&m["to"]),
            ]);
        }
        table.render(&mut out);
        let mut nodes = Table::new(&["NODE", "HANDOFF DONE"]);
        for n in items(value, "nodes") {
            nodes.row(vec![cell(&n["node"]), cell(&n["done"])]);
        }
        out.push('\n');
        nodes.render(&mut out);
    } else {
        let _ = writeln!(out, "no ring transition in progress");
    }
    let hints = &value["hints"];
    out.push('\n');
    let held = items(hints, "held_per_target");
    if held.is_empty() {
        let _ = writeln!(out, "no hints held");
    } else {
        let mut table = Table::new(&["HINTS FOR", "KEYS"]);
        for h in &held {
            table.row(vec![cell(&h["target"]), cell(&h["keys"])]);
        }
        table.render(&mut out);
    }
    let _ = writeln!(
        out,
        "hints stored {}, delivered {}, dropped {}, corrupt {} (since start)",
        cell(&hints["stored_total"]),
        cell(&hints["delivered_total"]),
        cell(&hints["dropped_total"]),
        cell(&hints["corrupt_total"])
    );
    out
}

fn aae(value: &Value) -> String {
    let mut out = String::new();
    let partitions = items(value, "partitions");
    let mut table = Table::new(&[
        "PARTITION",
        "KEYS",
        "EXCHANGES",
        "LAST (s ago)",
        "PEER",
        "REPAIRED LAST",
        "REPAIRED TOTAL",
    ]);
    for p in &partitions {
        let ago = p["last_exchange_seconds_ago"]
            .as_f64()
            .map_or_else(|| "never".into(), |s| format!("{s:.1}"));
        table.row(vec![
            cell(&p["partition"]),
            cell(&p["keys"]),
            cell(&p["exchanges"]),
            ago,
            cell(&p["last_peer"]),
            cell(&p["keys_repaired_last"]),
            cell(&p["keys_repaired_total"]),
        ]);
    }
    table.render(&mut out);
    let repaired: u64 = partitions
        .iter()
        .filter_map(|p| p["keys_repaired_total"].as_u64())
        .sum();
    let never = partitions
        .iter()
        .filter(|p| p["last_exchange_seconds_ago"].is_null())
        .count();
    let _ = writeln!(
        out,
        "{} partitions held here, {never} never exchanged; {repaired} keys repaired; budget {} keys per round",
        partitions.len(),
        cell(&value["budget_keys_per_round"])
    );
    out
}

fn pbs(value: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "N={} R={} W={}: predicted from {} write and {} read round trips measured by this node",
        cell(&value["n"]),
        cell(&value["r"]),
        cell(&value["w"]),
        cell(&value["samples"]["writes"]),
        cell(&value["samples"]["reads"])
    );
    let measured = items(value, "measured");
    let mut table = if measured.is_empty() {
        Table::new(&["t (ms)", "P(read returns the write)"])
    } else {
        Table::new(&["t (ms)", "P(read returns the write)", "measured (probe)"])
    };
    for (i, p) in items(value, "t_visibility").iter().enumerate() {
        let probability = p["probability"]
            .as_f64()
            .map_or_else(|| "-".into(), |x| format!("{x:.4}"));
        let mut row = vec![cell(&p["t_ms"]), probability];
        if let Some(m) = measured.get(i) {
            let (fresh, reads) = (
                m["fresh"].as_u64().unwrap_or(0),
                m["reads"].as_u64().unwrap_or(0),
            );
            #[allow(clippy::cast_precision_loss)] // trial counts
            let share = fresh as f64 / reads.max(1) as f64;
            row.push(format!("{share:.4} ({fresh}/{reads})"));
        }
        table.row(row);
    }
    table.render(&mut out);
    let k: Vec<String> = items(value, "k_staleness")
        .iter()
        .map(|k| {
            format!(
                "k={}: {:.4}",
                cell(&k["k"]),
                k["probability"].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "a read returns one of the last k acknowledged versions (no time): {}",
        k.join(", ")
    );
    let _ = writeln!(out, "{}", cell(&value["note"]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_are_an_aligned_table_with_shares() {
        let value = json!({"members": [
            {"name": "n1", "zone": "", "status": "valid", "peer_addr": "127.0.0.1:9001",
             "http_addr": "127.0.0.1:8001", "up": true, "partitions": 22, "partitions_next": null,
             "protocol": 4},
            {"name": "node-two", "zone": "z2", "status": "leaving", "peer_addr": "127.0.0.1:9002",
             "http_addr": "127.0.0.1:8002", "up": false, "partitions": 42, "partitions_next": 0,
             "protocol": 3},
        ]});
        let text = render(View::Members, &value);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("NAME      STATUS   UP   ZONE  PARTITIONS"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("n1        valid    yes  -             22  34.4%"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("node-two  leaving  no   z2            42  65.6%"),
            "{text}"
        );
        assert_eq!(lines[3], "2 members, 1 up");
        // Every row's columns start where the header's do.
        let peer = lines[0].find("PEER").unwrap();
        assert_eq!(&lines[1][peer..peer + 9], "127.0.0.1");
        let proto = lines[0].find("PROTO").unwrap();
        assert_eq!(lines[1][proto..proto + 5].trim(), "4");
        assert_eq!(lines[2][proto..proto + 5].trim(), "3");
    }

    #[test]
    fn the_ring_is_drawn_with_a_legend() {
        let value = json!({"partitions": 4, "version": 3, "settled": false, "claimant": "a",
            "ownership": [{"node": "a", "partitions": 3}, {"node": "b", "partitions": 1}],
            "owners": ["a", "b", "a", "a"], "next_owners": ["a", "b", "b", "a"]});
        let text = render(View::Ring, &value);
        assert!(text.contains("state:      in transition"), "{text}");
        assert!(text.contains("\n  abaa\n"), "{text}");
        assert!(text.contains("after the transition:\n  abba\n"), "{text}");
        assert!(text.contains("a=a b=b"), "{text}");
        assert!(
            text.contains("a              3  75.0%                 2"),
            "{text}"
        );
    }

    #[test]
    fn odd_answers_print_dashes_not_panics() {
        for view in [
            View::Status,
            View::Members,
            View::Ring,
            View::Handoffs,
            View::Aae,
        ] {
            for value in [
                json!(null),
                json!({}),
                json!({"members": 5, "partitions": "x"}),
            ] {
                let _ = render(view, &value);
            }
        }
        let text = render(
            View::Handoffs,
            &json!({"in_progress": false, "hints": {
            "held_per_target": [{"target": "n3", "keys": 12}], "stored_total": 12}}),
        );
        assert!(text.contains("no ring transition in progress"), "{text}");
        assert!(text.contains("n3           12"), "{text}");
        assert!(text.contains("delivered -"), "{text}");
    }
}
