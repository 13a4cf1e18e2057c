//! Tenants, agents and policies.
//!
//! Every write that changes what the filter enforces rebuilds and publishes the policy
//! bundle before it answers, so a 2xx means the new bundle is on its way to Envoy.

use super::{Admin, ApiError, Json};
use crate::app::AppState;
use crate::domain::{self, AgentCertificate, AgentStatus, PolicyMode, PolicyStatus};
use crate::storage::resources::{self as store, Agent, Policy, PolicyFields, Tenant};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use uuid::Uuid;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    name: String,
}

pub async fn create_tenant(
    _: Admin,
    State(state): State<AppState>,
    Json(body): Json<NewTenant>,
) -> Result<(StatusCode, axum::Json<Tenant>), ApiError> {
    let name = non_empty("name", &body.name)?;
    let tenant = store::create_tenant(&state.store.pool, name).await?;
    Ok((StatusCode::CREATED, axum::Json(tenant)))
}

pub async fn list_tenants(
    _: Admin,
    State(state): State<AppState>,
) -> Result<axum::Json<Vec<Tenant>>, ApiError> {
    Ok(axum::Json(store::list_tenants(&state.store.pool).await?))
}

#[derive(Deserialize)]
pub struct TenantQuery {
    tenant_id: Uuid,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    tenant_id: Uuid,
    name: String,
    certificate_pem: String,
}

pub async fn create_agent(
    _: Admin,
    State(state): State<AppState>,
    Json(body): Json<NewAgent>,
) -> Result<(StatusCode, axum::Json<Agent>), ApiError> {
    let name = non_empty("name", &body.name)?;
    let cert = AgentCertificate::parse(&body.certificate_pem, chrono::Utc::now())
        .map_err(|e| ApiError::field("certificate_pem", e.to_string()))?;
    if !store::tenant_exists(&state.store.pool, body.tenant_id).await? {
        return Err(ApiError::field("tenant_id", "no such tenant"));
    }
    let agent = store::create_agent(&state.store.pool, body.tenant_id, name, &cert).await?;
    state.publisher.rebuild().await?;
    Ok((StatusCode::CREATED, axum::Json(agent)))
}

pub async fn list_agents(
    _: Admin,
    State(state): State<AppState>,
    Query(query): Query<TenantQuery>,
) -> Result<axum::Json<Vec<Agent>>, ApiError> {
    Ok(axum::Json(
        store::list_agents(&state.store.pool, query.tenant_id).await?,
    ))
}

pub async fn get_agent(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<Agent>, ApiError> {
    Ok(axum::Json(store::get_agent(&state.store.pool, id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPatch {
    status: Option<AgentStatus>,
    policy_ids: Option<Vec<Uuid>>,
}

pub async fn update_agent(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    Json(body): Json<AgentPatch>,
) -> Result<axum::Json<Agent>, ApiError> {
    let current = store::get_agent(&state.store.pool, id).await?;
    if let Some(next) = body.status {
        let from = AgentStatus::parse(&current.status)
            .ok_or_else(|| ApiError::Internal(format!("stored status {}", current.status)))?;
        if from != next && !from.can_become(next) {
            return Err(ApiError::field(
                "status",
                format!(
                    "invalid transition from {} to {}",
                    from.as_str(),
                    next.as_str()
                ),
            ));
        }
    }
    let mut policy_ids = body.policy_ids;
    if let Some(ids) = &mut policy_ids {
        ids.sort_unstable();
        ids.dedup();
    }
    let agent = store::update_agent(
        &state.store.pool,
        id,
        body.status.map(AgentStatus::as_str),
        policy_ids.as_deref(),
    )
    .await
    .map_err(|e| match e {
        crate::storage::StoreError::NotFound if policy_ids.is_some() => {
            ApiError::field("policy_ids", "unknown policy id for this agent's tenant")
        }
        other => other.into(),
    })?;
    state.publisher.rebuild().await?;
    Ok(axum::Json(agent))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// Required on create, ignored (must match if given) on update.
    tenant_id: Option<Uuid>,
    name: String,
    #[serde(default = "default_priority")]
    priority: i32,
    #[serde(default = "default_status")]
    status: PolicyStatus,
    #[serde(default)]
    mode: PolicyMode,
    #[serde(default)]
    allowed_domains: Vec<String>,
    #[serde(default)]
    blocked_domains: Vec<String>,
}

fn default_priority() -> i32 {
    100
}

fn default_status() -> PolicyStatus {
    PolicyStatus::Active
}

// === impl PolicyBody ===

impl PolicyBody {
    fn fields(&self) -> Result<PolicyFields, ApiError> {
        let name = non_empty("name", &self.name)?.to_owned();
        if !(0..=1_000_000).contains(&self.priority) {
            return Err(ApiError::field("priority", "must be between 0 and 1000000"));
        }
        Ok(PolicyFields {
            name,
            priority: self.priority,
            status: self.status.as_str().to_owned(),
            mode: self.mode.as_str().to_owned(),
            allowed_domains: domains("allowed_domains", &self.allowed_domains)?,
            blocked_domains: domains("blocked_domains", &self.blocked_domains)?,
        })
    }
}

fn domains(field: &str, raw: &[String]) -> Result<Vec<String>, ApiError> {
    if raw.len() > 10_000 {
        return Err(ApiError::field(field, "at most 10000 entries"));
    }
    let mut errors = Vec::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, d) in raw.iter().enumerate() {
        match domain::domain_pattern(d) {
            Ok(d) => out.push(d),
            Err(message) => errors.push(super::error::FieldError {
                field: format!("{field}[{i}]"),
                message,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation {
            detail: format!("{} invalid domain pattern(s) in {field}", errors.len()),
            errors,
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

pub async fn create_policy(
    _: Admin,
    State(state): State<AppState>,
    Json(body): Json<PolicyBody>,
) -> Result<(StatusCode, axum::Json<Policy>), ApiError> {
    let tenant = body
        .tenant_id
        .ok_or_else(|| ApiError::field("tenant_id", "is required"))?;
    let fields = body.fields()?;
    if !store::tenant_exists(&state.store.pool, tenant).await? {
        return Err(ApiError::field("tenant_id", "no such tenant"));
    }
    let policy = store::create_policy(&state.store.pool, tenant, &fields).await?;
    state.publisher.rebuild().await?;
    Ok((StatusCode::CREATED, axum::Json(policy)))
}

pub async fn update_policy(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    Json(body): Json<PolicyBody>,
) -> Result<axum::Json<Policy>, ApiError> {
    let fields = body.fields()?;
    let current = store::get_policy(&state.store.pool, id).await?;
    if body.tenant_id.is_some_and(|t| t != current.tenant_id) {
        return Err(ApiError::field(
            "tenant_id",
            "a policy cannot move between tenants",
        ));
    }
    let policy = store::update_policy(&state.store.pool, id, &fields).await?;
    state.publisher.rebuild().await?;
    Ok(axum::Json(policy))
}

pub async fn get_policy(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<Policy>, ApiError> {
    Ok(axum::Json(store::get_policy(&state.store.pool, id).await?))
}

pub async fn list_policies(
    _: Admin,
    State(state): State<AppState>,
    Query(query): Query<TenantQuery>,
) -> Result<axum::Json<Vec<Policy>>, ApiError> {
    Ok(axum::Json(
        store::list_policies(&state.store.pool, query.tenant_id).await?,
    ))
}

fn non_empty<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed.len() > 200 {
        return Err(ApiError::field(field, "must be 1 to 200 characters"));
    }
    Ok(trimmed)
}
