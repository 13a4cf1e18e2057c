//! Admin mutations as entries of the tenant's audit chain, next to request decisions.
//!
//! An admin entry uses the same canonical encoding (docs/audit-chain.md) with
//! `kind = "admin"`: `method` holds the action (e.g. `policy.updated`), `path` the
//! resource (`policy/<id>`, `gateway/<fleet name>`), `agent_subject` the actor (the token's subject), `reason`
//! `version <before> -> <after>`, `config_version` the bundle version after the change,
//! and `agent_id` / `policy_id` the resource's id.

use super::chain::ChainEntry;
use super::ingest::ValidBatch;
use std::sync::atomic::AtomicU64;
use uuid::Uuid;

/// Admin changes that could not be appended to their tenant's chain after every retry
/// (`chronoguard_admin_audit_failures_total`).
pub static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Pauses before the retries of an admin entry's append.
pub const RETRY_PAUSES_MS: [u64; 3] = [100, 500, 2_000];

/// What an admin changed.
#[derive(Debug, Clone)]
pub struct AdminChange<'a> {
    pub tenant: Uuid,
    /// `agent.created`, `policy.updated`, ...
    pub action: &'a str,
    pub resource_id: Option<Uuid>,
    /// The resource's name when it has no id (a gateway fleet).
    pub resource_name: Option<&'a str>,
    pub actor: &'a str,
    /// The resource's version after the change (0 when deleted).
    pub version: i64,
    pub bundle_version: Option<i64>,
}

/// A one-entry batch for the tenant's chain.
pub fn batch(change: &AdminChange<'_>, now_ns: i64) -> ValidBatch {
    let (resource, agent_id, policy_id) = match change.action.split('.').next() {
        Some("agent") => ("agent", change.resource_id, None),
        Some("policy") => ("policy", None, change.resource_id.map(|id| id.to_string())),
        Some(other) => (other, None, None),
        None => ("unknown", None, None),
    };
    let before = if change.action.ends_with(".created") {
        0
    } else if change.action.ends_with(".deleted") {
        change.version
    } else {
        change.version - 1
    };
    let after = if change.action.ends_with(".deleted") {
        0
    } else {
        change.version
    };
    let entry = ChainEntry {
        tenant_id: change.tenant,
        sequence_number: 0,
        entry_id: Uuid::now_v7(),
        timestamp_ns: now_ns,
        kind: "admin".into(),
        agent_id,
        agent_fingerprint: String::new(),
        agent_subject: change.actor.to_owned(),
        domain: String::new(),
        method: change.action.to_owned(),
        path: match (change.resource_id, change.resource_name) {
            (Some(id), _) => format!("{resource}/{id}"),
            (None, Some(name)) => format!("{resource}/{name}"),
            (None, None) => resource.to_owned(),
        },
        user_agent: String::new(),
        source_ip: String::new(),
        decision: "allow".into(),
        reason: format!("version {before} -> {after}"),
        policy_id,
        config_version: change
            .bundle_version
            .map(|v| v.to_string())
            .unwrap_or_default(),
    };
    ValidBatch {
        batch_id: Uuid::now_v7(),
        entry_count: 1,
        tenants: vec![(change.tenant, vec![entry])],
        agent_ids: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_update_entry() {
        let id = Uuid::from_u128(9);
        let b = batch(
            &AdminChange {
                tenant: Uuid::from_u128(1),
                action: "policy.updated",
                resource_id: Some(id),
                resource_name: None,
                actor: "alice",
                version: 4,
                bundle_version: Some(17),
            },
            5,
        );
        let (_, entries) = &b.tenants[0];
        let e = &entries[0];
        assert_eq!(
            (e.kind.as_str(), e.method.as_str()),
            ("admin", "policy.updated")
        );
        assert_eq!(e.path, format!("policy/{id}"));
        assert_eq!(e.reason, "version 3 -> 4");
        assert_eq!(e.policy_id, Some(id.to_string()));
        assert_eq!(e.agent_subject, "alice");
        assert_eq!(e.config_version, "17");
    }

    #[test]
    fn gateway_entries_name_the_fleet() {
        let b = batch(
            &AdminChange {
                tenant: Uuid::from_u128(1),
                action: "gateway.updated",
                resource_id: None,
                resource_name: Some("egress-eu"),
                actor: "root",
                version: 2,
                bundle_version: None,
            },
            5,
        );
        let e = &b.tenants[0].1[0];
        assert_eq!(e.path, "gateway/egress-eu");
        assert_eq!(e.reason, "version 1 -> 2");
    }
}
