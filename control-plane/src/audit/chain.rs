//! The per-tenant SHA-256 hash chain, as pure functions over canonical bytes.
//!
//! `current_hash = SHA-256(canonical_bytes(entry) ‖ previous_hash)`, with the 32 raw bytes
//! of the previous hash (all zero for sequence 1). The encoding is specified in
//! `docs/audit-chain.md` so auditors can re-implement verification independently.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Format version byte that starts every canonical encoding.
pub const CANONICAL_VERSION: u8 = 1;

/// The previous hash of the first entry of every chain.
pub const GENESIS: [u8; 32] = [0; 32];

/// The chained fields of one audit entry, in canonical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
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
}

/// An entry as stored, with its links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub entry: ChainEntry,
    pub previous_hash: String,
    pub current_hash: String,
}

// === impl ChainEntry ===

impl ChainEntry {
    /// The canonical encoding: the version byte, then each field as a presence byte
    /// (0 = null, 1 = present) followed, when present, by its UTF-8 length as u32
    /// big-endian and the bytes. Ids are lower-case hyphenated UUIDs, integers decimal.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(CANONICAL_VERSION);
        let tenant = self.tenant_id.hyphenated().to_string();
        let sequence = self.sequence_number.to_string();
        let entry_id = self.entry_id.hyphenated().to_string();
        let timestamp = self.timestamp_ns.to_string();
        let agent = self.agent_id.map(|id| id.hyphenated().to_string());
        let fields: [Option<&str>; 17] = [
            Some(&tenant),
            Some(&sequence),
            Some(&entry_id),
            Some(&timestamp),
            Some(&self.kind),
            agent.as_deref(),
            Some(&self.agent_fingerprint),
            Some(&self.agent_subject),
            Some(&self.domain),
            Some(&self.method),
            Some(&self.path),
            Some(&self.user_agent),
            Some(&self.source_ip),
            Some(&self.decision),
            Some(&self.reason),
            self.policy_id.as_deref(),
            Some(&self.config_version),
        ];
        for field in fields {
            match field {
                None => out.push(0),
                Some(text) => {
                    out.push(1);
                    let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(text.as_bytes());
                }
            }
        }
        out
    }

    /// This entry's hash when linked after `previous`.
    pub fn link(&self, previous: &[u8; 32]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.canonical_bytes());
        hasher.update(previous);
        hasher.finalize().into()
    }
}

/// Why verification stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// A sequence number is missing or out of order (deleted, inserted or reordered row).
    SequenceGap,
    /// The stored previous hash is not the hash of the entry before it.
    PreviousHashMismatch,
    /// The entry's content does not hash to its stored hash (modified row).
    HashMismatch,
    /// A stored hash is not 64 hex digits.
    MalformedHash,
    /// The chain ends before the head the control plane recorded (truncated tail).
    HeadMismatch,
}

/// Incremental verifier: feed entries in sequence order, constant memory.
#[derive(Debug)]
pub struct Verifier {
    expected_sequence: i64,
    previous: [u8; 32],
    checked: u64,
    failure: Option<(i64, Problem)>,
}

// === impl Verifier ===

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    /// Starts at sequence 1 with the genesis hash.
    pub fn new() -> Self {
        Self::starting_at(1, GENESIS)
    }

    /// Starts after a trusted point (e.g. a checkpoint): the next entry must have
    /// `sequence` and link to `previous`.
    pub fn starting_at(sequence: i64, previous: [u8; 32]) -> Self {
        Self {
            expected_sequence: sequence,
            previous,
            checked: 0,
            failure: None,
        }
    }

    /// Checks the next entry; after the first failure further entries are ignored.
    pub fn push(&mut self, stored: &StoredEntry) {
        if self.failure.is_some() {
            return;
        }
        let seq = stored.entry.sequence_number;
        let problem = if seq != self.expected_sequence {
            Some(Problem::SequenceGap)
        } else {
            match (decode(&stored.previous_hash), decode(&stored.current_hash)) {
                (Some(prev), Some(cur)) => {
                    if prev != self.previous {
                        Some(Problem::PreviousHashMismatch)
                    } else if stored.entry.link(&prev) != cur {
                        Some(Problem::HashMismatch)
                    } else {
                        self.previous = cur;
                        None
                    }
                }
                _ => Some(Problem::MalformedHash),
            }
        };
        match problem {
            Some(problem) => self.failure = Some((self.expected_sequence.min(seq), problem)),
            None => {
                self.expected_sequence += 1;
                self.checked += 1;
            }
        }
    }

    /// Ends verification against the recorded head sequence, if known.
    pub fn finish(mut self, head_sequence: Option<i64>) -> Outcome {
        if self.failure.is_none()
            && let Some(head) = head_sequence
            && head >= self.expected_sequence
        {
            self.failure = Some((self.expected_sequence, Problem::HeadMismatch));
        }
        Outcome {
            ok: self.failure.is_none(),
            entries_checked: self.checked,
            first_bad_sequence: self.failure.map(|(seq, _)| seq),
            problem: self.failure.map(|(_, problem)| problem),
            last_hash: hex::encode(self.previous),
        }
    }
}

/// The result of verifying a chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub entries_checked: u64,
    pub first_bad_sequence: Option<i64>,
    pub problem: Option<Problem>,
    /// Hash of the last entry that verified.
    pub last_hash: String,
}

fn decode(hash: &str) -> Option<[u8; 32]> {
    let mut out = [0; 32];
    hex::decode_to_slice(hash, &mut out).ok()?;
    Some(out)
}

/// Links `entries` (already numbered from `head_sequence + 1`) after `head_hash`.
pub fn append(head_hash: [u8; 32], entries: Vec<ChainEntry>) -> (Vec<StoredEntry>, [u8; 32]) {
    let mut previous = head_hash;
    let stored = entries
        .into_iter()
        .map(|entry| {
            let current = entry.link(&previous);
            let stored = StoredEntry {
                entry,
                previous_hash: hex::encode(previous),
                current_hash: hex::encode(current),
            };
            previous = current;
            stored
        })
        .collect();
    (stored, previous)
}

/// Parses a stored hex hash.
pub fn parse_hash(hash: &str) -> Option<[u8; 32]> {
    decode(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64) -> ChainEntry {
        ChainEntry {
            tenant_id: Uuid::from_u128(1),
            sequence_number: seq,
            entry_id: Uuid::from_u128(100 + seq as u128),
            timestamp_ns: 1_700_000_000_000_000_000 + seq,
            kind: "decision".into(),
            agent_id: None,
            agent_fingerprint: "ab".into(),
            agent_subject: "CN=a".into(),
            domain: "example.com".into(),
            method: "GET".into(),
            path: "/".into(),
            user_agent: "ua".into(),
            source_ip: "127.0.0.1".into(),
            decision: "allow".into(),
            reason: "domain_allowed".into(),
            policy_id: Some("p".into()),
            config_version: "1".into(),
        }
    }

    fn chain(n: i64) -> Vec<StoredEntry> {
        append(GENESIS, (1..=n).map(entry).collect()).0
    }

    fn verify(entries: &[StoredEntry], head: Option<i64>) -> Outcome {
        let mut verifier = Verifier::new();
        entries.iter().for_each(|e| verifier.push(e));
        verifier.finish(head)
    }

    /// A fixed vector: auditors' implementations of docs/audit-chain.md must reproduce it.
    #[test]
    fn fixed_vector() {
        let bytes = entry(1).canonical_bytes();
        assert_eq!(bytes[0], 1);
        assert_eq!(&bytes[1..6], &[1, 0, 0, 0, 36]);
        assert_eq!(
            hex::encode(entry(1).link(&GENESIS)),
            "8e5438b516d36e5496779928650853efa78b48b073b9fe12b5c4f5664ade6bf9"
        );
    }

    #[test]
    fn intact_chain_verifies() {
        let out = verify(&chain(5), Some(5));
        assert!(out.ok, "{out:?}");
        assert_eq!(out.entries_checked, 5);
    }

    #[test]
    fn tampering_is_located() {
        let mut modified = chain(5);
        modified[2].entry.domain = "evil.test".into();
        let out = verify(&modified, Some(5));
        assert_eq!(
            (out.first_bad_sequence, out.problem),
            (Some(3), Some(Problem::HashMismatch))
        );

        let mut deleted = chain(5);
        deleted.remove(1);
        let out = verify(&deleted, Some(5));
        assert_eq!(
            (out.first_bad_sequence, out.problem),
            (Some(2), Some(Problem::SequenceGap))
        );

        let mut swapped = chain(5);
        swapped.swap(1, 2);
        let out = verify(&swapped, Some(5));
        assert_eq!(
            (out.first_bad_sequence, out.problem),
            (Some(2), Some(Problem::SequenceGap))
        );

        let truncated = chain(3);
        let out = verify(&truncated, Some(5));
        assert_eq!(
            (out.first_bad_sequence, out.problem),
            (Some(4), Some(Problem::HeadMismatch))
        );
    }
}
