//! Health and fleet status.

use super::{Admin, ApiError};
use crate::app::AppState;
use crate::xds::EnvoyStatus;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

pub async fn live() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

/// Ready when the database answers and a bundle is published; Redis being down makes the
/// service `degraded`, not unready.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, axum::Json<Value>) {
    let database = state.store.ping_db().await;
    let redis = state.store.ping_redis().await;
    let bundle = state.publisher.current().map(|s| s.version);
    let ready = database && bundle.is_some();
    let status = match (ready, redis) {
        (false, _) => "unavailable",
        (true, Some(false)) => "degraded",
        (true, _) => "ok",
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let redis = match redis {
        None => "not_configured",
        Some(true) => "ok",
        Some(false) => "down",
    };
    (
        code,
        axum::Json(json!({
            "status": status,
            "database": if database { "ok" } else { "down" },
            "redis": redis,
            "bundle_version": bundle,
        })),
    )
}

pub async fn envoys(
    _: Admin,
    State(state): State<AppState>,
) -> Result<axum::Json<Vec<EnvoyStatus>>, ApiError> {
    Ok(axum::Json(state.registry.list()))
}
