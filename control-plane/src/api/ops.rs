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

/// Ready when the database answers and the bundles are built (one per registered fleet,
/// possibly none); Redis being down makes the service `degraded`, not unready.
/// `bundle_version` is the highest version published to any fleet, `bundles` the version
/// per fleet.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, axum::Json<Value>) {
    let database = state.store.ping_db().await;
    let redis = state.store.ping_redis().await;
    let published = state.publisher.current();
    let bundle = published.as_ref().and_then(|p| p.latest_version());
    let bundles: serde_json::Map<String, Value> = published
        .iter()
        .flat_map(|p| p.fleets.iter())
        .map(|(fleet, s)| (fleet.clone(), json!(s.version)))
        .collect();
    let ready = database && published.is_some();
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
            "bundles": bundles,
        })),
    )
}

pub async fn envoys(
    _: Admin,
    State(state): State<AppState>,
) -> Result<axum::Json<Vec<EnvoyStatus>>, ApiError> {
    let published = state.publisher.current();
    Ok(axum::Json(state.registry.list(published.as_deref())))
}
