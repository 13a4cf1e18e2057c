//! Test hooks, off unless `testing.hooks` is set: they exist so end-to-end tests can push
//! what validation would refuse and prove Envoy's NACK path keeps the last good policy.

use super::{Admin, ApiError, Json};
use crate::app::AppState;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBundle {
    /// The filter configuration JSON to publish as is.
    plugin_config: String,
}

/// `POST /api/v1/testing/unvalidated-bundle`: publishes a configuration without
/// compiling it first (404 unless hooks are enabled).
pub async fn publish_unvalidated(
    _: Admin,
    axum::extract::State(state): axum::extract::State<AppState>,
    Json(body): Json<RawBundle>,
) -> Result<axum::Json<Value>, ApiError> {
    if !state.settings.testing.hooks {
        return Err(ApiError::NotFound);
    }
    let published = state
        .publisher
        .publish_unvalidated(body.plugin_config)
        .await?;
    Ok(axum::Json(json!({"version": published.latest_version()})))
}
