//! The audit record as exported and served (`/audit/entries`, `/audit/export`): every
//! chained field, the chain links, the entry HMAC, and the checkpoint pinning this entry
//! when there is one. JSONL is one [`ExportRecord`] per line; CSV has the same columns
//! with the checkpoint flattened.

use super::chain::{ChainEntry, StoredEntry};
use super::checkpoint::Checkpoint;
use super::signing::EntrySignature;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub tenant_id: Uuid,
    pub sequence_number: i64,
    pub entry_id: Uuid,
    pub timestamp_ns: i64,
    pub kind: String,
    pub agent_id: Option<Uuid>,
    pub agent_fingerprint: String,
    pub agent_subject: String,
    pub domain: String,
    pub method: String,
    pub path: String,
    pub user_agent: String,
    pub source_ip: String,
    pub decision: String,
    pub reason: String,
    pub policy_id: Option<String>,
    pub config_version: String,
    pub previous_hash: String,
    pub current_hash: String,
    pub signature_key_id: Option<String>,
    pub signature: Option<String>,
    /// The signed checkpoint whose head is this entry, if one was taken here.
    pub checkpoint: Option<Checkpoint>,
}

/// CSV column names, in order.
pub const CSV_HEADER: &str = "tenant_id,sequence_number,entry_id,timestamp_ns,kind,agent_id,\
agent_fingerprint,agent_subject,domain,method,path,user_agent,source_ip,decision,reason,\
policy_id,config_version,previous_hash,current_hash,signature_key_id,signature,\
checkpoint_key_id,checkpoint_created_at_ns,checkpoint_signature\n";

// === impl ExportRecord ===

impl ExportRecord {
    pub fn new(stored: StoredEntry, checkpoint: Option<Checkpoint>) -> Self {
        let StoredEntry {
            entry: e,
            previous_hash,
            current_hash,
            signature,
        } = stored;
        let (signature_key_id, signature) = match signature {
            Some(s) => (Some(s.key_id), Some(s.mac)),
            None => (None, None),
        };
        Self {
            tenant_id: e.tenant_id,
            sequence_number: e.sequence_number,
            entry_id: e.entry_id,
            timestamp_ns: e.timestamp_ns,
            kind: e.kind,
            agent_id: e.agent_id,
            agent_fingerprint: e.agent_fingerprint,
            agent_subject: e.agent_subject,
            domain: e.domain,
            method: e.method,
            path: e.path,
            user_agent: e.user_agent,
            source_ip: e.source_ip,
            decision: e.decision,
            reason: e.reason,
            policy_id: e.policy_id,
            config_version: e.config_version,
            previous_hash,
            current_hash,
            signature_key_id,
            signature,
            checkpoint,
        }
    }

    /// Back to the chained entry (for verification) and its checkpoint.
    pub fn into_parts(self) -> (StoredEntry, Option<Checkpoint>) {
        let signature = match (self.signature_key_id, self.signature) {
            (Some(key_id), Some(mac)) => Some(EntrySignature { key_id, mac }),
            // Half a signature is no signature; verification reports it as missing.
            _ => None,
        };
        let stored = StoredEntry {
            entry: ChainEntry {
                tenant_id: self.tenant_id,
                sequence_number: self.sequence_number,
                entry_id: self.entry_id,
                timestamp_ns: self.timestamp_ns,
                kind: self.kind,
                agent_id: self.agent_id,
                agent_fingerprint: self.agent_fingerprint,
                agent_subject: self.agent_subject,
                domain: self.domain,
                method: self.method,
                path: self.path,
                user_agent: self.user_agent,
                source_ip: self.source_ip,
                decision: self.decision,
                reason: self.reason,
                policy_id: self.policy_id,
                config_version: self.config_version,
            },
            previous_hash: self.previous_hash,
            current_hash: self.current_hash,
            signature,
        };
        (stored, self.checkpoint)
    }

    /// One JSON line, newline-terminated.
    pub fn to_jsonl(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// One CSV row (RFC 4180 quoting), newline-terminated; nulls are empty cells.
    pub fn to_csv(&self) -> String {
        let opt = |v: Option<&str>| v.unwrap_or("").to_owned();
        let cp = self.checkpoint.as_ref();
        let cells = [
            self.tenant_id.to_string(),
            self.sequence_number.to_string(),
            self.entry_id.to_string(),
            self.timestamp_ns.to_string(),
            self.kind.clone(),
            self.agent_id.map(|a| a.to_string()).unwrap_or_default(),
            self.agent_fingerprint.clone(),
            self.agent_subject.clone(),
            self.domain.clone(),
            self.method.clone(),
            self.path.clone(),
            self.user_agent.clone(),
            self.source_ip.clone(),
            self.decision.clone(),
            self.reason.clone(),
            opt(self.policy_id.as_deref()),
            self.config_version.clone(),
            self.previous_hash.clone(),
            self.current_hash.clone(),
            opt(self.signature_key_id.as_deref()),
            opt(self.signature.as_deref()),
            opt(cp.map(|c| c.key_id.as_str())),
            cp.map(|c| c.created_at_ns.to_string()).unwrap_or_default(),
            opt(cp.map(|c| c.signature.as_str())),
        ];
        let mut line = String::with_capacity(512);
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            csv_cell(&mut line, cell);
        }
        line.push('\n');
        line
    }
}

fn csv_cell(out: &mut String, cell: &str) {
    if cell.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&cell.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(cell);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{GENESIS, append};
    use crate::audit::signing::HmacKeyring;

    fn stored() -> StoredEntry {
        let entry = ChainEntry {
            tenant_id: Uuid::from_u128(1),
            sequence_number: 1,
            entry_id: Uuid::from_u128(2),
            timestamp_ns: 3,
            kind: "decision".into(),
            agent_id: None,
            agent_fingerprint: "ab".into(),
            agent_subject: "CN=a, O=\"x\"".into(),
            domain: "example.com".into(),
            method: "GET".into(),
            path: "/".into(),
            user_agent: "ua\nnext".into(),
            source_ip: "127.0.0.1".into(),
            decision: "allow".into(),
            reason: "domain_allowed".into(),
            policy_id: None,
            config_version: "1".into(),
        };
        let keys = HmacKeyring::parse(&format!("k:{}", "33".repeat(32)), "k").unwrap();
        append(GENESIS, vec![entry], &keys).0.remove(0)
    }

    #[test]
    fn jsonl_round_trips_to_the_same_entry() {
        let record = ExportRecord::new(stored(), None);
        let line = record.to_jsonl();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let back: ExportRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_parts(), (stored(), None));
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let line = ExportRecord::new(stored(), None).to_csv();
        assert!(line.contains(",\"CN=a, O=\"\"x\"\"\","), "{line}");
        assert!(line.contains(",\"ua\nnext\","), "{line}");
        assert_eq!(CSV_HEADER.matches(',').count(), 23);
    }
}
