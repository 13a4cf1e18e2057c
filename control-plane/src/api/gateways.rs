//! Gateway fleets: which tenants each fleet of Envoys serves (platform administrators).
//!
//! An Envoy names its fleet in `node.cluster`; the ECDS server sends it the bundle
//! compiled from its fleet's tenants only, and the deny-all configuration when the fleet
//! is not registered here. A fleet carries a `version`, answered as a strong `ETag`;
//! `PUT` creates a fleet without `If-Match` and replaces an existing one only with it
//! (428 without, 412 when stale). Every change rebuilds and publishes the bundles before
//! it answers, and is recorded in the audit chain of every tenant it adds or removes.

use super::auth::{PlatformAdmin, Principal};
use super::events::{self, Event};
use super::openapi::Problem;
use super::resources::{Tagged, if_match, record_admin_change, stale};
use super::{ApiError, Json, Path, Query};
use crate::app::AppState;
use crate::storage::StoreError;
use crate::storage::gateways::{self as store, Gateway};
use crate::storage::resources::ResourceError;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use uuid::Uuid;

/// Tenants one fleet may serve.
const MAX_TENANTS: usize = 10_000;

/// A fleet as the API shows it: the stored fleet and the bundle it is sent now.
#[derive(Serialize, utoipa::ToSchema)]
pub struct GatewayView {
    #[serde(flatten)]
    gateway: Gateway,
    /// The bundle version published for this fleet (`null` until the next rebuild).
    bundle_version: Option<i64>,
    /// Envoys of this fleet with an open ECDS stream.
    connected_envoys: usize,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayBody {
    /// The tenants whose agents and policies this fleet's gateways receive (may be empty:
    /// the gateways then know no agent and deny everything as `unknown_agent`).
    #[schema(example = json!(["0195d2c4-5d0c-7cc4-9b1e-5f3a0c1d2e3f"]))]
    tenant_ids: Vec<Uuid>,
}

fn view(state: &AppState, gateway: Gateway) -> GatewayView {
    let bundle_version = state
        .publisher
        .current()
        .and_then(|p| p.fleet(&gateway.name).map(|s| s.version));
    GatewayView {
        connected_envoys: state.registry.connected_in(&gateway.name),
        bundle_version,
        gateway,
    }
}

/// A fleet name is what Envoys put in `node.cluster`: 1 to 128 of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit.
fn fleet_name(name: &str) -> Result<&str, ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(ApiError::BadRequest(
            "a gateway name is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit".into(),
        ))
    }
}

#[utoipa::path(get, path = "/api/v1/gateways", tag = "gateways",
    responses((status = 200, description = "every gateway fleet, by name", body = Vec<GatewayView>)))]
pub async fn list_gateways(
    _: PlatformAdmin,
    State(state): State<AppState>,
) -> Result<axum::Json<Vec<GatewayView>>, ApiError> {
    let gateways = store::list(&state.store.pool).await?;
    Ok(axum::Json(
        gateways.into_iter().map(|g| view(&state, g)).collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/gateways/{name}", tag = "gateways",
    params(("name" = String, Path, description = "the fleet name Envoys send as node.cluster")),
    responses((status = 200, description = "the fleet", body = GatewayView, headers(("ETag" = String, description = "the version, a strong ETag")))))]
pub async fn get_gateway(
    _: PlatformAdmin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Tagged<GatewayView>, ApiError> {
    let name = fleet_name(&name)?;
    let gateway = store::get(&state.store.pool, name).await?;
    Ok(Tagged::ok(gateway.version, view(&state, gateway)))
}

/// `PUT /api/v1/gateways/{name}`: creates the fleet (no `If-Match`) or replaces the
/// tenants it serves (`If-Match` with its `ETag`).
#[utoipa::path(put, path = "/api/v1/gateways/{name}", tag = "gateways", request_body = GatewayBody,
    params(("name" = String, Path, description = "the fleet name Envoys send as node.cluster"),
           ("If-Match" = Option<String>, Header, description = "required to replace an existing fleet: its ETag, e.g. \"3\"")),
    responses((status = 200, description = "the updated fleet", body = GatewayView, headers(("ETag" = String, description = "the version, a strong ETag"))),
              (status = 201, description = "the new fleet", body = GatewayView, headers(("ETag" = String, description = "the version, a strong ETag"))),
              (status = 409, description = "the fleet was created concurrently", body = Problem, content_type = "application/problem+json"),
              (status = 412, description = "If-Match is not the current version, or the fleet does not exist", body = Problem, content_type = "application/problem+json"),
              (status = 428, description = "the fleet exists and If-Match is missing", body = Problem, content_type = "application/problem+json")))]
pub async fn put_gateway(
    PlatformAdmin(who): PlatformAdmin,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(body): Json<GatewayBody>,
) -> Result<Tagged<GatewayView>, ApiError> {
    let name = fleet_name(&name)?;
    let expected = match headers.get(header::IF_MATCH) {
        Some(_) => Some(if_match(&headers)?),
        None => None,
    };
    if body.tenant_ids.len() > MAX_TENANTS {
        return Err(ApiError::field(
            "tenant_ids",
            format!("at most {MAX_TENANTS} tenants"),
        ));
    }
    let tenants: BTreeSet<Uuid> = body.tenant_ids.iter().copied().collect();
    let tenants: Vec<Uuid> = tenants.into_iter().collect();
    let before = match store::get(&state.store.pool, name).await {
        Ok(current) => Some(current),
        Err(StoreError::NotFound) => None,
        Err(other) => return Err(other.into()),
    };
    match (&before, expected) {
        (Some(_), None) => {
            return Err(ApiError::PreconditionRequired(
                "the gateway exists: replacing it needs an If-Match header with its ETag".into(),
            ));
        }
        (Some(current), Some(expected)) if current.version != expected => {
            return Err(stale("gateway", expected, current.version));
        }
        (None, Some(_)) => {
            return Err(ApiError::PreconditionFailed(
                "the gateway does not exist: create it without If-Match".into(),
            ));
        }
        _ => {}
    }
    let gateway = store::put(&state.store.pool, name, expected, &tenants)
        .await
        .map_err(|e| match e {
            ResourceError::NoTenant => {
                ApiError::field("tenant_ids", "names a tenant that does not exist")
            }
            ResourceError::Stale { current } => {
                stale("gateway", expected.unwrap_or_default(), current)
            }
            ResourceError::Store(StoreError::Conflict(_)) => ApiError::Conflict(
                "a gateway with this name was just created; read it and retry with If-Match".into(),
            ),
            ResourceError::Store(StoreError::NotFound) => {
                ApiError::PreconditionFailed("the gateway was deleted meanwhile".into())
            }
            other => other.into(),
        })?;
    let old: BTreeSet<Uuid> = before
        .as_ref()
        .map(|g| g.tenant_ids.iter().copied().collect())
        .unwrap_or_default();
    let new: BTreeSet<Uuid> = gateway.tenant_ids.iter().copied().collect();
    let affected: Vec<Uuid> = old.symmetric_difference(&new).copied().collect();
    let (kind, status) = if before.is_some() {
        ("gateway.updated", StatusCode::OK)
    } else {
        ("gateway.created", StatusCode::CREATED)
    };
    fleet_changed(&state, &who, name, kind, &affected, gateway.version).await?;
    tracing::info!(subject = %who.subject, gateway = %name, version = gateway.version, tenants = gateway.tenant_ids.len(), "gateway fleet written");
    let version = gateway.version;
    let view = view(&state, gateway);
    Ok(if status == StatusCode::CREATED {
        Tagged::created(version, view)
    } else {
        Tagged::ok(version, view)
    })
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteGatewayQuery {
    /// Also delete a fleet whose Envoys are connected (they get the deny-all
    /// configuration).
    #[serde(default)]
    force: bool,
}

/// `DELETE /api/v1/gateways/{name}[?force=true]`; `If-Match` is checked when given.
#[utoipa::path(delete, path = "/api/v1/gateways/{name}", tag = "gateways",
    params(("name" = String, Path, description = "the fleet name"), DeleteGatewayQuery,
           ("If-Match" = Option<String>, Header, description = "checked when given")),
    responses((status = 204, description = "deleted; its Envoys get the deny-all configuration"),
              (status = 409, description = "Envoys of the fleet are connected (use ?force=true)", body = Problem, content_type = "application/problem+json"),
              (status = 412, description = "If-Match is not the current version", body = Problem, content_type = "application/problem+json")))]
pub async fn delete_gateway(
    PlatformAdmin(who): PlatformAdmin,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<DeleteGatewayQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let name = fleet_name(&name)?;
    let expected = match headers.get(header::IF_MATCH) {
        Some(_) => Some(if_match(&headers)?),
        None => None,
    };
    let current = store::get(&state.store.pool, name).await?;
    let connected = state.registry.connected_in(name);
    if connected > 0 && !query.force {
        return Err(ApiError::Conflict(format!(
            "{connected} Envoy(s) of this fleet are connected; they would get the deny-all configuration (delete with ?force=true)"
        )));
    }
    store::delete(&state.store.pool, name, expected)
        .await
        .map_err(|e| match e {
            ResourceError::Stale { current } => {
                stale("gateway", expected.unwrap_or_default(), current)
            }
            other => other.into(),
        })?;
    fleet_changed(
        &state,
        &who,
        name,
        "gateway.deleted",
        &current.tenant_ids,
        current.version,
    )
    .await?;
    tracing::info!(subject = %who.subject, gateway = %name, connected, "gateway fleet deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// After a committed fleet change: rebuilds and publishes the bundles, records the change
/// in the audit chain of every tenant it added or removed, and tells their subscribers.
async fn fleet_changed(
    state: &AppState,
    who: &Principal,
    name: &str,
    kind: &'static str,
    tenants: &[Uuid],
    version: i64,
) -> Result<(), ApiError> {
    let rebuilt = state.publisher.rebuild().await;
    for tenant in tenants {
        record_admin_change(
            state,
            crate::audit::admin::AdminChange {
                tenant: *tenant,
                action: kind,
                resource_id: None,
                resource_name: Some(name),
                actor: &who.subject,
                version,
                bundle_version: rebuilt
                    .as_ref()
                    .ok()
                    .and_then(|p| p.version_for_tenant(*tenant)),
            },
        )
        .await;
    }
    rebuilt?;
    for tenant in tenants {
        events::publish(Event {
            kind,
            tenant_id: *tenant,
            id: None,
            version: Some(version),
            actor: who.subject.clone(),
            at: Utc::now(),
        });
    }
    Ok(())
}
