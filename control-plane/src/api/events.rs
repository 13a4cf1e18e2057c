//! Admin events over WebSocket: `GET /ws/v1/events` streams the changes of the caller's
//! tenant (agent and policy writes, the bundle versions they published, audit entries
//! appended to its chain) as JSON text
//! frames; platform administrators see every tenant's.
//!
//! Authentication happens at connect (the `Authorization` header of the upgrade request),
//! with the same credentials and roles as the REST API. Events go through one in-process
//! broadcast channel; a subscriber that falls behind gets a `lagged` event naming how many
//! it missed, and can re-read the state through the REST API.

use super::ApiError;
use super::auth::Principal;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::OnceLock;
use tokio::sync::broadcast;
use uuid::Uuid;

/// Events buffered per subscriber before it lags.
const CAPACITY: usize = 1_024;

/// One change.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `agent.created`, `agent.updated`, `agent.certificate_rotated`, `policy.created`,
    /// `policy.updated`, `policy.deleted`, `bundle.published`, `audit.appended` (entries
    /// stored in the tenant's chain; `version` is their count).
    pub kind: &'static str,
    pub tenant_id: Uuid,
    /// The agent or policy; absent for `bundle.published`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// The resource's version after the change, or the bundle version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Who made the change (the token's subject).
    pub actor: String,
    pub at: DateTime<Utc>,
}

fn bus() -> &'static broadcast::Sender<Event> {
    static BUS: OnceLock<broadcast::Sender<Event>> = OnceLock::new();
    BUS.get_or_init(|| broadcast::channel(CAPACITY).0)
}

/// Sends `event` to the current subscribers (none is fine).
pub fn publish(event: Event) {
    let _ = bus().send(event);
}

/// `GET /ws/v1/events`.
pub async fn subscribe(
    who: Principal,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let rx = bus().subscribe();
    Ok(upgrade.on_upgrade(move |socket| stream(socket, who, rx)))
}

async fn stream(mut socket: WebSocket, who: Principal, mut rx: broadcast::Receiver<Event>) {
    let hello =
        serde_json::json!({"kind": "subscribed", "tenant_id": who.scope(), "role": who.role});
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            event = rx.recv() => {
                let text = match event {
                    Ok(event) if who.scope().is_none_or(|own| own == event.tenant_id) => {
                        serde_json::to_string(&event).unwrap_or_default()
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        serde_json::json!({"kind": "lagged", "missed": missed}).to_string()
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            message = socket.recv() => match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}
