//! A small upstream that answers every request with what it received, and counts hits.

use axum::extract::Request;
use axum::response::Json;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Upstream {
    pub port: u16,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

// === impl Upstream ===

impl Upstream {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                let (host, decision_id, request_id, path, forwarding) = {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let path = req.uri().path().to_owned();
                    // What the gateway tells a site about the agent or itself.
                    let forwarding: Vec<String> = req
                        .headers()
                        .keys()
                        .map(|k| k.as_str())
                        .filter(|k| {
                            k.starts_with("x-envoy-")
                                || *k == "x-forwarded-for"
                                || *k == "x-chronoguard-peer"
                        })
                        .map(str::to_owned)
                        .collect();
                    (
                        header("host"),
                        header("x-chronoguard-decision-id"),
                        header("x-request-id"),
                        path,
                        forwarding,
                    )
                };
                // Read the whole body before answering, as a real upstream (or the audit
                // ingest endpoint it stands in for in the benchmark) does: answering
                // first makes the server close the connection under a large request still
                // being sent, and the sender sees a reset instead of the 200.
                let _ = axum::body::to_bytes(req.into_body(), usize::MAX).await;
                Json::<Value>(json!({
                    "upstream": "chronoguard-demo-upstream",
                    "host": host,
                    "path": path,
                    "decision_id": decision_id,
                    "request_id": request_id,
                    "forwarding_headers": forwarding,
                }))
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, hits, task })
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
