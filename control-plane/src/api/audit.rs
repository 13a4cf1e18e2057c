//! The audit API: ingest from the filter, and the auditor's side — verification,
//! checkpoints and their public key, the filtered entries listing and streaming export.

pub mod analytics;

use super::auth::AuditReader;
use super::{Admin, ApiError, Ingest, Json};
use crate::app::AppState;
use crate::audit::chain::Outcome;
use crate::audit::checkpoint::{Checkpoint, PublicKey};
use crate::audit::export::{CSV_HEADER, ExportRecord};
use crate::audit::{checkpointer, ingest, retention};
use crate::storage::audit::{self as store, Appended, EntryFilter};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use filter_core::audit::AuditBatch;
use futures::StreamExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Default and largest page of `GET /api/v1/audit/entries`.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

/// Query string extractor whose rejections are problem+json (422, field `query`).
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::try_from_uri(&parts.uri)
            .map(|q| Params(q.0))
            .map_err(|e| ApiError::field("query", e.body_text()))
    }
}

#[derive(Serialize)]
pub struct IngestResult {
    batch_id: Uuid,
    stored: usize,
    duplicate: bool,
}

/// `POST /api/v1/audit/batches`: all of a batch or nothing; a retried batch id is
/// acknowledged without storing it again; 503 + Retry-After while the database is down.
pub async fn ingest(
    _: Ingest,
    State(state): State<AppState>,
    Json(batch): Json<AuditBatch>,
) -> Result<(StatusCode, axum::Json<IngestResult>), ApiError> {
    let batch = ingest::validate(batch).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let batch_id = batch.batch_id;
    let outcome = store::append_batch(&state.store.pool, batch, &state.audit.hmac)
        .await
        .inspect_err(|e| {
            tracing::warn!(batch_id = %batch_id, error = %e, "audit batch not stored; the filter will retry");
        })?;
    let (status, stored, duplicate) = match outcome {
        Appended::Stored(per_tenant) => {
            let n = per_tenant.iter().map(|(_, count)| count).sum();
            for (tenant, count) in per_tenant {
                super::events::publish(super::events::Event {
                    kind: "audit.appended",
                    tenant_id: tenant,
                    id: None,
                    version: Some(i64::try_from(count).unwrap_or(i64::MAX)),
                    actor: "filter".into(),
                    at: chrono::Utc::now(),
                });
            }
            (StatusCode::CREATED, n, false)
        }
        Appended::Duplicate => (StatusCode::OK, 0, true),
    };
    Ok((
        status,
        axum::Json(IngestResult {
            batch_id,
            stored,
            duplicate,
        }),
    ))
}

#[derive(Deserialize)]
pub struct TenantQuery {
    tenant_id: Uuid,
}

#[derive(Deserialize)]
pub struct VerifyQuery {
    tenant_id: Uuid,
    /// Verify from here on (after retention dropped older entries); there must be a
    /// signed checkpoint at `from_sequence - 1` to anchor it.
    from_sequence: Option<i64>,
}

#[derive(Serialize)]
pub struct VerifyResult {
    tenant_id: Uuid,
    from_sequence: i64,
    head_sequence: Option<i64>,
    /// The signed checkpoint verification started from: the retention anchor (older
    /// entries were dropped) or `from_sequence - 1`; null when it started at sequence 1.
    anchored_at_checkpoint: Option<i64>,
    #[serde(flatten)]
    outcome: Outcome,
}

/// `GET /api/v1/audit/verify?tenant_id=…`: recomputes the tenant's chain, checks every
/// entry's HMAC with the configured keys and pins it to the stored checkpoints (whose
/// signatures must verify with the trusted public keys). After retention dropped older
/// entries it starts from the signed checkpoint at the chain's retention anchor; with
/// `from_sequence`, from the checkpoint just before it.
pub async fn verify(
    _: AuditReader,
    State(state): State<AppState>,
    Params(query): Params<VerifyQuery>,
) -> Result<axum::Json<VerifyResult>, ApiError> {
    let verification = retention::verify_tenant(
        &state.store.pool,
        &state.audit,
        query.tenant_id,
        query.from_sequence,
    )
    .await?
    .ok_or_else(|| {
        ApiError::field(
            "from_sequence",
            "there is no valid signed checkpoint at from_sequence - 1 to start from",
        )
    })?;
    let outcome = verification.outcome;
    if !outcome.ok {
        tracing::warn!(tenant_id = %query.tenant_id, problem = ?outcome.problem,
            first_bad_sequence = ?outcome.first_bad_sequence, "audit chain verification failed");
    }
    Ok(axum::Json(VerifyResult {
        tenant_id: query.tenant_id,
        from_sequence: verification.from_sequence,
        head_sequence: verification.head_sequence,
        anchored_at_checkpoint: verification.anchored_at_checkpoint,
        outcome,
    }))
}

#[derive(Deserialize)]
pub struct CheckpointRequest {
    tenant_id: Uuid,
}

/// `POST /api/v1/audit/checkpoints` `{"tenant_id": …}`: signs the tenant's current head
/// now (201); the same head checkpointed before is returned as stored.
pub async fn create_checkpoint(
    _: Admin,
    State(state): State<AppState>,
    Json(request): Json<CheckpointRequest>,
) -> Result<(StatusCode, axum::Json<Checkpoint>), ApiError> {
    let signer = state.audit.checkpoint_signer.as_ref().ok_or_else(|| {
        ApiError::Conflict("checkpoint signing is not configured on this control plane".into())
    })?;
    let checkpoint = checkpointer::checkpoint_tenant(&state.store.pool, signer, request.tenant_id)
        .await?
        .ok_or_else(|| ApiError::field("tenant_id", "the tenant's audit chain is empty"))?;
    Ok((StatusCode::CREATED, axum::Json(checkpoint)))
}

#[derive(Serialize)]
pub struct CheckpointList {
    tenant_id: Uuid,
    checkpoints: Vec<Checkpoint>,
}

/// `GET /api/v1/audit/checkpoints?tenant_id=…`: the tenant's checkpoint history.
pub async fn list_checkpoints(
    _: AuditReader,
    State(state): State<AppState>,
    Params(query): Params<TenantQuery>,
) -> Result<axum::Json<CheckpointList>, ApiError> {
    let checkpoints = store::checkpoints(&state.store.pool, query.tenant_id).await?;
    Ok(axum::Json(CheckpointList {
        tenant_id: query.tenant_id,
        checkpoints,
    }))
}

#[derive(Serialize)]
pub struct PublicKeys {
    /// The key new checkpoints are signed with (`null` when signing is off).
    current: Option<PublicKey>,
    /// Every key checkpoints are verified with, including rotated-out ones.
    keys: Vec<PublicKey>,
}

/// `GET /api/v1/audit/public-key`: the checkpoint verification keys.
pub async fn public_key(
    _: AuditReader,
    State(state): State<AppState>,
) -> Result<axum::Json<PublicKeys>, ApiError> {
    if state.audit.trusted.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(axum::Json(PublicKeys {
        current: state
            .audit
            .checkpoint_signer
            .as_ref()
            .map(|s| s.public_key()),
        keys: state.audit.trusted.public_keys(),
    }))
}

#[derive(Deserialize)]
pub struct EntriesQuery {
    tenant_id: Uuid,
    agent_id: Option<Uuid>,
    domain: Option<String>,
    decision: Option<String>,
    policy_id: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<DateTime<Utc>>,
    /// RFC 3339, exclusive.
    to: Option<DateTime<Utc>>,
    cursor: Option<String>,
    limit: Option<i64>,
}

#[derive(Serialize)]
pub struct EntriesPage {
    entries: Vec<ExportRecord>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// `GET /api/v1/audit/entries?tenant_id=…[&agent_id&domain&decision&policy_id&from&to]
/// [&cursor&limit]`: entries in sequence order, with their chain fields and checkpoints.
pub async fn entries(
    _: AuditReader,
    State(state): State<AppState>,
    Params(q): Params<EntriesQuery>,
) -> Result<axum::Json<EntriesPage>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    if let Some(decision) = q.decision.as_deref()
        && decision != "allow"
        && decision != "deny"
    {
        return Err(ApiError::field("decision", "must be allow or deny"));
    }
    if let (Some(from), Some(to)) = (q.from, q.to)
        && from >= to
    {
        return Err(ApiError::field("to", "must be after from"));
    }
    let after_sequence = match q.cursor.as_deref() {
        None => 0,
        Some(cursor) => cursor
            .parse::<i64>()
            .ok()
            .filter(|c| *c >= 0)
            .ok_or_else(|| ApiError::field("cursor", "not a cursor of this listing"))?,
    };
    let filter = EntryFilter {
        tenant_id: q.tenant_id,
        agent_id: q.agent_id,
        domain: q.domain,
        decision: q.decision,
        policy_id: q.policy_id,
        from: q.from,
        to: q.to,
        after_sequence,
    };
    let (entries, more) = store::list_entries(&state.store.pool, &filter, limit).await?;
    let next_cursor = more
        .then(|| entries.last().map(|e| e.sequence_number.to_string()))
        .flatten();
    Ok(axum::Json(EntriesPage {
        entries,
        next_cursor,
    }))
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Deserialize)]
pub struct ExportQuery {
    tenant_id: Uuid,
    format: Option<ExportFormat>,
}

/// Export records per body chunk at most.
const EXPORT_CHUNK: usize = 128;

/// `GET /api/v1/audit/export?tenant_id=…&format=jsonl|csv`: the tenant's whole chain,
/// streamed row by row from the database into the response (flat memory). A failure after
/// the first byte aborts the response, so a client never takes a cut-off file for whole.
pub async fn export(
    _: AuditReader,
    State(state): State<AppState>,
    Params(q): Params<ExportQuery>,
) -> Result<Response, ApiError> {
    let format = q.format.unwrap_or(ExportFormat::Jsonl);
    let tenant = q.tenant_id;
    // Fail with a proper status while nothing is sent yet (e.g. 503 when the database is
    // down); later failures can only abort the stream.
    store::head(&state.store.pool, tenant).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<ExportRecord>(256);
    let pool = state.store.pool.clone();
    let task = tokio::spawn(async move { store::export(&pool, tenant, tx).await });
    let header = match format {
        ExportFormat::Csv => Some(Ok(Bytes::from_static(CSV_HEADER.as_bytes()))),
        ExportFormat::Jsonl => None,
    };
    // Records already waiting go out together (at most 128, ~100 KB): one body chunk per
    // record made the export 4× slower than PostgreSQL's own `COPY TO` (BENCHMARKS.md);
    // memory stays bounded by the channel.
    let rows = tokio_stream::wrappers::ReceiverStream::new(rx)
        .ready_chunks(EXPORT_CHUNK)
        .map(move |records| {
            let mut chunk = String::with_capacity(records.len() * 1024);
            for record in records {
                chunk.push_str(&match format {
                    ExportFormat::Csv => record.to_csv(),
                    ExportFormat::Jsonl => record.to_jsonl(),
                });
            }
            Ok::<_, std::io::Error>(Bytes::from(chunk))
        });
    let end = futures::stream::once(async move {
        let failure = match task.await {
            Ok(Ok((rows, true))) => {
                tracing::info!(tenant_id = %tenant, rows, "audit export finished");
                return None;
            }
            Ok(Ok((rows, false))) => {
                tracing::warn!(tenant_id = %tenant, rows, "audit export cut short: the client went away");
                return None;
            }
            Ok(Err(err)) => err.to_string(),
            Err(err) => err.to_string(),
        };
        tracing::error!(tenant_id = %tenant, error = %failure, "audit export aborted");
        Some(Err(std::io::Error::other("audit export aborted")))
    })
    .filter_map(futures::future::ready);
    let body = Body::from_stream(futures::stream::iter(header).chain(rows).chain(end));
    let (content_type, extension) = match format {
        ExportFormat::Csv => ("text/csv; charset=utf-8", "csv"),
        ExportFormat::Jsonl => ("application/x-ndjson", "jsonl"),
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(value) = HeaderValue::from_str(&format!(
        "attachment; filename=\"audit-{tenant}.{extension}\""
    )) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
