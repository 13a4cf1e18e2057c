//! ExtensionConfigDiscoveryService, state of the world: pushes on change, tracks ACK/NACK.

use super::proto::{self, TYPED_EXTENSION_CONFIG};
use crate::bundle::Publisher;
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
    pub connected_streams: u32,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub last_nack: Option<Nack>,
    pub nacks_total: u64,
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
    pub fn list(&self) -> Vec<EnvoyStatus> {
        self.nodes
            .lock()
            .map(|nodes| nodes.values().cloned().collect())
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
            let mut snapshots = publisher.subscribe();
            let mut node = String::new();
            let mut subscribed = false;
            loop {
                let send_now = tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(req)) => {
                            if let Some(n) = &req.node && node.is_empty() {
                                node = n.id.clone();
                                registry.update(&node, |s| s.connected_streams += 1);
                                tracing::info!(node = %node, version = %req.version_info, "envoy connected to ecds");
                            }
                            if !req.type_url.is_empty() && req.type_url != TYPED_EXTENSION_CONFIG {
                                tracing::warn!(type_url = %req.type_url, "ecds request for an unexpected type");
                                false
                            } else if req.response_nonce.is_empty() {
                                subscribed = true;
                                true
                            } else {
                                acknowledge(&registry, &node, &req);
                                false
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    changed = snapshots.changed(), if subscribed => {
                        if changed.is_err() { break; }
                        true
                    }
                };
                if !send_now {
                    continue;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                let Some(snapshot) = snapshot else { continue };
                let nonce = nonces.fetch_add(1, Ordering::Relaxed).to_string();
                let response = proto::response(publisher.gateway(), &snapshot, nonce);
                let version = response.version_info.clone();
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
                registry.update(&node, |s| s.sent_version = Some(version));
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
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let snapshot = self
            .publisher
            .current()
            .ok_or_else(|| Status::unavailable("no policy bundle published yet"))?;
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed).to_string();
        Ok(Response::new(proto::response(
            self.publisher.gateway(),
            &snapshot,
            nonce,
        )))
    }
}

fn acknowledge(registry: &EnvoyRegistry, node: &str, req: &DiscoveryRequest) {
    match &req.error_detail {
        None => registry.update(node, |s| s.acked_version = Some(req.version_info.clone())),
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
        }
    }
}
