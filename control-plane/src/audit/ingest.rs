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

/// Entries a part of a spanning batch holds at least (but its last tenants): tenants with
/// fewer entries share a part, so small batches stay one transaction.
pub const MIN_PART_ENTRIES: usize = 250;

impl ValidBatch {
    /// The batch in parts of whole tenants, in tenant order, each of at least
    /// [`MIN_PART_ENTRIES`] entries except the last (which joins the one before it when
    /// smaller). A batch that makes one part keeps its id; otherwise each part is claimed
    /// under an id derived from the batch id and its first tenant, so a resent batch maps
    /// to the same parts.
    pub fn into_tenant_parts(self) -> Vec<ValidBatch> {
        // Under two parts' worth, any grouping ends as one part (the short last joins).
        if self.tenants.len() == 1 || self.entry_count < 2 * MIN_PART_ENTRIES {
            return vec![self];
        }
        let mut groups: Vec<Vec<(Uuid, Vec<ChainEntry>)>> = Vec::new();
        let mut size = 0;
        for (tenant, entries) in self.tenants {
            match groups.last_mut() {
                Some(group) if size < MIN_PART_ENTRIES => {
                    size += entries.len();
                    group.push((tenant, entries));
                }
                _ => {
                    size = entries.len();
                    groups.push(vec![(tenant, entries)]);
                }
            }
        }
        // A short last part joins the one before it.
        if groups.len() > 1
            && size < MIN_PART_ENTRIES
            && let Some(last) = groups.pop()
            && let Some(previous) = groups.last_mut()
        {
            previous.extend(last);
        }
        let single = groups.len() == 1;
        let whole = self.batch_id;
        groups
            .into_iter()
            .map(|tenants| {
                let first = tenants.first().map_or(Uuid::nil(), |(tenant, _)| *tenant);
                ValidBatch {
                    batch_id: if single { whole } else { part_id(whole, first) },
                    entry_count: tenants.iter().map(|(_, e)| e.len()).sum(),
                    agent_ids: agent_ids(tenants.iter().flat_map(|(_, e)| e)),
                    tenants,
                }
            })
            .collect()
    }
}

/// The agents of `entries`, sorted, each once.
fn agent_ids<'a>(entries: impl Iterator<Item = &'a ChainEntry>) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = entries.filter_map(|e| e.agent_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
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
    for (index, record) in batch.entries.into_iter().enumerate() {
        let entry = entry(record).map_err(|problem| BatchError::Entry { index, problem })?;
        tenants.entry(entry.tenant_id).or_default().push(entry);
    }
    Ok(ValidBatch {
        batch_id,
        entry_count,
        agent_ids: agent_ids(tenants.values().flatten()),
        tenants: tenants.into_iter().collect(),
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
    fn a_spanning_batch_splits_into_parts_of_whole_tenants() {
        let tenant = |i: u128| Uuid::from_u128(10 + i);
        let spanning = |counts: &[usize]| AuditBatch {
            batch_id: Uuid::from_u128(9).to_string(),
            entries: counts
                .iter()
                .enumerate()
                .flat_map(|(t, &n)| {
                    (0..n).map(move |k| AuditRecord {
                        tenant_id: Some(tenant(t as u128).to_string()),
                        agent_id: Some(
                            Uuid::from_u128(100 + t as u128 * 10 + (k % 2) as u128).to_string(),
                        ),
                        ..record()
                    })
                })
                .collect(),
        };
        let shape = |counts: &[usize]| -> Vec<(Uuid, usize, Vec<Uuid>, usize)> {
            validate(spanning(counts))
                .unwrap()
                .into_tenant_parts()
                .into_iter()
                .map(|p| {
                    let tenants = p.tenants.iter().map(|(t, _)| *t).collect();
                    (p.batch_id, p.entry_count, tenants, p.agent_ids.len())
                })
                .collect()
        };
        let id = Uuid::from_u128(9);
        // 300 | 100 + 200 | 50: the short last part joins the one before it.
        assert_eq!(
            shape(&[300, 100, 200, 50]),
            [
                (part_id(id, tenant(0)), 300, vec![tenant(0)], 2),
                (
                    part_id(id, tenant(1)),
                    350,
                    vec![tenant(1), tenant(2), tenant(3)],
                    6
                ),
            ]
        );
        // Deterministic (a resent batch maps to the same parts), distinct per tenant and
        // batch.
        assert_eq!(shape(&[300, 100, 200, 50]), shape(&[300, 100, 200, 50]));
        assert_ne!(part_id(id, tenant(0)), part_id(id, tenant(1)));
        assert_ne!(
            part_id(id, tenant(0)),
            part_id(Uuid::from_u128(8), tenant(0))
        );
        // Small batches, one tenant or several, stay whole under their own id.
        assert_eq!(shape(&[3, 1]), [(id, 4, vec![tenant(0), tenant(1)], 3)]);
        assert_eq!(shape(&[400]), [(id, 400, vec![tenant(0)], 2)]);
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
