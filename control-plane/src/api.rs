//! The REST API (axum): router, auth extractors, problem+json errors.

pub mod audit;
pub mod auth;
pub mod cache;
pub mod error;
pub mod events;
pub mod gateways;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod ratelimit;
pub mod resources;
pub mod testing;

use crate::app::AppState;
pub use auth::PlatformAdmin as Admin;
use axum::Router;
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{get, post, put};
pub use error::ApiError;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .route("/api/v1/envoys", get(ops::envoys))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::render))
        .route("/ws/v1/events", get(events::subscribe))
        .route(
            "/api/v1/tenants",
            post(resources::create_tenant).get(resources::list_tenants),
        )
        .route("/api/v1/tenants/{id}", get(resources::get_tenant))
        .route("/api/v1/gateways", get(gateways::list_gateways))
        .route(
            "/api/v1/gateways/{name}",
            get(gateways::get_gateway)
                .put(gateways::put_gateway)
                .delete(gateways::delete_gateway),
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
            "/api/v1/agents/{id}/certificate",
            put(resources::rotate_certificate),
        )
        .route(
            "/api/v1/agents/{id}/evaluate",
            post(resources::evaluate_agent),
        )
        .route(
            "/api/v1/policies",
            post(resources::create_policy).get(resources::list_policies),
        )
        .route(
            "/api/v1/policies/{id}",
            get(resources::get_policy)
                .put(resources::update_policy)
                .delete(resources::delete_policy),
        )
        .route(
            "/api/v1/policies/{id}/evaluate",
            post(resources::evaluate_policy),
        )
        .route(
            "/api/v1/testing/unvalidated-bundle",
            post(testing::publish_unvalidated),
        )
        .route(
            "/api/v1/audit/batches",
            // Room for the largest batch the filter may send (the default limit is 2 MB).
            post(audit::ingest).layer(axum::extract::DefaultBodyLimit::max(
                filter_core::audit::MAX_BATCH_BYTES,
            )),
        )
        .route("/api/v1/audit/verify", get(audit::verify))
        .route(
            "/api/v1/audit/checkpoints",
            post(audit::create_checkpoint).get(audit::list_checkpoints),
        )
        .route("/api/v1/audit/public-key", get(audit::public_key))
        .route("/api/v1/audit/entries", get(audit::entries))
        .route("/api/v1/audit/export", get(audit::export))
        .route(
            "/api/v1/analytics/decisions",
            get(audit::analytics::decisions),
        )
        .route(
            "/api/v1/analytics/top-denied-domains",
            get(audit::analytics::top_denied_domains),
        )
        .route("/api/v1/analytics/heatmap", get(audit::analytics::heatmap))
        .route_layer(axum::middleware::from_fn(metrics::track))
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ratelimit::limit,
        ))
        // Every request gets an `x-request-id` (kept when the client sent one), carried in
        // its tracing span and echoed on the response.
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |request: &axum::http::Request<axum::body::Body>| {
                    let request_id = request
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "http",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id = %request_id,
                    )
                },
            ),
        )
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
        .with_state(state)
}

/// JSON body extractor whose rejections are problem+json 400s.
///
/// Same acceptance and messages as `axum::Json`, but the body is parsed without
/// `serde_path_to_error` first: tracking the path of every field cost ~5% of the audit
/// ingest's CPU. Only a body that fails is parsed again by axum, for the message that
/// names the failing field.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let plain = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"application/json"));
        if !plain {
            // Other JSON media types, or none: axum's checks and answers.
            let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
            return Ok(Self(value));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(axum::extract::rejection::JsonRejection::from)?;
        match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(Self(value)),
            Err(_) => {
                let axum::Json(value) = axum::Json::<T>::from_bytes(&bytes)?;
                Ok(Self(value))
            }
        }
    }
}

/// Path parameters whose rejections (e.g. a malformed id) are problem+json 400s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// Query string extractor whose rejections are problem+json 400s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

/// A request authenticated with the filter's ingest credential (never an admin
/// credential; see [`auth`] for those).
pub struct Ingest;

impl FromRequestParts<AppState> for Ingest {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = auth::bearer(parts)?;
        let expected = state.settings.auth.ingest_token.expose();
        if auth::constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            Ok(Ingest)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // read through Debug only
    struct Body {
        name: String,
        entries: Vec<Entry>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Entry {
        count: u32,
    }

    async fn extract(content_type: &str, body: &'static str) -> Result<Json<Body>, ApiError> {
        let request = axum::http::Request::builder()
            .header(axum::http::header::CONTENT_TYPE, content_type)
            .body(axum::body::Body::from(body))
            .unwrap();
        Json::<Body>::from_request(request, &()).await
    }

    /// The fast path accepts what axum accepts and, on failure, answers axum's message
    /// (which names the failing field).
    #[tokio::test]
    async fn json_extractor_matches_axum() {
        let good = r#"{"name": "a", "entries": [{"count": 1}]}"#;
        for content_type in ["application/json", "application/json; charset=utf-8"] {
            let Json(body) = extract(content_type, good).await.unwrap();
            assert_eq!(body.name, "a");
        }
        let bad = r#"{"name": "a", "entries": [{"count": "one"}]}"#;
        let expected = axum::Json::<Body>::from_bytes(bad.as_bytes())
            .unwrap_err()
            .body_text();
        assert!(expected.contains("entries[0].count"), "{expected}");
        match extract("application/json", bad).await {
            Err(ApiError::BadRequest(message)) => assert_eq!(message, expected),
            other => panic!("{other:?}"),
        }
        for trailing in [r#"{"name": "a", "entries": []} x"#, "{"] {
            assert!(matches!(
                extract("application/json", trailing).await,
                Err(ApiError::BadRequest(_))
            ));
        }
        assert!(matches!(
            extract("text/plain", good).await,
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }

    /// Over the body limit (axum's default 2 MB here; routes set their own): 413, not 400.
    #[tokio::test]
    async fn oversized_bodies_are_413() {
        let huge: &'static str = Box::leak(
            format!(r#"{{"name": "{}", "entries": []}}"#, "a".repeat(3 << 20)).into_boxed_str(),
        );
        match extract("application/json", huge).await {
            Err(err @ ApiError::PayloadTooLarge(_)) => {
                let response = axum::response::IntoResponse::into_response(err);
                assert_eq!(response.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
                assert_eq!(
                    response.headers()[axum::http::header::CONTENT_TYPE],
                    "application/problem+json"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
