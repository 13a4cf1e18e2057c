//! Audit ingest from the filter and chain verification.

use super::{Admin, ApiError, Ingest, Json};
use crate::app::AppState;
use crate::audit::chain::{Outcome, Verifier};
use crate::audit::ingest;
use crate::storage::audit::{self as store, Appended};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use filter_core::audit::AuditBatch;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    let outcome = store::append_batch(&state.store.pool, batch).await.inspect_err(|e| {
        tracing::warn!(batch_id = %batch_id, error = %e, "audit batch not stored; the filter will retry");
    })?;
    let (status, stored, duplicate) = match outcome {
        Appended::Stored(n) => (StatusCode::CREATED, n, false),
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
pub struct VerifyQuery {
    tenant_id: Uuid,
}

#[derive(Serialize)]
pub struct VerifyResult {
    tenant_id: Uuid,
    head_sequence: Option<i64>,
    #[serde(flatten)]
    outcome: Outcome,
}

/// `GET /api/v1/audit/verify?tenant_id=…`: recomputes the tenant's chain from the start.
pub async fn verify(
    _: Admin,
    State(state): State<AppState>,
    Query(query): Query<VerifyQuery>,
) -> Result<axum::Json<VerifyResult>, ApiError> {
    let head = store::head(&state.store.pool, query.tenant_id).await?;
    let mut verifier = Verifier::new();
    store::for_each_entry(&state.store.pool, query.tenant_id, |entry| {
        verifier.push(&entry)
    })
    .await?;
    Ok(axum::Json(VerifyResult {
        tenant_id: query.tenant_id,
        head_sequence: head,
        outcome: verifier.finish(head),
    }))
}
