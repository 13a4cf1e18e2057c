//! The OpenAPI 3.1 document of the REST API, generated from the handlers (utoipa) and
//! served at `/api/v1/openapi.json`.
//!
//! Resource handlers carry their own `#[utoipa::path]`; the operational and audit routes
//! are described here. Every operation gets the shared problem+json error responses. A
//! test checks that every route the router registers (read from `api.rs`) is documented.

use super::{gateways, resources};
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use std::sync::OnceLock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Document, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

/// An error, `application/problem+json` (RFC 9457).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Problem {
    /// `https://chronoguard.dev/problems/<kind>`.
    #[serde(rename = "type")]
    #[schema(example = "https://chronoguard.dev/problems/validation")]
    kind: String,
    #[schema(example = "Validation failed")]
    title: String,
    #[schema(example = 422)]
    status: u16,
    #[schema(example = "certificate_pem: certificate expired at 2026-01-01 00:00:00 UTC")]
    detail: String,
    /// Field errors of a validation failure.
    errors: Option<Vec<ProblemField>>,
    /// Set on 500s: quote it to the operator; the cause is only in the server log.
    correlation_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ProblemField {
    #[schema(example = "certificate_pem")]
    field: String,
    message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ChronoGuard control plane",
        description = "Admin API of the ChronoGuard egress gateway: tenants, agents, policies, \
                       dry-run evaluation, the audit log. Authenticate with a bearer JWT \
                       (roles platform-admin, admin, auditor) or the bootstrap admin token."
    ),
    paths(
        resources::create_tenant,
        resources::list_tenants,
        resources::get_tenant,
        gateways::list_gateways,
        gateways::get_gateway,
        gateways::put_gateway,
        gateways::delete_gateway,
        resources::create_agent,
        resources::list_agents,
        resources::get_agent,
        resources::update_agent,
        resources::rotate_certificate,
        resources::evaluate_agent,
        resources::create_policy,
        resources::list_policies,
        resources::get_policy,
        resources::update_policy,
        resources::delete_policy,
        resources::evaluate_policy,
        openapi_json,
        metrics,
        ws_events,
        health_live,
        health_ready,
        envoys,
        audit_batches,
        audit_verify,
        audit_checkpoints_create,
        audit_checkpoints_list,
        audit_public_key,
        audit_entries,
        audit_export,
        analytics_decisions,
        analytics_top_denied_domains,
        analytics_heatmap,
    ),
    components(schemas(Problem, ProblemField)),
    modifiers(&Security, &ErrorResponses),
    security(("bearer" = [])),
    tags(
        (name = "tenants", description = "platform administrators"),
        (name = "gateways", description = "gateway fleets and the tenants each serves (platform administrators); optimistic locking with ETag/If-Match"),
        (name = "agents", description = "agents and their certificates; optimistic locking with ETag/If-Match"),
        (name = "policies", description = "domain policies; optimistic locking with ETag/If-Match"),
        (name = "evaluation", description = "dry-run decisions with the filter's own engine"),
        (name = "audit", description = "the hash-chained decision log"),
        (name = "operations", description = "health, fleet, this document"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document as JSON (built once).
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_default())
}

/// `GET /api/v1/openapi.json` (no authentication: it holds no data).
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT with `role`, `tenant_id` and `exp` claims, or the bootstrap \
                         admin token",
                    ))
                    .build(),
            ),
        );
    }
}

/// Adds the problem+json responses every operation can give.
struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut Document) {
        let common = [
            ("400", "malformed request (body, path or query)"),
            ("401", "missing or invalid credentials"),
            ("403", "the caller's role may not do this"),
            ("404", "not found, or another tenant's"),
            ("422", "validation failed; `errors` names the fields"),
            (
                "500",
                "internal error; `correlation_id` identifies it in the logs",
            ),
            (
                "503",
                "the database is unavailable; retry after `Retry-After`",
            ),
        ];
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                for (status, description) in common {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .description(description)
                                    .content(
                                        "application/problem+json",
                                        Content::new(Some(RefOr::Ref(
                                            utoipa::openapi::Ref::from_schema_name("Problem"),
                                        ))),
                                    )
                                    .build(),
                            )
                        });
                }
            }
        }
    }
}

// The routes whose handlers live in other modules are described by these stubs.

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "this document", body = Value)))]
#[allow(dead_code)]
fn openapi_json() {}

#[utoipa::path(get, path = "/ws/v1/events", tag = "operations",
    description = "WebSocket (upgrade with the Authorization header): the caller's tenant's \
                   agent and policy changes and bundle versions as JSON text frames.",
    responses((status = 101, description = "switching to the WebSocket protocol")))]
#[allow(dead_code)]
fn ws_events() {}

#[utoipa::path(get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(get, path = "/health/live", tag = "operations", security(()),
    responses((status = 200, description = "the process is up", body = Value)))]
#[allow(dead_code)]
fn health_live() {}

#[utoipa::path(get, path = "/health/ready", tag = "operations", security(()),
    responses((status = 200, description = "ok or degraded (Redis down)", body = Value)))]
#[allow(dead_code)]
fn health_ready() {}

#[utoipa::path(get, path = "/api/v1/envoys", tag = "operations",
    responses((status = 200, description = "the Envoy gateways seen over ECDS: node id, fleet (node.cluster), versions sent, acknowledged and expected, last NACK, and an error when the node's fleet is not registered", body = Value)))]
#[allow(dead_code)]
fn envoys() {}

#[utoipa::path(post, path = "/api/v1/audit/batches", tag = "audit",
    description = "The filter's audit batches; filter credential only, never an admin token.",
    request_body = Value,
    responses((status = 201, description = "stored", body = Value),
              (status = 200, description = "a batch id already stored", body = Value),
              (status = 400, description = "malformed; nothing of the batch stored", body = Value, content_type = "application/problem+json"),
              (status = 401, description = "not the filter's credential; nothing stored", body = Value, content_type = "application/problem+json"),
              (status = 413, description = "body over 16 MiB (more than `MAX_BATCH` entries do not fit anyway)", body = Value, content_type = "application/problem+json"),
              (status = 503, description = "database unavailable; retry after Retry-After", body = Value, content_type = "application/problem+json")))]
#[allow(dead_code)]
fn audit_batches() {}

#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    description = "Recomputes the chain, checks HMACs and checkpoints. After retention dropped older entries it starts from the signed checkpoint at the chain's retention anchor (`anchored_at_checkpoint`).",
    params(("tenant_id" = uuid::Uuid, Query, description = "the chain to verify"),
           ("from_sequence" = Option<i64>, Query, description = "start here, from the signed checkpoint at from_sequence - 1 (422 when there is none)")),
    responses((status = 200, description = "the chain verdict", body = Value),
              (status = 422, description = "no valid signed checkpoint at from_sequence - 1", body = Value)))]
#[allow(dead_code)]
fn audit_verify() {}

#[utoipa::path(post, path = "/api/v1/audit/checkpoints", tag = "audit", request_body = Value,
    responses((status = 201, description = "a signed checkpoint of the chain head", body = Value)))]
#[allow(dead_code)]
fn audit_checkpoints_create() {}

#[utoipa::path(get, path = "/api/v1/audit/checkpoints", tag = "audit",
    params(("tenant_id" = uuid::Uuid, Query, description = "the tenant")),
    responses((status = 200, description = "the tenant's checkpoints", body = Value)))]
#[allow(dead_code)]
fn audit_checkpoints_list() {}

#[utoipa::path(get, path = "/api/v1/audit/public-key", tag = "audit",
    responses((status = 200, description = "the checkpoint signing keys", body = Value)))]
#[allow(dead_code)]
fn audit_public_key() {}

#[utoipa::path(get, path = "/api/v1/audit/entries", tag = "audit",
    params(("tenant_id" = uuid::Uuid, Query, description = "the tenant")),
    responses((status = 200, description = "a page of audit entries", body = Value)))]
#[allow(dead_code)]
fn audit_entries() {}

#[utoipa::path(get, path = "/api/v1/audit/export", tag = "audit",
    params(("tenant_id" = uuid::Uuid, Query, description = "the tenant")),
    responses((status = 200, description = "the tenant's audit log as a download")))]
#[allow(dead_code)]
fn audit_export() {}

#[utoipa::path(get, path = "/api/v1/analytics/decisions", tag = "audit",
    params(("tenant_id" = uuid::Uuid, Query, description = "the tenant"),
           ("from" = Option<String>, Query, description = "RFC 3339, inclusive; default 24 hours ago"),
           ("to" = Option<String>, Query, description = "RFC 3339, exclusive; default now"),
           ("bucket" = Option<String>, Query, description = "bucket width such as 15m or 1h"),
           ("group_by" = Option<String>, Query, description = "outcome, agent or domain")),
    responses((status = 200, description = "decision counts per time bucket", body = Value)))]
#[allow(dead_code)]
fn analytics_decisions() {}

#[utoipa::path(get, path = "/api/v1/analytics/top-denied-domains", tag = "audit",
    params(("tenant_id" = uuid::Uuid, Query, description = "the tenant"),
           ("limit" = Option<i64>, Query, description = "how many domains")),
    responses((status = 200, description = "the most denied domains", body = Value)))]
#[allow(dead_code)]
fn analytics_top_denied_domains() {}

#[utoipa::path(get, path = "/api/v1/analytics/heatmap", tag = "audit",
    params(("tenant_id" = uuid::Uuid, Query, description = "the tenant")),
    responses((status = 200, description = "decisions by hour of day and day of week (UTC)", body = Value)))]
#[allow(dead_code)]
fn analytics_heatmap() {}

/// The `(METHOD, path)` routes registered in `api.rs`'s router, read from its source.
pub fn routes_in_source(source: &str) -> Vec<(String, String)> {
    let mut routes = Vec::new();
    let chunks: Vec<&str> = source.split(".route(").skip(1).collect();
    for chunk in chunks {
        let chunk = chunk.split(".fallback(").next().unwrap_or_default();
        let Some(start) = chunk.find('"') else {
            continue;
        };
        let rest = &chunk[start + 1..];
        let Some(end) = rest.find('"') else {
            continue;
        };
        let path = &rest[..end];
        let handlers = &rest[end..];
        for method in ["get", "post", "put", "patch", "delete"] {
            let needle = format!("{method}(");
            let found = handlers.match_indices(&needle).any(|(i, _)| {
                i == 0
                    || !handlers[..i]
                        .chars()
                        .last()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            if found {
                routes.push((method.to_uppercase(), path.to_owned()));
            }
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn document() -> Value {
        serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap()
    }

    #[test]
    fn every_route_in_the_router_is_documented() {
        let routes = routes_in_source(include_str!("../api.rs"));
        assert!(routes.len() >= 20, "the route scanner found {routes:?}");
        assert!(routes.contains(&("DELETE".into(), "/api/v1/policies/{id}".into())));
        let doc = document();
        // Test hooks (off unless `testing.hooks`) are deliberately not part of the API.
        let missing: Vec<_> = routes
            .iter()
            .filter(|(_, path)| !path.starts_with("/api/v1/testing/"))
            .filter(|(method, path)| doc["paths"][path][method.to_lowercase()].is_null())
            .collect();
        assert!(
            missing.is_empty(),
            "routes missing from the OpenAPI document: {missing:?}"
        );
    }

    #[test]
    fn document_is_openapi_3_1_with_problem_errors() {
        let doc = document();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        let patch = &doc["paths"]["/api/v1/agents/{id}"]["patch"];
        for status in ["200", "401", "404", "412", "422", "428", "500"] {
            assert!(
                !patch["responses"][status].is_null(),
                "PATCH agent lacks {status}"
            );
        }
        assert_eq!(
            patch["responses"]["412"]["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/Problem"
        );
        for schema in [
            "Agent",
            "Policy",
            "Problem",
            "EvaluateRequest",
            "AgentStatus",
        ] {
            assert!(
                !doc["components"]["schemas"][schema].is_null(),
                "schema {schema} missing"
            );
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }

    #[test]
    fn the_route_scanner_reads_method_chains() {
        let source = r#"
            .route("/a", get(x::a).post(x::b))
            .route(
                "/b/{id}",
                get(x::c)
                    .put(x::d)
                    .delete(x::e),
            )
            .route("/c", post(x::forget))
            .fallback(|| async { nothing })
        "#;
        let routes = routes_in_source(source);
        assert_eq!(
            routes,
            [
                ("GET", "/a"),
                ("POST", "/a"),
                ("GET", "/b/{id}"),
                ("PUT", "/b/{id}"),
                ("DELETE", "/b/{id}"),
                ("POST", "/c"),
            ]
            .map(|(m, p)| (m.to_owned(), p.to_owned()))
        );
    }
}
