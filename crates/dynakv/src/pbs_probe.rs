//! `dynakv admin pbs --probe TRIALS`: the PBS prediction checked on a live cluster (issue
//! 22). For each t, TRIALS writes of fresh keys (`?w=W`) each through one member, and t ms
//! after each acknowledgement a read (`?r=R`) through another; the share of reads that
//! returned the write is printed beside the node's prediction (`/admin/pbs`, made from the
//! round trips measured while the probe ran). The probe's keys go to bucket `dynakv-pbs-probe`
//! and are deleted afterwards.

use crate::ClientSettings;
use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use hyper::Method;

const BUCKET: &str = "dynakv-pbs-probe";

/// Run the probe against the members of the node at `url`.
pub async fn probe(
    settings: &ClientSettings,
    url: &str,
    (r, w): (usize, usize),
    t_ms: &[u64],
    trials: usize,
) -> Result<Vec<(u64, usize, usize)>> {
    let entry = settings.client(url)?;
    let members = entry.get_json("/admin/members").await?;
    let clients = members["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["up"].as_bool() == Some(true))
        .filter_map(|m| m["http_addr"].as_str())
        .map(|addr| settings.client(&ClientSettings::member_url(url, addr)))
        .collect::<Result<Vec<_>>>()?;
    if clients.len() < 2 {
        bail!(
            "the probe needs two members that are up (it writes through one, reads through another)"
        );
    }
    let mut measured = Vec::new();
    let run = std::process::id();
    for (k, t) in t_ms.iter().enumerate() {
        let mut fresh = 0;
        for trial in 0..trials {
            let writer = &clients[trial % clients.len()];
            let reader = &clients[(trial + 1) % clients.len()];
            let key = format!("{run}-{k}-{trial}");
            let value = format!("v{trial}");
            let path = format!("/buckets/{BUCKET}/keys/{key}");
            let (status, _, body) = writer
                .request(
                    Method::PUT,
                    &format!("{path}?w={w}"),
                    &[("content-type", "text/plain")],
                    Bytes::from(value.clone()),
                )
                .await?;
            if !status.is_success() {
                bail!(
                    "probe write refused: {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            if *t > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(*t)).await;
            }
            let (status, _, body) = reader
                .request(Method::GET, &format!("{path}?r={r}"), &[], Bytes::new())
                .await?;
            fresh += usize::from(status.is_success() && body.as_ref() == value.as_bytes());
            let _ = writer
                .request(Method::DELETE, &path, &[], Bytes::new())
                .await
                .context("deleting a probe key")?;
        }
        eprintln!("t = {t} ms: {fresh} of {trials} reads returned the write");
        measured.push((*t, fresh, trials));
    }
    Ok(measured)
}
