//! `dynakv admin backup --out FILE` and `dynakv admin restore FILE` (issue 22).
//!
//! Backup: every partition of the ring is read page by page from the first of its
//! replicas that is up (its owner first: the only replica of an `n_val` 1 bucket), and the
//! stored objects (clock, siblings, tombstones) are written as `dynakv_core::backup`
//! records to `FILE.partial`, synced and renamed to `FILE` once the end record is written.
//! Memory is one page. Restore: the file's records are checked as they are read and sent in
//! batches to a node, which merges each into its key's primaries (never replacing newer
//! data; running a restore twice changes nothing). Both show their progress on stderr.

use crate::ClientSettings;
use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use dynakv_client::Client;
use dynakv_core::backup::{self, Header, Reader};
use dynakv_core::ring::Ring;
use hyper::Method;
use std::io::{BufReader, BufWriter, Write as _};
use std::path::Path;
use std::time::Instant;

/// Keys per backup page asked of a node.
const PAGE_KEYS: usize = 1000;
/// A restore request carries at most this many bytes of records (a larger object goes
/// alone).
const RESTORE_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Replicas tried per partition (its preference list's first entries).
const REPLICAS_TRIED: usize = 3;
/// The header naming where a node's next backup page starts.
const NEXT_HEADER: &str = "x-dynakv-next";

/// Back the cluster of the node at `url` up into `out`.
pub async fn backup(settings: &ClientSettings, url: &str, out: &Path) -> Result<()> {
    let started = Instant::now();
    let entry = settings.client(url)?;
    let routing = entry.get_json("/admin/routing").await?;
    let status = entry.get_json("/admin/status").await?;
    let ring: Ring = serde_json::from_value(routing["ring"].clone())
        .context("the node's ring could not be read")?;
    if routing["transition"].as_bool() == Some(true) {
        eprintln!(
            "warning: a ring transition is in progress; keys written during it may be missing \
             from the partitions' current owners (back up again once `dynakv admin ring` says \
             settled)"
        );
    }
    let node_client = |name: &str| -> Result<Option<Client>> {
        let member = &routing["members"][name];
        if member["up"].as_bool() != Some(true) {
            return Ok(None);
        }
        let Some(addr) = member["http_addr"].as_str() else {
            return Ok(None);
        };
        settings
            .client(&ClientSettings::member_url(url, addr))
            .map(Some)
    };
    let partial = out.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    // An error that stops the backup (a full disk, a partition no replica answers for)
    // leaves no partial file behind.
    let mut guard = RemoveOnDrop(Some(partial.clone()));
    let mut writer = BufWriter::new(file);
    let header = Header {
        cluster: status["cluster"].as_str().unwrap_or_default().to_owned(),
        partitions: ring.partition_count(),
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    writer.write_all(&header.encode())?;
    let (mut objects, mut bytes) = (0u64, 0u64);
    let mut missing = Vec::new();
    for partition in 0..ring.partition_count() {
        let replicas: Vec<String> = ring
            .preference_list(partition, REPLICAS_TRIED)
            .into_iter()
            .map(|(_, node)| node.0)
            .collect();
        let mut cursor = PartitionCursor::default();
        let mut done = None;
        for name in &replicas {
            let Some(client) = node_client(name)? else {
                continue;
            };
            match backup_partition(&client, partition, &mut cursor, &mut writer).await {
                Ok(()) => {
                    done = Some(name.clone());
                    break;
                }
                Err(e) => eprintln!("partition {partition}: {name} failed ({e:#}); next replica"),
            }
        }
        objects += cursor.objects;
        bytes += cursor.bytes;
        let n = cursor.objects;
        let Some(name) = done else {
            missing.push(partition);
            eprintln!(
                "partition {partition}: no replica answered ({})",
                replicas.join(", ")
            );
            continue;
        };
        eprintln!(
            "partition {:>4}/{}: {n} objects from {name}; {objects} objects, {:.1} MiB so far",
            partition + 1,
            ring.partition_count(),
            mib(bytes)
        );
    }
    if !missing.is_empty() {
        drop(writer);
        bail!(
            "{} partitions could not be read from any replica ({:?}); no backup written",
            missing.len(),
            missing
        );
    }
    writer.write_all(&backup::encode_end(objects))?;
    let file = writer
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()?;
    std::fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    guard.0 = None;
    eprintln!(
        "backup of cluster {:?} written to {}: {objects} objects (siblings and tombstones \
         included), {:.1} MiB, in {:.1} s",
        header.cluster,
        out.display(),
        mib(bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Removes the file it names when dropped (unless emptied first).
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where a partition's backup stands: it resumes there on another replica when one fails
/// (the index keys that order a partition's pages are the same on every replica).
#[derive(Debug, Default)]
struct PartitionCursor {
    after: Option<String>,
    objects: u64,
    bytes: u64,
}

/// Copy one partition from one node into `writer`, from `cursor` on. Every page is checked
/// (a record that does not decode fails the partition on this node) before it is written.
async fn backup_partition(
    client: &Client,
    partition: u32,
    cursor: &mut PartitionCursor,
    writer: &mut impl std::io::Write,
) -> Result<()> {
    loop {
        let mut path = format!("/admin/backup/{partition}?limit={PAGE_KEYS}");
        if let Some(after) = &cursor.after {
            path.push_str("&after=");
            path.push_str(after);
        }
        let (status, headers, body) = client
            .request(Method::GET, &path, &[], Bytes::new())
            .await?;
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&body));
        }
        let mut reader = Reader::records(body.as_ref());
        let mut objects = 0;
        while reader.next_record()?.is_some() {
            objects += 1;
        }
        writer.write_all(&body)?;
        cursor.objects += objects;
        cursor.bytes += body.len() as u64;
        match headers.get(NEXT_HEADER).and_then(|v| v.to_str().ok()) {
            Some(next) => cursor.after = Some(next.to_owned()),
            None => return Ok(()),
        }
    }
}

/// Restore `file` into the cluster of the node at `url`.
pub async fn restore(settings: &ClientSettings, url: &str, file: &Path) -> Result<()> {
    let started = Instant::now();
    let client = settings.client(url)?;
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let (mut reader, header) = Reader::file(BufReader::new(input))
        .with_context(|| format!("{} is not a readable backup", file.display()))?;
    eprintln!(
        "restoring a backup of cluster {:?} ({} partitions) into the cluster of {url}",
        header.cluster, header.partitions
    );
    let (mut records, mut restored, mut failed) = (0u64, 0u64, 0u64);
    let mut batch = Vec::new();
    let mut shown = 0;
    loop {
        let record = reader
            .next_record()
            .with_context(|| format!("reading {}", file.display()))?;
        if let Some(record) = &record
            && let Some(encoded) =
                backup::encode_record(&record.bucket, &record.key, &record.object)
        {
            batch.extend(encoded);
            records += 1;
        }
        if batch.is_empty() || (record.is_some() && batch.len() < RESTORE_BATCH_BYTES) {
            if record.is_none() {
                break;
            }
            continue;
        }
        let answer = send_batch(&client, std::mem::take(&mut batch)).await?;
        restored += answer["restored"].as_u64().unwrap_or(0);
        failed += answer["failed"].as_u64().unwrap_or(0);
        for failure in answer["failures"].as_array().into_iter().flatten() {
            if shown < 20 {
                eprintln!("  not restored: {failure}");
                shown += 1;
            }
        }
        #[allow(clippy::cast_precision_loss)] // a progress percentage
        let done = reader.offset() as f64 * 100.0 / size.max(1) as f64;
        eprintln!("{done:>5.1}%: {records} records read, {restored} restored, {failed} failed");
        if record.is_none() {
            break;
        }
    }
    eprintln!(
        "restore done in {:.1} s: {records} records, {restored} restored, {failed} failed",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!(
            "{failed} records were not restored; a restore is idempotent (it merges, never \
             replaces newer data): run it again once the cluster is healthy"
        );
    }
    Ok(())
}

async fn send_batch(client: &Client, batch: Vec<u8>) -> Result<serde_json::Value> {
    // A node that is briefly overloaded (503) is asked again.
    for attempt in 0..5u64 {
        let (status, _, body) = client
            .request(
                Method::POST,
                "/admin/restore",
                &[("content-type", "application/octet-stream")],
                Bytes::from(batch.clone()),
            )
            .await?;
        if status.is_success() {
            return serde_json::from_slice(&body).context("the node's restore answer");
        }
        if status.as_u16() != 503 || attempt == 4 {
            bail!(
                "restore refused: {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200 * (attempt + 1))).await;
    }
    bail!("restore refused")
}

#[allow(clippy::cast_precision_loss)] // a size for people
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
