//! ExtensionConfigDiscoveryService, state of the world: pushes on change, tracks ACK/NACK.
//!
//! A node names its fleet in `node.cluster` and gets that fleet's bundle only; a node of a
//! fleet that is not registered gets the deny-all configuration (and an `error` in
//! `GET /api/v1/envoys`).
//!
//! Changes are paced per stream: the first change after a quiet
//! `gateway.push_min_interval_ms` goes out at once, later ones wait until that long after
//! the previous push and go out as one (the latest bundle). Each push costs every Envoy
//! worker about 0.75 ms between requests as a delta (1.3 ms in full) and its main thread
//! two loads of the bundle (BENCHMARKS.md), so a burst of admin writes becomes a few
//! pushes, not one per write.
//! A node's own request (a new stream, a re-request) is answered at once.
//!
//! A push after the first on a stream is sent as the changes since the previous one when
//! that is under half the bundle (`filter_core::delta`, `gateway.push_deltas`): what a
//! push costs each worker grows with the configuration Envoy hands it. A NACK of a delta
//! gets the same version in full at once, and the stream gets only full configurations
//! from then on. Each delta is computed once per pair of versions, for all the streams
//! that push it ([`Snapshot::delta_from`]).

use super::proto::{self, TYPED_EXTENSION_CONFIG};
use crate::bundle::{Published, Publisher, Snapshot};
use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryService;
use serde::Serialize;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// What the control plane knows about one Envoy node.
#[derive(Debug, Clone, Serialize, Default)]
pub struct EnvoyStatus {
    pub node_id: String,
    /// The fleet the node named in `node.cluster`.
    pub fleet: String,
    pub connected_streams: u32,
    /// The version the control plane publishes for the node's fleet now (`deny-all` for
    /// an unknown fleet): the node is in sync when `acked_version` equals it.
    pub expected_version: Option<String>,
    /// Why the node does not get a policy bundle (its fleet is not registered).
    pub error: Option<String>,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub last_nack: Option<Nack>,
    pub nacks_total: u64,
    /// Pushes sent with the whole configuration.
    pub full_pushes: u64,
    /// Pushes sent as the changes since the stream's previous push (`filter_core::delta`).
    pub delta_pushes: u64,
    /// The size of the last push's filter configuration, in bytes.
    pub last_push_bytes: usize,
    pub last_seen_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    /// The version Envoy refused.
    pub rejected_version: Option<String>,
    /// The version Envoy keeps enforcing.
    pub current_version: String,
    pub message: String,
    pub at: DateTime<Utc>,
}

/// Per-node ACK/NACK state, shared with the REST API (`GET /api/v1/envoys`).
#[derive(Debug, Clone, Default)]
pub struct EnvoyRegistry {
    nodes: Arc<Mutex<BTreeMap<String, EnvoyStatus>>>,
}

// === impl EnvoyRegistry ===

impl EnvoyRegistry {
    /// Every node seen, with what it should run according to `published`.
    pub fn list(&self, published: Option<&Published>) -> Vec<EnvoyStatus> {
        let mut nodes: Vec<EnvoyStatus> = self
            .nodes
            .lock()
            .map(|nodes| nodes.values().cloned().collect())
            .unwrap_or_default();
        if let Some(published) = published {
            for node in &mut nodes {
                match published.fleet(&node.fleet) {
                    Some(snapshot) => {
                        node.expected_version = Some(snapshot.version_info());
                        node.error = None;
                    }
                    None => {
                        node.expected_version = Some(crate::bundle::DENY_ALL_VERSION.to_owned());
                        node.error = Some(unknown_fleet(&node.fleet));
                    }
                }
            }
        }
        nodes
    }

    /// Nodes of `fleet` with an open ECDS stream.
    pub fn connected_in(&self, fleet: &str) -> usize {
        self.nodes
            .lock()
            .map(|nodes| {
                nodes
                    .values()
                    .filter(|n| n.fleet == fleet && n.connected_streams > 0)
                    .count()
            })
            .unwrap_or_default()
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut EnvoyStatus)) {
        if let Ok(mut nodes) = self.nodes.lock() {
            let status = nodes.entry(node.to_owned()).or_insert_with(|| EnvoyStatus {
                node_id: node.to_owned(),
                ..Default::default()
            });
            status.last_seen_at = Some(Utc::now());
            f(status);
        }
    }
}

fn unknown_fleet(fleet: &str) -> String {
    if fleet.is_empty() {
        "the node names no fleet (set node.cluster in its bootstrap); it gets the deny-all configuration".to_owned()
    } else {
        format!(
            "fleet {fleet:?} is not registered (PUT /api/v1/gateways/{fleet}); the node gets the deny-all configuration"
        )
    }
}

pub struct EcdsServer {
    publisher: Arc<Publisher>,
    registry: EnvoyRegistry,
    nonce: Arc<AtomicU64>,
}

// === impl EcdsServer ===

impl EcdsServer {
    pub fn new(publisher: Arc<Publisher>, registry: EnvoyRegistry) -> Self {
        Self {
            publisher,
            registry,
            nonce: Arc::new(AtomicU64::new(0)),
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for EcdsServer {
    type StreamExtensionConfigsStream = ResponseStream;
    type DeltaExtensionConfigsStream = DeltaStream;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let publisher = self.publisher.clone();
        let registry = self.registry.clone();
        let nonces = self.nonce.clone();
        tokio::spawn(async move {
            let mut published = publisher.subscribe();
            let mut node = String::new();
            let mut fleet = String::new();
            let mut subscribed = false;
            let mut last_sent: Option<Arc<Snapshot>> = None;
            // The configuration the next delta is against: the last one sent on this stream,
            // unless Envoy refused it. A refused delta is sent again in full at once; if
            // Envoy takes that, the delta was the problem (a filter that does not know
            // them, or a VM that lost its base) and the stream gets no more deltas.
            let mut base: Option<Arc<Snapshot>> = None;
            let mut deltas = publisher.gateway().push_deltas;
            let mut sent_delta = false;
            let mut last_nonce = String::new();
            let mut retrying = false;
            let mut retry_nonce: Option<String> = None;
            let pace = std::time::Duration::from_millis(publisher.gateway().push_min_interval_ms);
            // When the last push went out, and when a change held back by the pacing goes.
            let mut pushed_at: Option<tokio::time::Instant> = None;
            let mut held: Option<tokio::time::Instant> = None;
            loop {
                let send_now = tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(req)) => {
                            if let Some(n) = &req.node && node.is_empty() {
                                node = n.id.clone();
                                fleet = n.cluster.clone();
                                registry.update(&node, |s| {
                                    s.connected_streams += 1;
                                    s.fleet = fleet.clone();
                                });
                                tracing::info!(node = %node, fleet = %fleet, version = %req.version_info, "envoy connected to ecds");
                            }
                            if !req.type_url.is_empty() && req.type_url != TYPED_EXTENSION_CONFIG {
                                tracing::warn!(type_url = %req.type_url, "ecds request for an unexpected type");
                                false
                            } else if req.response_nonce.is_empty() {
                                subscribed = true;
                                true
                            } else if acknowledge(&registry, &node, &req) {
                                if retry_nonce.as_deref() == Some(req.response_nonce.as_str()) {
                                    retry_nonce = None;
                                    deltas = false;
                                    tracing::warn!(node = %node, version = %req.version_info, "envoy refused a version as a delta and took it in full: this stream gets full configurations from now on");
                                }
                                false
                            } else {
                                // Envoy keeps what it had: the next push goes in full, and a
                                // refused delta goes again in full at once.
                                base = None;
                                if retry_nonce.as_deref() == Some(req.response_nonce.as_str()) {
                                    retry_nonce = None;
                                }
                                retrying = sent_delta && req.response_nonce == last_nonce;
                                retrying
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    changed = published.changed(), if subscribed => {
                        if changed.is_err() { break; }
                        false
                    }
                    () = tokio::time::sleep_until(held.unwrap_or_else(tokio::time::Instant::now)), if held.is_some() => {
                        held = None;
                        false
                    }
                };
                let current = published.borrow_and_update().clone();
                let Some(current) = current else { continue };
                let snapshot = match current.fleet(&fleet) {
                    Some(snapshot) => snapshot.clone(),
                    None => publisher.deny_all(),
                };
                // A change elsewhere (another fleet) is not this node's business.
                let fresh = !last_sent
                    .as_ref()
                    .is_some_and(|s| Arc::ptr_eq(s, &snapshot));
                if !(send_now || (subscribed && fresh)) {
                    continue;
                }
                if !send_now
                    && let Some(at) = pushed_at.map(|at| at + pace)
                    && at > tokio::time::Instant::now()
                {
                    held = Some(at);
                    continue;
                }
                held = None;
                if snapshot.deny_all && fresh {
                    tracing::warn!(node = %node, fleet = %fleet, "{}", unknown_fleet(&fleet));
                }
                let delta = match &base {
                    Some(base) if deltas && !Arc::ptr_eq(base, &snapshot) => {
                        delta_config(base, &snapshot)
                    }
                    _ => None,
                };
                sent_delta = delta.is_some();
                let config = delta.as_deref().unwrap_or(&snapshot.plugin_config);
                let bytes = config.len();
                let nonce = nonces.fetch_add(1, Ordering::Relaxed).to_string();
                last_nonce.clone_from(&nonce);
                if std::mem::take(&mut retrying) {
                    retry_nonce = Some(nonce.clone());
                }
                let response = proto::response(publisher.gateway(), &snapshot, config, nonce);
                let version = response.version_info.clone();
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
                base = (!snapshot.deny_all).then(|| snapshot.clone());
                last_sent = Some(snapshot);
                pushed_at = Some(tokio::time::Instant::now());
                registry.update(&node, |s| {
                    s.sent_version = Some(version);
                    s.last_push_bytes = bytes;
                    if sent_delta {
                        s.delta_pushes += 1;
                    } else {
                        s.full_pushes += 1;
                    }
                });
            }
            if !node.is_empty() {
                registry.update(&node, |s| {
                    s.connected_streams = s.connected_streams.saturating_sub(1)
                });
                tracing::info!(node = %node, "envoy disconnected from ecds");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_extension_configs(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        Err(Status::unimplemented(
            "delta ECDS is not served; configure api_type GRPC (state of the world)",
        ))
    }

    async fn fetch_extension_configs(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let fleet = request
            .get_ref()
            .node
            .as_ref()
            .map(|n| n.cluster.clone())
            .unwrap_or_default();
        let snapshot = self
            .publisher
            .for_fleet(&fleet)
            .ok_or_else(|| Status::unavailable("no policy bundle published yet"))?;
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed).to_string();
        Ok(Response::new(proto::response(
            self.publisher.gateway(),
            &snapshot,
            &snapshot.plugin_config,
            nonce,
        )))
    }
}

/// `next`'s configuration as the changes since `base`'s, when that is under half its size
/// (computed once per pair for all streams).
fn delta_config(base: &Snapshot, next: &Snapshot) -> Option<Arc<str>> {
    if base.deny_all || next.deny_all {
        return None;
    }
    next.delta_from(base, || {
        match filter_core::delta::delta(base.plugin_config.as_bytes(), next.plugin_config.as_bytes()) {
            Ok(delta) => delta.and_then(|d| String::from_utf8(d).ok()),
            Err(e) => {
                tracing::error!(error = %e, "could not compute a delta push; sending the configuration in full");
                None
            }
        }
    })
}

/// Records an ACK or a NACK; returns whether it was an ACK.
fn acknowledge(registry: &EnvoyRegistry, node: &str, req: &DiscoveryRequest) -> bool {
    match &req.error_detail {
        None => {
            registry.update(node, |s| s.acked_version = Some(req.version_info.clone()));
            true
        }
        Some(error) => {
            tracing::warn!(node = %node, current = %req.version_info, error = %error.message, "envoy rejected the policy bundle (NACK)");
            registry.update(node, |s| {
                s.nacks_total += 1;
                s.acked_version = Some(req.version_info.clone());
                s.last_nack = Some(Nack {
                    rejected_version: s.sent_version.clone(),
                    current_version: req.version_info.clone(),
                    message: error.message.clone(),
                    at: Utc::now(),
                });
            });
            false
        }
    }
}
