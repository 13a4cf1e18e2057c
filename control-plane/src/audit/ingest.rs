//! Validates an audit batch from the filter as a whole before anything is stored.

use super::chain::ChainEntry;
use crate::domain::GATEWAY_TENANT;
use filter_core::audit::{AuditBatch, AuditRecord};
use uuid::Uuid;

pub use filter_core::audit::MAX_BATCH;

/// A batch that passed validation: entries grouped per tenant, in batch order.
#[derive(Debug, Clone)]
pub struct ValidBatch {
    pub batch_id: Uuid,
    pub entry_count: usize,
    /// Sorted by tenant id (the lock order), entries without sequence numbers yet.
    pub tenants: Vec<(Uuid, Vec<ChainEntry>)>,
    pub agent_ids: Vec<Uuid>,
}

impl ValidBatch {
    /// One batch per tenant, each under an id of its own derived from this batch's id and
    /// the tenant (so a retried batch maps to the same parts). A single-tenant batch is
    /// its own only part and keeps its id.
    pub fn into_tenant_parts(self) -> Vec<ValidBatch> {
        if self.tenants.len() <= 1 {
            return vec![self];
        }
        let whole = self.batch_id;
        self.tenants
            .into_iter()
            .map(|(tenant, entries)| {
                let mut agent_ids: Vec<Uuid> = entries.iter().filter_map(|e| e.agent_id).collect();
                agent_ids.sort_unstable();
                agent_ids.dedup();
                ValidBatch {
                    batch_id: part_id(whole, tenant),
                    entry_count: entries.len(),
                    tenants: vec![(tenant, entries)],
                    agent_ids,
                }
            })
            .collect()
    }
}

/// The id under which a multi-tenant batch's entries of one tenant are claimed.
pub fn part_id(batch_id: Uuid, tenant: Uuid) -> Uuid {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"chronoguard audit batch part\0")
        .chain_update(batch_id.as_bytes())
        .chain_update(tenant.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch_id is not a UUID")]
    BatchId,
    #[error("batch has no entries")]
    Empty,
    #[error("batch has {0} entries, more than {MAX_BATCH}")]
    TooLarge(usize),
    #[error("entry {index}: {problem}")]
    Entry { index: usize, problem: String },
}

pub fn validate(batch: AuditBatch) -> Result<ValidBatch, BatchError> {
    let batch_id = Uuid::parse_str(&batch.batch_id).map_err(|_| BatchError::BatchId)?;
    if batch.entries.is_empty() {
        return Err(BatchError::Empty);
    }
    if batch.entries.len() > MAX_BATCH {
        return Err(BatchError::TooLarge(batch.entries.len()));
    }
    let entry_count = batch.entries.len();
    let mut tenants: std::collections::BTreeMap<Uuid, Vec<ChainEntry>> = Default::default();
    let mut agent_ids = Vec::new();
    for (index, record) in batch.entries.into_iter().enumerate() {
        let entry = entry(record).map_err(|problem| BatchError::Entry { index, problem })?;
        if let Some(agent) = entry.agent_id {
            agent_ids.push(agent);
        }
        tenants.entry(entry.tenant_id).or_default().push(entry);
    }
    agent_ids.sort_unstable();
    agent_ids.dedup();
    Ok(ValidBatch {
        batch_id,
        entry_count,
        tenants: tenants.into_iter().collect(),
        agent_ids,
    })
}

fn entry(r: AuditRecord) -> Result<ChainEntry, String> {
    let uuid = |field: &str, value: &str| {
        Uuid::parse_str(value).map_err(|_| format!("{field} is not a UUID"))
    };
    let optional = |field: &str, value: Option<&String>| match value {
        None => Ok(None),
        Some(v) => uuid(field, v).map(Some),
    };
    if r.decision != "allow" && r.decision != "deny" {
        return Err("decision must be allow or deny".into());
    }
    if r.reason.is_empty() {
        return Err("reason must not be empty".into());
    }
    // PostgreSQL text cannot hold NUL: such a batch would fail on insert every time it is
    // retried, so it is refused here, as the client's error.
    let texts = [
        &r.decision_id,
        &r.agent_fingerprint,
        &r.agent_subject,
        &r.domain,
        &r.method,
        &r.path,
        &r.user_agent,
        &r.source_ip,
        &r.reason,
        &r.config_version,
    ];
    if texts.iter().any(|t| t.contains('\0'))
        || r.policy_id.as_ref().is_some_and(|p| p.contains('\0'))
    {
        return Err("text fields must not contain NUL characters".into());
    }
    let timestamp_ns = i64::try_from(r.timestamp_ns)
        .ok()
        .filter(|t| *t > 0)
        .ok_or("timestamp_ns must be a positive 63-bit integer")?;
    Ok(ChainEntry {
        tenant_id: optional("tenant_id", r.tenant_id.as_ref())?.unwrap_or(GATEWAY_TENANT),
        sequence_number: 0,
        entry_id: uuid("decision_id", &r.decision_id)?,
        timestamp_ns,
        kind: "decision".into(),
        agent_id: optional("agent_id", r.agent_id.as_ref())?,
        agent_fingerprint: r.agent_fingerprint,
        agent_subject: r.agent_subject,
        domain: r.domain,
        method: r.method,
        path: r.path,
        user_agent: r.user_agent,
        source_ip: r.source_ip,
        decision: r.decision,
        reason: r.reason,
        policy_id: r.policy_id,
        config_version: r.config_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            decision_id: Uuid::from_u128(1).to_string(),
            timestamp_ns: 1,
            tenant_id: None,
            agent_id: None,
            agent_fingerprint: String::new(),
            agent_subject: String::new(),
            domain: "example.com".into(),
            method: "GET".into(),
            path: "/".into(),
            user_agent: String::new(),
            source_ip: "127.0.0.1".into(),
            decision: "allow".into(),
            reason: "domain_allowed".into(),
            policy_id: None,
            config_version: "1".into(),
        }
    }

    #[test]
    fn a_spanning_batch_splits_into_one_part_per_tenant() {
        let (a, b) = (Uuid::from_u128(10), Uuid::from_u128(11));
        let entry = |tenant: Uuid, agent: u128| AuditRecord {
            tenant_id: Some(tenant.to_string()),
            agent_id: Some(Uuid::from_u128(agent).to_string()),
            ..record()
        };
        let batch = AuditBatch {
            batch_id: Uuid::from_u128(9).to_string(),
            entries: vec![entry(a, 1), entry(b, 2), entry(a, 3), entry(a, 1)],
        };
        let parts = validate(batch.clone()).unwrap().into_tenant_parts();
        let shape: Vec<_> = parts
            .iter()
            .map(|p| {
                (
                    p.batch_id,
                    p.entry_count,
                    p.tenants[0].0,
                    p.agent_ids.clone(),
                )
            })
            .collect();
        let id = Uuid::from_u128(9);
        assert_eq!(
            shape,
            [
                (
                    part_id(id, a),
                    3,
                    a,
                    vec![Uuid::from_u128(1), Uuid::from_u128(3)]
                ),
                (part_id(id, b), 1, b, vec![Uuid::from_u128(2)]),
            ]
        );
        // Deterministic (a retry maps to the same parts), distinct per tenant and batch.
        assert_eq!(
            part_id(id, a),
            validate(batch).unwrap().into_tenant_parts()[0].batch_id
        );
        assert_ne!(part_id(id, a), part_id(id, b));
        assert_ne!(part_id(id, a), part_id(Uuid::from_u128(8), a));
        // One tenant: the batch itself, under its own id.
        let single = AuditBatch {
            batch_id: id.to_string(),
            entries: vec![entry(a, 1)],
        };
        let parts = validate(single).unwrap().into_tenant_parts();
        assert_eq!((parts.len(), parts[0].batch_id), (1, id));
    }

    #[test]
    fn nul_characters_are_refused_up_front() {
        let batch = |r: AuditRecord| AuditBatch {
            batch_id: Uuid::from_u128(9).to_string(),
            entries: vec![record(), r],
        };
        assert!(validate(batch(record())).is_ok());
        let mut bad = record();
        bad.path = "/a\0b".into();
        assert!(matches!(
            validate(batch(bad)),
            Err(BatchError::Entry { index: 1, .. })
        ));
        let mut bad = record();
        bad.policy_id = Some("\0".into());
        assert!(validate(batch(bad)).is_err());
    }
}
