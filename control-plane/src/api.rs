//! The REST API (axum): router, auth extractors, problem+json errors.

pub mod audit;
pub mod error;
pub mod ops;
pub mod resources;

use crate::app::AppState;
use axum::Router;
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{get, post};
pub use error::ApiError;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .route("/api/v1/envoys", get(ops::envoys))
        .route(
            "/api/v1/tenants",
            post(resources::create_tenant).get(resources::list_tenants),
        )
        .route(
            "/api/v1/agents",
            post(resources::create_agent).get(resources::list_agents),
        )
        .route(
            "/api/v1/agents/{id}",
            get(resources::get_agent).patch(resources::update_agent),
        )
        .route(
            "/api/v1/policies",
            post(resources::create_policy).get(resources::list_policies),
        )
        .route(
            "/api/v1/policies/{id}",
            get(resources::get_policy).put(resources::update_policy),
        )
        .route("/api/v1/audit/batches", post(audit::ingest))
        .route("/api/v1/audit/verify", get(audit::verify))
        .fallback(|| async { ApiError::NotFound })
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// JSON body extractor whose rejections are problem+json 400s.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

/// A request authenticated with the administrator token.
pub struct Admin;

/// A request authenticated with the filter's ingest credential.
pub struct Ingest;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        check_bearer(parts, state.settings.auth.admin_token.expose()).map(|()| Admin)
    }
}

impl FromRequestParts<AppState> for Ingest {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        check_bearer(parts, state.settings.auth.ingest_token.expose()).map(|()| Ingest)
    }
}

fn check_bearer(parts: &Parts, expected: &str) -> Result<(), ApiError> {
    let presented = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
