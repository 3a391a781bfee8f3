//! Secondary index queries over PB: `RpbIndexReq` (25) answered with `RpbIndexResp` (26), one
//! frame, or with `stream` one frame per page and the last with `done`. The query itself is
//! `crate::requests::index_page`'s, as HTTP's.

use super::Session;
use super::kv::{Refusal, bucket_name, within};
use dynakv_core::index;
use dynakv_core::security::Permission;
use dynakv_pb::{RpbIndexReq, RpbIndexResp, RpbPair, code, encode_frame};
use prost::Message as _;
use std::sync::Arc;

fn response(name: &str, hits: &[index::Hit], return_terms: bool) -> RpbIndexResp {
    if return_terms {
        RpbIndexResp {
            results: hits
                .iter()
                .map(|(term, key)| RpbPair {
                    key: Some(index::unsortable(name, term)),
                    value: Some(key.as_bytes().to_vec()),
                })
                .collect(),
            ..RpbIndexResp::default()
        }
    } else {
        RpbIndexResp {
            keys: hits
                .iter()
                .map(|(_, key)| key.as_bytes().to_vec())
                .collect(),
            ..RpbIndexResp::default()
        }
    }
}

impl Session {
    pub(super) async fn index_query(
        &mut self,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let request =
            RpbIndexReq::decode(body).map_err(|e| format!("malformed RpbIndexReq: {e}"))?;
        let bucket = bucket_name(
            &self.state.cluster,
            request.bucket,
            request.r#type.as_deref(),
        )?;
        self.permitted(Permission::Index, Some(&bucket))?;
        if request.term_regex.is_some() || request.cover_context.is_some() {
            return Err("term_regex and cover_context are not supported by dynakv".to_owned());
        }
        if request.return_body == Some(true) {
            return Err("return_body is not supported by dynakv".to_owned());
        }
        let name = String::from_utf8(request.index.ok_or("the index is required")?)
            .map_err(|_| "the index name is not UTF-8".to_owned())?;
        let (start, end) = match request.qtype {
            Some(0) => (request.key.ok_or("an exact query needs its key")?, None),
            Some(1) => (
                request.range_min.ok_or("a range query needs range_min")?,
                Some(request.range_max.ok_or("a range query needs range_max")?),
            ),
            _ => return Err("qtype must be 0 (eq) or 1 (range)".to_owned()),
        };
        let max_results = match request.max_results {
            None | Some(0) => None,
            Some(n) if n as usize <= index::MAX_PAGE_RESULTS => Some(n as usize),
            Some(_) => {
                return Err(format!(
                    "max_results must be at most {}",
                    index::MAX_PAGE_RESULTS
                ));
            }
        };
        let continuation = request
            .continuation
            .map(|c| String::from_utf8(c).map_err(|_| "bad continuation".to_owned()))
            .transpose()?;
        let mut query = index::Query::new(
            &bucket,
            &name,
            (&start, end.as_deref()),
            continuation.as_deref(),
            max_results.unwrap_or(index::INDEX_PAGE_RESULTS),
        )
        .map_err(|e| e.to_string())?;
        let name = query.index.clone();
        let return_terms = request.return_terms == Some(true);
        let stream = request.stream == Some(true);
        let cluster = Arc::clone(&self.state.cluster);
        let mut all = Vec::new();
        let mut frames = Vec::new();
        let mut total = 0usize;
        loop {
            let (hits, more) = within(request.timeout, async {
                crate::requests::index_page(&cluster, &query).await
            })
            .await??;
            total = total.saturating_add(hits.len());
            let last = hits.last().cloned();
            let continuation = (max_results.is_some() && more)
                .then(|| {
                    last.as_ref()
                        .map(|l| index::encode_continuation(l).into_bytes())
                })
                .flatten();
            let finished = max_results.is_some() || !more || last.is_none();
            if stream {
                let mut frame = response(&name, &hits, return_terms);
                frame.continuation = continuation;
                frame.done = finished.then_some(true);
                frames.push(frame);
            } else {
                all.extend(hits);
                if finished {
                    let mut frame = response(&name, &all, return_terms);
                    frame.continuation = continuation;
                    frames.push(frame);
                }
            }
            if finished {
                break;
            }
            if total >= index::MAX_INDEX_RESULTS {
                return Err(format!(
                    "the query has more than {} results: ask for pages (max_results, \
                     continuation)",
                    index::MAX_INDEX_RESULTS
                ));
            }
            query.after = last;
        }
        for frame in &frames {
            encode_frame(out, code::INDEX_RESP, frame);
        }
        Ok(())
    }
}
