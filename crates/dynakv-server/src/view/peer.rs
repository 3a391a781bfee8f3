//! The peer side: requests from other nodes. Replica calls are answered by the core's
//! `serve` here, on the data plane; a forwarded put is coordinated here; listings are read
//! here; the node's own protocol (gossip, joins) goes to the node.

use super::{
    Arc, BucketProps, Cluster, ClusterError, HashMap, HintOutcome, MAX_AAE_KEYS_PER_EXCHANGE,
    MAX_HINTS_PER_TARGET, NodeId, Observation, PeerInfo, PeerMessage, ReplicaRun, Reply,
    ServeContext, ServeError, StorageCall, internal, serve,
};

impl Cluster {
    /// Answer one peer request.
    pub async fn handle_peer(self: Arc<Self>, from: PeerInfo, message: PeerMessage) -> PeerMessage {
        self.observe_contact(&NodeId(from.node_name.clone()));
        match self.handle_peer_inner(&from, message).await {
            Ok(reply) => reply,
            Err(e) => PeerMessage::Error(e.to_string()),
        }
    }

    pub(super) async fn handle_peer_inner(
        self: &Arc<Self>,
        from: &PeerInfo,
        message: PeerMessage,
    ) -> Result<PeerMessage, ClusterError> {
        if let Some(call) = serve::storage_call(&message) {
            if !self.driver.published().joined {
                // A node joining a cluster serves no replica call: its keys are not yet
                // the cluster's (the node refuses its own protocol the same way).
                return Ok(PeerMessage::Error(
                    dynakv_core::membership::AWAITING_JOIN_REFUSAL.to_owned(),
                ));
            }
            return self.serve_locally(call, message).await;
        }
        match message {
            // The rare requests' futures are boxed: inline, the largest of them would size
            // (and make the runtime copy) every replica call's future.
            message @ PeerMessage::Gossip(_) => Ok(Box::pin(self.ask_node(from, message)).await),
            message @ PeerMessage::JoinRequest { .. } => {
                // The node checks the join against the key the sender proved.
                self.hello(from);
                Ok(Box::pin(self.ask_node(from, message)).await)
            }
            message @ PeerMessage::CoordinatePut { .. } => {
                // A forward that arrives after its forwarder gave up (we were paused, or it
                // waited in a queue) is refused: the core's rule, the simulator's too.
                let limit_ms =
                    u64::try_from(self.timeouts.forward_start().as_millis()).unwrap_or(u64::MAX);
                let accepted = crate::requests::accept_forwarded(
                    self,
                    message,
                    from.clock_offset_ms,
                    limit_ms,
                );
                let (op, stamp_ms) = match accepted {
                    Ok(accepted) => accepted,
                    Err(refused) => return Ok(*refused.answer),
                };
                Ok(
                    match Box::pin(crate::requests::coordinate(self, op, stamp_ms)).await {
                        Ok(object) => PeerMessage::Coordinated {
                            object: object.encode(),
                        },
                        Err(e) => PeerMessage::Failed {
                            status: e.status(),
                            message: e.to_string(),
                        },
                    },
                )
            }
            PeerMessage::ListBuckets => {
                let replica = Arc::clone(&self.replica);
                let buckets = tokio::task::spawn_blocking(move || replica.list_buckets())
                    .await
                    .map_err(internal)??;
                Ok(PeerMessage::Buckets(buckets))
            }
            message @ PeerMessage::IndexQuery(_) => {
                let replica = Arc::clone(&self.replica);
                let answer = tokio::task::spawn_blocking(move || {
                    dynakv_core::index::answer(&replica, message)
                })
                .await
                .map_err(internal)?;
                Ok(answer)
            }
            PeerMessage::ListKeys {
                bucket,
                start_after,
                limit,
            } => {
                let (keys, next_after) =
                    Box::pin(self.local_key_page(&bucket, start_after.as_deref(), limit as usize))
                        .await?;
                Ok(PeerMessage::KeyPage { keys, next_after })
            }
            other => Ok(PeerMessage::Error(format!(
                "unexpected request {}",
                other.name()
            ))),
        }
    }

    /// Answer a replica-side request with the core's `serve` (the code the simulator's nodes
    /// run too), on the blocking pool when its storage call may wait on the disk.
    pub(super) async fn serve_locally(
        &self,
        call: StorageCall,
        message: PeerMessage,
    ) -> Result<PeerMessage, ClusterError> {
        let state = self.state();
        let props: std::collections::BTreeMap<String, BucketProps> = serve::buckets_named(&message)
            .into_iter()
            .map(|bucket| (bucket.to_owned(), self.bucket_props(bucket)))
            .collect();
        let n_vals: HashMap<String, u32> =
            props.iter().map(|(b, p)| (b.clone(), p.n_val)).collect();
        let context = ServeContext {
            ring_version: state.ring.version,
            props,
            hint_limit: MAX_HINTS_PER_TARGET,
            hint_target_member: serve::hint_target(&message)
                .is_some_and(|target| state.is_member(target)),
            max_leaf_keys: MAX_AAE_KEYS_PER_EXCHANGE,
            aae_budget: u32::try_from(self.admission.budget()).unwrap_or(u32::MAX),
            defer_sync: false,
        };
        let (replica, aae) = (Arc::clone(&self.replica), Arc::clone(&self.aae));
        let mut message = message;
        let served = match call {
            StorageCall::None => serve::serve(&replica, &aae, &context, message),
            StorageCall::Read => self
                .replica
                .run(None, move || {
                    serve::serve(&replica, &aae, &context, message)
                })
                .await
                .map_err(internal)?,
            StorageCall::Write(durability) if message.durability_mut().is_some() => {
                self.run_write(
                    durability,
                    move |durability| {
                        if let Some(asked) = message.durability_mut() {
                            *asked = durability;
                        }
                        serve::serve(&replica, &aae, &context, message)
                    },
                    |served| {
                        !served.stored.is_empty()
                            || matches!(served.hint, Some(HintOutcome::Stored))
                    },
                )
                .await?
            }
            StorageCall::Write(durability) => self
                .replica
                .run(Some(durability), move || {
                    serve::serve(&replica, &aae, &context, message)
                })
                .await
                .map_err(internal)?,
            StorageCall::Long => {
                tokio::task::spawn_blocking(move || serve::serve(&replica, &aae, &context, message))
                    .await
                    .map_err(internal)?
            }
        }
        .map_err(|e| match e {
            ServeError::Replica(e) => ClusterError::from(e),
            other => internal(other),
        })?;
        if let Some(outcome) = served.hint {
            self.observe(Observation::Hint {
                kept: matches!(outcome, HintOutcome::Stored),
            });
        }
        for (bucket, key) in &served.stored {
            let n_val = n_vals
                .get(bucket)
                .copied()
                .unwrap_or_else(|| self.bucket_props(bucket).n_val);
            self.check_orphan(bucket, key, n_val);
        }
        Ok(match served.reply {
            Reply::Message(message) => message,
            Reply::StaleRing => PeerMessage::StaleRing(Box::new((*state).clone())),
        })
    }
}
