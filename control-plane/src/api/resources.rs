//! Tenants, agents and policies.
//!
//! Every query is scoped by the caller's tenant ([`Principal::scope`]): another tenant's
//! resource is not found. Agents and policies carry a `version`, answered as a strong
//! `ETag`; updates need `If-Match` with it (428 without, 412 when stale) and apply it
//! atomically in SQL. Every write that changes what the filter enforces rebuilds and
//! publishes the policy bundle before it answers, so a 2xx means the new bundle is on its
//! way to Envoy.

use super::auth::{Manager, PlatformAdmin, Principal};
use super::cache;
use super::events::{self, Event};
use super::openapi::Problem;
use super::{ApiError, Json, Path, Query};
use crate::app::AppState;
use crate::domain::{self, AgentCertificate, AgentStatus, PolicyMode, PolicyStatus};
use crate::policy_spec::PolicySpec;
use crate::storage::StoreError;
use crate::storage::bundle::AgentRow;
use crate::storage::resources::{
    self as store, Agent, AgentFilter, Page, Policy, PolicyFields, PolicyFilter, ResourceError,
    Tenant,
};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use filter_core::config::Bundle;
use filter_core::input::{RequestFacts, normalize_domain};
use filter_core::policy::CompiledPolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

/// Agents a tenant may have that are not deactivated.
pub const MAX_AGENTS_PER_TENANT: i64 = 1_000;
/// Default and largest page size of the listings.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 500;

// === tenants ===

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    name: String,
}

#[utoipa::path(post, path = "/api/v1/tenants", tag = "tenants", request_body = NewTenant,
    responses((status = 201, description = "the tenant", body = Tenant),
              (status = 409, description = "the name is taken", body = Problem, content_type = "application/problem+json")))]
pub async fn create_tenant(
    PlatformAdmin(who): PlatformAdmin,
    State(state): State<AppState>,
    Json(body): Json<NewTenant>,
) -> Result<(StatusCode, axum::Json<Tenant>), ApiError> {
    let name = non_empty("name", &body.name)?;
    let tenant = store::create_tenant(&state.store.pool, name)
        .await
        .map_err(conflict)?;
    tracing::info!(subject = %who.subject, tenant_id = %tenant.id, "tenant created");
    record_admin_change(
        &state,
        crate::audit::admin::AdminChange {
            tenant: tenant.id,
            action: "tenant.created",
            resource_id: Some(tenant.id),
            resource_name: None,
            actor: &who.subject,
            version: 1,
            bundle_version: state
                .publisher
                .current()
                .and_then(|p| p.version_for_tenant(tenant.id)),
        },
    )
    .await;
    Ok((StatusCode::CREATED, axum::Json(tenant)))
}

#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants",
    responses((status = 200, description = "every tenant", body = Vec<Tenant>)))]
pub async fn list_tenants(
    _: PlatformAdmin,
    State(state): State<AppState>,
) -> Result<axum::Json<Vec<Tenant>>, ApiError> {
    Ok(axum::Json(store::list_tenants(&state.store.pool).await?))
}

/// A tenant; tenant roles may read their own.
#[utoipa::path(get, path = "/api/v1/tenants/{id}", tag = "tenants", params(("id" = Uuid, Path, description = "tenant id")),
    responses((status = 200, description = "the tenant", body = Tenant)))]
pub async fn get_tenant(
    who: Principal,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<Tenant>, ApiError> {
    if who.scope().is_some_and(|own| own != id) {
        return Err(ApiError::NotFound);
    }
    Ok(axum::Json(store::get_tenant(&state.store.pool, id).await?))
}

// === agents ===

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    /// Required for a platform administrator; a tenant admin's own tenant otherwise.
    tenant_id: Option<Uuid>,
    name: String,
    /// The agent's X.509 client certificate, PEM.
    certificate_pem: String,
    /// Facts rule conditions can test: an object of strings, numbers or booleans.
    #[serde(default)]
    metadata: Option<Value>,
}

#[utoipa::path(post, path = "/api/v1/agents", tag = "agents", request_body = NewAgent,
    responses((status = 201, description = "the agent, pending", body = Agent, headers(("ETag" = String, description = "the version, a strong ETag"))),
              (status = 409, description = "the fingerprint or the name is taken", body = Problem, content_type = "application/problem+json")))]
pub async fn create_agent(
    Manager(who): Manager,
    State(state): State<AppState>,
    Json(body): Json<NewAgent>,
) -> Result<Tagged<Agent>, ApiError> {
    let tenant = who.tenant_for_create(body.tenant_id)?;
    let name = non_empty("name", &body.name)?;
    let cert = parse_certificate(&body.certificate_pem)?;
    let metadata = match &body.metadata {
        Some(metadata) => agent_metadata(metadata)?,
        None => json!({}),
    };
    let agent = store::create_agent(
        &state.store.pool,
        tenant,
        name,
        &cert,
        &metadata,
        MAX_AGENTS_PER_TENANT,
    )
    .await?;
    changed(
        &state,
        &who,
        "agent.created",
        agent.tenant_id,
        Some(agent.id),
        agent.version,
    )
    .await?;
    tracing::info!(subject = %who.subject, agent_id = %agent.id, version = agent.version, "agent created");
    Ok(Tagged::created(agent.version, agent))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AgentQuery {
    /// A platform administrator's filter; tenant callers see their own tenant.
    tenant_id: Option<Uuid>,
    status: Option<AgentStatus>,
    name_prefix: Option<String>,
    policy_id: Option<Uuid>,
    /// 1 to 500, default 100.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of a listing; `next_cursor` is `null` on the last page.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Listing<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", params(AgentQuery),
    responses((status = 200, description = "a page of agents, oldest first", body = Listing<Agent>)))]
pub async fn list_agents(
    Manager(who): Manager,
    State(state): State<AppState>,
    Query(query): Query<AgentQuery>,
) -> Result<axum::Json<Listing<Agent>>, ApiError> {
    let filter = AgentFilter {
        tenant: who.filter_tenant(query.tenant_id)?,
        status: query.status.map(|s| s.as_str().to_owned()),
        name_prefix: query.name_prefix.filter(|p| !p.is_empty()),
        policy_id: query.policy_id,
    };
    let page = page(query.limit, query.cursor.as_deref())?;
    let items = store::list_agents(&state.store.pool, &filter, fetch_one_more(page)).await?;
    Ok(axum::Json(paginate(items, page, |a| a.id)))
}

#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents", params(("id" = Uuid, Path, description = "agent id")),
    responses((status = 200, description = "the agent", body = Agent, headers(("ETag" = String, description = "the version, a strong ETag")))))]
pub async fn get_agent(
    Manager(who): Manager,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Tagged<Agent>, ApiError> {
    if let Some(agent) = cache::get::<Agent>(&state, "agent", id).await {
        return visible(&who, agent.tenant_id).map(|()| Tagged::ok(agent.version, agent));
    }
    let agent = store::get_agent(&state.store.pool, who.scope(), id).await?;
    cache::put(&state, "agent", id, agent.version, &agent).await;
    Ok(Tagged::ok(agent.version, agent))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentPatch {
    /// `pending → active ⇄ suspended → deactivated`; deactivated is terminal.
    status: Option<AgentStatus>,
    /// Replaces the agent's policies; each must belong to the agent's tenant.
    policy_ids: Option<Vec<Uuid>>,
    /// Replaces the agent's metadata.
    metadata: Option<Value>,
}

/// `PATCH /api/v1/agents/{id}` with `If-Match`.
#[utoipa::path(patch, path = "/api/v1/agents/{id}", tag = "agents", request_body = AgentPatch,
    params(("id" = Uuid, Path, description = "agent id"), ("If-Match" = String, Header, description = "the ETag of the version this update is based on, e.g. \"3\"")),
    responses((status = 200, description = "the updated agent", body = Agent, headers(("ETag" = String, description = "the version, a strong ETag"))),
              (status = 412, description = "If-Match is not the current version", body = Problem, content_type = "application/problem+json"),
              (status = 428, description = "If-Match is missing", body = Problem, content_type = "application/problem+json")))]
pub async fn update_agent(
    Manager(who): Manager,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Json(body): Json<AgentPatch>,
) -> Result<Tagged<Agent>, ApiError> {
    let expected = if_match(&headers)?;
    let metadata = body.metadata.as_ref().map(agent_metadata).transpose()?;
    let current = store::get_agent(&state.store.pool, who.scope(), id).await?;
    if current.version != expected {
        return Err(stale("agent", expected, current.version));
    }
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
        if ids.len() > 1_000 {
            return Err(ApiError::field("policy_ids", "at most 1000 policies"));
        }
        ids.sort_unstable();
        ids.dedup();
    }
    // The version check makes the transition check above valid: the status read is the
    // status being changed, or the update does not happen.
    let agent = store::update_agent(
        &state.store.pool,
        who.scope(),
        id,
        expected,
        body.status.map(AgentStatus::as_str),
        policy_ids.as_deref(),
        metadata.as_ref(),
    )
    .await
    .map_err(|e| write_error("agent", expected, e))?;
    changed(
        &state,
        &who,
        "agent.updated",
        agent.tenant_id,
        Some(id),
        agent.version,
    )
    .await?;
    tracing::info!(subject = %who.subject, agent_id = %id, from_version = expected, version = agent.version, "agent updated");
    cache::put(&state, "agent", id, agent.version, &agent).await;
    Ok(Tagged::ok(agent.version, agent))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCertificate {
    /// The agent's new X.509 client certificate, PEM.
    certificate_pem: String,
}

/// `PUT /api/v1/agents/{id}/certificate` with `If-Match`: certificate rotation. The old
/// fingerprint stops working with the next bundle.
#[utoipa::path(put, path = "/api/v1/agents/{id}/certificate", tag = "agents", request_body = NewCertificate,
    params(("id" = Uuid, Path, description = "agent id"), ("If-Match" = String, Header, description = "the ETag of the version this update is based on, e.g. \"3\"")),
    responses((status = 200, description = "the agent with its new certificate", body = Agent, headers(("ETag" = String, description = "the version, a strong ETag"))),
              (status = 409, description = "the fingerprint is taken", body = Problem, content_type = "application/problem+json"),
              (status = 412, description = "If-Match is not the current version", body = Problem, content_type = "application/problem+json"),
              (status = 428, description = "If-Match is missing", body = Problem, content_type = "application/problem+json")))]
pub async fn rotate_certificate(
    Manager(who): Manager,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Json(body): Json<NewCertificate>,
) -> Result<Tagged<Agent>, ApiError> {
    let expected = if_match(&headers)?;
    let cert = parse_certificate(&body.certificate_pem)?;
    let current = store::get_agent(&state.store.pool, who.scope(), id).await?;
    if current.version != expected {
        return Err(stale("agent", expected, current.version));
    }
    if current.status == AgentStatus::Deactivated.as_str() {
        return Err(ApiError::field(
            "status",
            "a deactivated agent's certificate cannot be rotated",
        ));
    }
    let agent = store::rotate_certificate(&state.store.pool, who.scope(), id, expected, &cert)
        .await
        .map_err(|e| write_error("agent", expected, e))?;
    changed(
        &state,
        &who,
        "agent.certificate_rotated",
        agent.tenant_id,
        Some(id),
        agent.version,
    )
    .await?;
    tracing::info!(subject = %who.subject, agent_id = %id, version = agent.version, "agent certificate rotated");
    cache::put(&state, "agent", id, agent.version, &agent).await;
    Ok(Tagged::ok(agent.version, agent))
}

// === policies ===

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// On create: required for a platform administrator, the caller's tenant otherwise.
    /// On update: must be the policy's tenant if given.
    tenant_id: Option<Uuid>,
    #[schema(example = "research-crawlers")]
    name: String,
    /// 0 to 1000000; the highest deciding priority wins, a deny wins a tie.
    #[serde(default = "default_priority")]
    priority: i32,
    #[serde(default = "default_status")]
    status: PolicyStatus,
    #[serde(default)]
    mode: PolicyMode,
    /// `example.com` or `*.example.com` (strict subdomains).
    #[serde(default)]
    #[schema(example = json!(["docs.example.com", "*.api.example.org"]))]
    allowed_domains: Vec<String>,
    #[serde(default)]
    #[schema(example = json!(["ads.example.com"]))]
    blocked_domains: Vec<String>,
    /// `[{"id", "priority", "action": "allow"|"deny", "conditions": [{"field", "operator",
    /// "value"}]}]` (rego/README.md).
    #[serde(default)]
    #[schema(example = json!([{"id": "no-delete", "priority": 10, "action": "deny",
        "conditions": [{"field": "method", "operator": "in", "value": ["DELETE"]}]}]))]
    rules: Vec<Value>,
    /// `{"timezone": "<IANA name>", "windows": [{"days": ["mon"], "start": "09:00",
    /// "end": "17:00"}]}`; absent: always.
    #[serde(default)]
    #[schema(example = json!({"timezone": "America/New_York",
        "windows": [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00"}]}))]
    time_restrictions: Option<Value>,
    /// `{"per_minute", "per_hour", "per_day", "burst"}`.
    #[serde(default)]
    #[schema(example = json!({"per_minute": 60, "per_hour": 1000, "burst": 10}))]
    rate_limit: Option<Value>,
    /// A Rego module whose `deny` set adds deny reasons.
    #[serde(default)]
    custom_rego: Option<String>,
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
        if self.rules.len() > 1_000 {
            return Err(ApiError::field("rules", "at most 1000 rules"));
        }
        if self
            .custom_rego
            .as_ref()
            .is_some_and(|r| r.len() > 64 * 1024)
        {
            return Err(ApiError::field("custom_rego", "at most 64 KiB"));
        }
        let allowed_domains = domains("allowed_domains", &self.allowed_domains)?;
        let blocked_domains = domains("blocked_domains", &self.blocked_domains)?;
        let mut spec = PolicySpec {
            rules: self.rules.clone(),
            time_restrictions: self.time_restrictions.clone().filter(|t| !t.is_null()),
            rate_limit: self.rate_limit.clone().filter(|r| !r.is_null()),
            custom_rego: self.custom_rego.clone(),
        };
        spec.normalise();
        // Compiled with the filter's own core: what is accepted is what Envoy can run.
        spec.validate(&allowed_domains, &blocked_domains)
            .map_err(|e| ApiError::field(e.field, e.message))?;
        Ok(PolicyFields {
            name,
            priority: self.priority,
            status: self.status.as_str().to_owned(),
            mode: self.mode.as_str().to_owned(),
            allowed_domains,
            blocked_domains,
            spec,
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

#[utoipa::path(post, path = "/api/v1/policies", tag = "policies", request_body = PolicyBody,
    responses((status = 201, description = "the policy", body = Policy, headers(("ETag" = String, description = "the version, a strong ETag"))),
              (status = 409, description = "the name is taken", body = Problem, content_type = "application/problem+json")))]
pub async fn create_policy(
    Manager(who): Manager,
    State(state): State<AppState>,
    Json(body): Json<PolicyBody>,
) -> Result<Tagged<Policy>, ApiError> {
    let tenant = who.tenant_for_create(body.tenant_id)?;
    let fields = body.fields()?;
    if !store::tenant_exists(&state.store.pool, tenant).await? {
        return Err(ApiError::field("tenant_id", "no such tenant"));
    }
    let policy = store::create_policy(&state.store.pool, tenant, &fields)
        .await
        .map_err(conflict)?;
    changed(
        &state,
        &who,
        "policy.created",
        policy.tenant_id,
        Some(policy.id),
        policy.version,
    )
    .await?;
    tracing::info!(subject = %who.subject, policy_id = %policy.id, version = policy.version, "policy created");
    Ok(Tagged::created(policy.version, policy))
}

/// `PUT /api/v1/policies/{id}` with `If-Match`.
#[utoipa::path(put, path = "/api/v1/policies/{id}", tag = "policies", request_body = PolicyBody,
    params(("id" = Uuid, Path, description = "policy id"), ("If-Match" = String, Header, description = "the ETag of the version this update is based on, e.g. \"3\"")),
    responses((status = 200, description = "the updated policy", body = Policy, headers(("ETag" = String, description = "the version, a strong ETag"))),
              (status = 409, description = "the name is taken", body = Problem, content_type = "application/problem+json"),
              (status = 412, description = "If-Match is not the current version", body = Problem, content_type = "application/problem+json"),
              (status = 428, description = "If-Match is missing", body = Problem, content_type = "application/problem+json")))]
pub async fn update_policy(
    Manager(who): Manager,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Json(body): Json<PolicyBody>,
) -> Result<Tagged<Policy>, ApiError> {
    let expected = if_match(&headers)?;
    let fields = body.fields()?;
    let current = store::get_policy(&state.store.pool, who.scope(), id).await?;
    if body.tenant_id.is_some_and(|t| t != current.tenant_id) {
        return Err(ApiError::field(
            "tenant_id",
            "a policy cannot move between tenants",
        ));
    }
    let policy = store::update_policy(&state.store.pool, who.scope(), id, expected, &fields)
        .await
        .map_err(|e| write_error("policy", expected, e))?;
    changed(
        &state,
        &who,
        "policy.updated",
        policy.tenant_id,
        Some(id),
        policy.version,
    )
    .await?;
    tracing::info!(subject = %who.subject, policy_id = %id, from_version = expected, version = policy.version, "policy updated");
    cache::put(&state, "policy", id, policy.version, &policy).await;
    Ok(Tagged::ok(policy.version, policy))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Also delete a policy that agents still have (they lose it).
    #[serde(default)]
    force: bool,
}

/// `DELETE /api/v1/policies/{id}[?force=true]`; `If-Match` is checked when given.
#[utoipa::path(delete, path = "/api/v1/policies/{id}", tag = "policies",
    params(("id" = Uuid, Path, description = "policy id"), DeleteQuery,
           ("If-Match" = Option<String>, Header, description = "checked when given")),
    responses((status = 204, description = "deleted"),
              (status = 409, description = "still assigned to agents (use ?force=true)", body = Problem, content_type = "application/problem+json"),
              (status = 412, description = "If-Match is not the current version", body = Problem, content_type = "application/problem+json")))]
pub async fn delete_policy(
    Manager(who): Manager,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    Query(query): Query<DeleteQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let expected = match headers.get(header::IF_MATCH) {
        Some(_) => Some(if_match(&headers)?),
        None => None,
    };
    let current = store::get_policy(&state.store.pool, who.scope(), id).await?;
    let unassigned =
        store::delete_policy(&state.store.pool, who.scope(), id, expected, query.force)
            .await
            .map_err(|e| write_error("policy", expected.unwrap_or_default(), e))?;
    cache::floor(&state, "policy", id, i64::MAX).await;
    for (agent, version) in &unassigned {
        cache::floor(&state, "agent", *agent, *version).await;
    }
    let unassigned = unassigned.len();
    changed(
        &state,
        &who,
        "policy.deleted",
        current.tenant_id,
        Some(id),
        current.version,
    )
    .await?;
    tracing::info!(subject = %who.subject, policy_id = %id, unassigned, "policy deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/policies/{id}", tag = "policies", params(("id" = Uuid, Path, description = "policy id")),
    responses((status = 200, description = "the policy", body = Policy, headers(("ETag" = String, description = "the version, a strong ETag")))))]
pub async fn get_policy(
    Manager(who): Manager,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Tagged<Policy>, ApiError> {
    if let Some(policy) = cache::get::<Policy>(&state, "policy", id).await {
        return visible(&who, policy.tenant_id).map(|()| Tagged::ok(policy.version, policy));
    }
    let policy = store::get_policy(&state.store.pool, who.scope(), id).await?;
    cache::put(&state, "policy", id, policy.version, &policy).await;
    Ok(Tagged::ok(policy.version, policy))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PolicyQuery {
    /// A platform administrator's filter; tenant callers see their own tenant.
    tenant_id: Option<Uuid>,
    status: Option<PolicyStatus>,
    mode: Option<PolicyMode>,
    /// 1 to 500, default 100.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/policies", tag = "policies", params(PolicyQuery),
    responses((status = 200, description = "a page of policies, oldest first", body = Listing<Policy>)))]
pub async fn list_policies(
    Manager(who): Manager,
    State(state): State<AppState>,
    Query(query): Query<PolicyQuery>,
) -> Result<axum::Json<Listing<Policy>>, ApiError> {
    let filter = PolicyFilter {
        tenant: who.filter_tenant(query.tenant_id)?,
        status: query.status.map(|s| s.as_str().to_owned()),
        mode: query.mode.map(|m| m.as_str().to_owned()),
    };
    let page = page(query.limit, query.cursor.as_deref())?;
    let items = store::list_policies(&state.store.pool, &filter, fetch_one_more(page)).await?;
    Ok(axum::Json(paginate(items, page, |p| p.id)))
}

// === dry-run evaluation ===

/// A request to evaluate as the filter would see it.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateRequest {
    /// The `:authority` (normalised like the filter does: lower case, no port).
    domain: String,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    user_agent: String,
    #[serde(default)]
    source_ip: String,
    #[serde(default = "default_scheme")]
    scheme: String,
    /// The instant to evaluate at; now when absent.
    at: Option<DateTime<Utc>>,
}

fn default_method() -> String {
    "GET".into()
}

fn default_path() -> String {
    "/".into()
}

fn default_scheme() -> String {
    "https".into()
}

/// The filter's decision: what Envoy would answer (200 through to the upstream, or 403).
#[derive(Serialize, utoipa::ToSchema)]
pub struct EvaluateResult {
    pub allow: bool,
    pub reason: String,
    /// The policy that decided, if any.
    pub policy_id: Option<String>,
    pub tenant_id: Option<String>,
    pub agent_id: Option<String>,
    /// The status Envoy would answer with when it denies (403), else 200.
    pub status: u16,
    pub domain: String,
    pub evaluated_at: DateTime<Utc>,
}

// === impl EvaluateRequest ===

impl EvaluateRequest {
    fn facts(
        &self,
        fingerprint: &str,
        subject: &str,
    ) -> Result<(RequestFacts<'static>, DateTime<Utc>), ApiError> {
        let domain = normalize_domain(&self.domain);
        if domain.is_empty() || domain.len() > 253 {
            return Err(ApiError::field("domain", "must be a host name"));
        }
        for (field, value) in [
            ("method", &self.method),
            ("path", &self.path),
            ("user_agent", &self.user_agent),
            ("source_ip", &self.source_ip),
            ("scheme", &self.scheme),
        ] {
            if value.len() > 4_096 {
                return Err(ApiError::field(field, "at most 4096 bytes"));
            }
        }
        let at = self.at.unwrap_or_else(Utc::now);
        let unix_ns = at
            .timestamp_nanos_opt()
            .and_then(|ns| u64::try_from(ns).ok())
            .ok_or_else(|| ApiError::field("at", "must be between 1970 and 2262"))?;
        let path = self.path.split('?').next().unwrap_or_default().to_owned();
        Ok((
            RequestFacts {
                fingerprint: fingerprint.to_owned().into(),
                subject: subject.to_owned().into(),
                domain: domain.into_owned().into(),
                method: self.method.clone().into(),
                path: path.into(),
                user_agent: self.user_agent.clone().into(),
                source_ip: self.source_ip.clone().into(),
                scheme: self.scheme.clone().into(),
                unix_ns,
            },
            at,
        ))
    }
}

/// `POST /api/v1/agents/{id}/evaluate`: the decision the filter would make for this agent
/// now, from the bundle the database gives (the one published after the last write),
/// evaluated by the filter's own core.
#[utoipa::path(post, path = "/api/v1/agents/{id}/evaluate", tag = "evaluation", request_body = EvaluateRequest,
    params(("id" = Uuid, Path, description = "agent id")),
    responses((status = 200, description = "the decision the filter would make", body = EvaluateResult)))]
pub async fn evaluate_agent(
    Manager(who): Manager,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    Json(body): Json<EvaluateRequest>,
) -> Result<axum::Json<EvaluateResult>, ApiError> {
    let agent = store::get_agent(&state.store.pool, who.scope(), id).await?;
    let (facts, at) = body.facts(&agent.fingerprint, &agent.subject)?;
    let bundle = crate::bundle::compile(&state.store.pool).await?;
    evaluate(&bundle, &facts, at).map(axum::Json)
}

/// `POST /api/v1/policies/{id}/evaluate`: the decision of this policy alone (as if it
/// were active, so drafts can be tried) for an active agent that has only this policy.
#[utoipa::path(post, path = "/api/v1/policies/{id}/evaluate", tag = "evaluation", request_body = EvaluateRequest,
    params(("id" = Uuid, Path, description = "policy id")),
    responses((status = 200, description = "the decision of this policy alone", body = EvaluateResult)))]
pub async fn evaluate_policy(
    Manager(who): Manager,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    Json(body): Json<EvaluateRequest>,
) -> Result<axum::Json<EvaluateResult>, ApiError> {
    let mut policy = store::policy_row(&state.store.pool, who.scope(), id).await?;
    const FINGERPRINT: &str = "dry-run";
    let (facts, at) = body.facts(FINGERPRINT, "CN=dry-run")?;
    // The bundle compiler itself builds the data: the same shape as what Envoy gets.
    policy.status = PolicyStatus::Active.as_str().to_owned();
    let agent = AgentRow {
        id: Uuid::nil(),
        tenant_id: policy.tenant_id,
        name: "dry-run".to_owned(),
        fingerprint: FINGERPRINT.to_owned(),
        status: AgentStatus::Active.as_str().to_owned(),
        metadata: json!({}),
        policies: vec![policy.id],
    };
    let bundle = crate::bundle::compile_rows(vec![agent], vec![policy], at.timestamp())?;
    let mut result = evaluate(&bundle, &facts, at)?;
    result.agent_id = None;
    Ok(axum::Json(result))
}

fn evaluate(
    bundle: &Bundle,
    facts: &RequestFacts<'_>,
    at: DateTime<Utc>,
) -> Result<EvaluateResult, ApiError> {
    let mut compiled = CompiledPolicy::compile(bundle)
        .map_err(|e| ApiError::Internal(format!("bundle does not compile: {e}")))?;
    let decision = compiled
        .evaluate(facts)
        .map_err(|e| ApiError::Internal(format!("evaluation failed: {e}")))?;
    Ok(EvaluateResult {
        allow: decision.allow,
        status: if decision.allow { 200 } else { 403 },
        reason: decision.reason,
        policy_id: decision.policy_id,
        tenant_id: decision.tenant_id,
        agent_id: decision.agent_id,
        domain: facts.domain.to_string(),
        evaluated_at: at,
    })
}

// === helpers ===

/// Appends an admin change to the tenant's audit chain. The write is already committed,
/// so a failure here cannot undo it: the append runs in a task of its own (a client
/// that goes away does not cancel it) and is retried after 0.1, 0.5 and 2 s (the batch
/// id makes a retry after an unclear failure store the entry once); a change that still
/// cannot be recorded is logged and counted (`chronoguard_admin_audit_failures_total`).
pub(super) async fn record_admin_change(
    state: &AppState,
    change: crate::audit::admin::AdminChange<'_>,
) {
    let now_ns = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let entry = crate::audit::admin::batch(&change, now_ns);
    let (pool, audit) = (state.store.pool.clone(), state.audit.clone());
    let (action, tenant) = (change.action.to_owned(), change.tenant);
    let task = tokio::spawn(async move {
        let pauses = std::iter::once(0).chain(crate::audit::admin::RETRY_PAUSES_MS);
        for (attempt, pause) in pauses.enumerate() {
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            match crate::storage::audit::append_batch(&pool, entry.clone(), &audit.hmac).await {
                Ok(_) => return,
                Err(err) => {
                    tracing::warn!(error = %err, attempt, %action, tenant_id = %tenant, "admin change not yet recorded in the audit chain; retrying");
                }
            }
        }
        crate::audit::admin::FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(%action, tenant_id = %tenant, "admin change not recorded in the audit chain after every retry");
    });
    if let Err(err) = task.await {
        tracing::error!(error = %err, "admin audit task failed");
    }
}

/// After a committed write: rebuilds and publishes the bundles, then tells the tenant's
/// event subscribers about the change (and about the new version of the bundle carrying
/// the tenant, if any: the highest among the fleets serving it).
async fn changed(
    state: &AppState,
    who: &Principal,
    kind: &'static str,
    tenant: Uuid,
    id: Option<Uuid>,
    version: i64,
) -> Result<(), ApiError> {
    let before = state
        .publisher
        .current()
        .and_then(|p| p.version_for_tenant(tenant));
    let rebuilt = state.publisher.rebuild().await;
    // The change goes into the tenant's audit chain, next to the request decisions.
    record_admin_change(
        state,
        crate::audit::admin::AdminChange {
            tenant,
            action: kind,
            resource_id: id,
            resource_name: None,
            actor: &who.subject,
            version,
            bundle_version: rebuilt
                .as_ref()
                .ok()
                .and_then(|p| p.version_for_tenant(tenant)),
        },
    )
    .await;
    let after = rebuilt?.version_for_tenant(tenant);
    let event = |kind, id, version| Event {
        kind,
        tenant_id: tenant,
        id,
        version: Some(version),
        actor: who.subject.clone(),
        at: Utc::now(),
    };
    events::publish(event(kind, id, version));
    if let Some(version) = after
        && before != after
    {
        events::publish(event("bundle.published", None, version));
    }
    Ok(())
}

/// A JSON body with its version as a strong `ETag`.
pub struct Tagged<T> {
    status: StatusCode,
    version: i64,
    body: T,
}

// === impl Tagged ===

impl<T> Tagged<T> {
    pub(super) fn ok(version: i64, body: T) -> Self {
        Self {
            status: StatusCode::OK,
            version,
            body,
        }
    }

    pub(super) fn created(version: i64, body: T) -> Self {
        Self {
            status: StatusCode::CREATED,
            version,
            body,
        }
    }
}

impl<T: Serialize> IntoResponse for Tagged<T> {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", self.version)) {
            response.headers_mut().insert(header::ETAG, etag);
        }
        response
    }
}

/// A cached resource is the caller's only within its scope; otherwise it is not found.
fn visible(who: &Principal, tenant: Uuid) -> Result<(), ApiError> {
    match who.scope() {
        Some(own) if own != tenant => Err(ApiError::NotFound),
        _ => Ok(()),
    }
}

/// The version named by `If-Match` (a strong ETag such as `"3"`): 428 without one.
pub(super) fn if_match(headers: &HeaderMap) -> Result<i64, ApiError> {
    let value = headers.get(header::IF_MATCH).ok_or_else(|| {
        ApiError::PreconditionRequired(
            "this update needs an If-Match header with the resource's ETag".into(),
        )
    })?;
    value
        .to_str()
        .ok()
        .map(str::trim)
        .and_then(|v| v.strip_prefix('"'))
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| {
            ApiError::PreconditionFailed(
                "if-match must name one strong etag such as \"3\"; weak tags and * do not match"
                    .into(),
            )
        })
}

pub(super) fn stale(what: &str, expected: i64, current: i64) -> ApiError {
    ApiError::PreconditionFailed(format!(
        "the {what} changed: If-Match names version {expected}, the current version is {current}"
    ))
}

fn write_error(what: &str, expected: i64, err: ResourceError) -> ApiError {
    match err {
        ResourceError::Stale { current } => stale(what, expected, current),
        other => other.into(),
    }
}

impl From<ResourceError> for ApiError {
    fn from(err: ResourceError) -> Self {
        match err {
            ResourceError::Store(store) => conflict(store),
            ResourceError::Stale { current } => {
                ApiError::PreconditionFailed(format!("the current version is {current}"))
            }
            ResourceError::AgentLimit { limit } => ApiError::field(
                "tenant_id",
                format!("the tenant has reached its limit of {limit} agents"),
            ),
            ResourceError::NoTenant => ApiError::field("tenant_id", "no such tenant"),
            ResourceError::UnknownPolicy => {
                ApiError::field("policy_ids", "unknown policy id for this agent's tenant")
            }
            ResourceError::Assigned { agents } => ApiError::Conflict(format!(
                "the policy is still assigned to {agents} agent(s); unassign it or delete with ?force=true"
            )),
        }
    }
}

/// Names the uniqueness rule a write broke.
fn conflict(err: StoreError) -> ApiError {
    match err {
        StoreError::Conflict(constraint) => ApiError::Conflict(
            match constraint.as_str() {
                "agents_fingerprint_key" => {
                    "an agent with this certificate fingerprint is already registered"
                }
                "agents_tenant_id_name_key" => {
                    "an agent with this name already exists in the tenant"
                }
                "policies_tenant_id_name_key" => {
                    "a policy with this name already exists in the tenant"
                }
                "tenants_name_key" => "a tenant with this name already exists",
                _ => "the resource already exists",
            }
            .to_owned(),
        ),
        other => other.into(),
    }
}

/// Agent metadata: an object of at most 64 keys (1 to 64 characters) with string, number
/// or boolean values, at most 8 KiB as JSON.
fn agent_metadata(value: &Value) -> Result<Value, ApiError> {
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::field("metadata", "must be an object"))?;
    if object.len() > 64 || value.to_string().len() > 8 * 1024 {
        return Err(ApiError::field("metadata", "at most 64 keys and 8 KiB"));
    }
    for (key, v) in object {
        if key.is_empty() || key.len() > 64 {
            return Err(ApiError::field(
                "metadata",
                "keys must be 1 to 64 characters",
            ));
        }
        if !(v.is_string() || v.is_number() || v.is_boolean()) {
            return Err(ApiError::field(
                "metadata",
                format!("{key}: values must be strings, numbers or booleans"),
            ));
        }
    }
    Ok(value.clone())
}

fn parse_certificate(pem: &str) -> Result<AgentCertificate, ApiError> {
    if pem.len() > 64 * 1024 {
        return Err(ApiError::field("certificate_pem", "at most 64 KiB"));
    }
    AgentCertificate::parse(pem, Utc::now())
        .map_err(|e| ApiError::field("certificate_pem", e.to_string()))
}

fn page(limit: Option<i64>, cursor: Option<&str>) -> Result<Page, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    let after = cursor
        .filter(|c| !c.is_empty())
        .map(|c| {
            Uuid::try_parse(c)
                .map_err(|_| ApiError::field("cursor", "is not a cursor this API gave"))
        })
        .transpose()?;
    Ok(Page { after, limit })
}

/// Asks for one row more than the page holds, to know whether another page follows.
fn fetch_one_more(page: Page) -> Page {
    Page {
        limit: page.limit + 1,
        ..page
    }
}

fn paginate<T>(mut items: Vec<T>, page: Page, id: impl Fn(&T) -> Uuid) -> Listing<T> {
    let more = items.len() as i64 > page.limit;
    items.truncate(usize::try_from(page.limit).unwrap_or(0));
    let next_cursor = if more {
        items.last().map(|last| id(last).simple().to_string())
    } else {
        None
    };
    Listing { items, next_cursor }
}

fn non_empty<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed.len() > 200 {
        return Err(ApiError::field(field, "must be 1 to 200 characters"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ApiError::field(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_parsing() {
        let mut headers = HeaderMap::new();
        assert!(matches!(
            if_match(&headers),
            Err(ApiError::PreconditionRequired(_))
        ));
        for (raw, want) in [
            ("\"3\"", Some(3)),
            (" \"12\" ", Some(12)),
            ("3", None),
            ("W/\"3\"", None),
            ("*", None),
        ] {
            headers.insert(header::IF_MATCH, HeaderValue::from_static(raw));
            assert_eq!(if_match(&headers).ok(), want, "{raw}");
        }
    }

    #[test]
    fn pages() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let page = Page {
            after: None,
            limit: 2,
        };
        let listing = paginate(ids.clone(), page, |id| *id);
        assert_eq!(listing.items, ids[..2]);
        assert_eq!(listing.next_cursor, Some(ids[1].simple().to_string()));
        let last = paginate(ids[..2].to_vec(), page, |id| *id);
        assert_eq!(last.next_cursor, None);
        assert!(super::page(Some(0), None).is_err());
        assert!(super::page(None, Some("nope")).is_err());
    }
}
