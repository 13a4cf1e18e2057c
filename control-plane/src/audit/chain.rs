//! The per-tenant SHA-256 hash chain, as pure functions over canonical bytes.
//!
//! `current_hash = SHA-256(canonical_bytes(entry) ‖ previous_hash)`, with the 32 raw bytes
//! of the previous hash (all zero for sequence 1). The encoding is specified in
//! `docs/audit-chain.md` so auditors can re-implement verification independently.

use super::checkpoint::{Checkpoint, CheckpointCheck, TrustedKeys};
use super::signing::{EntrySignature, HmacKeyring, SignatureCheck};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
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
    /// The HMAC of the entry (see `signing`), `None` when stored unsigned.
    pub signature: Option<EntrySignature>,
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
        encode_fields(&mut out, &fields);
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The entry's HMAC does not verify (entry or signature changed).
    BadSignature,
    /// The entry is signed with a key id the verifier does not know.
    UnknownSignatureKey,
    /// The entry carries no HMAC although the verifier holds keys, or although an earlier
    /// entry of the chain was signed.
    MissingSignature,
    /// A signed checkpoint pins a different hash at this sequence (chain rewritten).
    CheckpointMismatch,
    /// A signed checkpoint covers entries the chain no longer has (tail truncated).
    Truncated,
    /// A checkpoint's Ed25519 signature does not verify.
    BadCheckpointSignature,
    /// A checkpoint is signed with a key id the verifier does not trust.
    UnknownCheckpointKey,
}

/// Incremental verifier: feed entries in sequence order, constant memory (plus the
/// checkpoints' pins).
#[derive(Debug)]
pub struct Verifier {
    expected_sequence: i64,
    previous: [u8; 32],
    checked: u64,
    failure: Option<(i64, Problem)>,
    keys: Option<HmacKeyring>,
    seen_signed: bool,
    signatures_checked: u64,
    unsigned_entries: u64,
    pins: BTreeMap<i64, [u8; 32]>,
    checkpoints_matched: u64,
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
            keys: None,
            seen_signed: false,
            signatures_checked: 0,
            unsigned_entries: 0,
            pins: BTreeMap::new(),
            checkpoints_matched: 0,
        }
    }

    /// Starts right after a signed checkpoint, for a chain whose older entries were dropped
    /// by retention: `None` unless the checkpoint verifies with `trusted`.
    pub fn after_checkpoint(checkpoint: &Checkpoint, trusted: &TrustedKeys) -> Option<Self> {
        let head = checkpoint.head()?;
        (trusted.check(checkpoint) == CheckpointCheck::Valid)
            .then(|| Self::starting_at(checkpoint.sequence_number + 1, head))
    }

    /// Checks every entry's HMAC with `keys`; with a non-empty keyring every entry must be
    /// signed. Without keys only the presence rule applies: once an entry of the chain is
    /// signed, every later one must be.
    pub fn with_keys(mut self, keys: HmacKeyring) -> Self {
        self.keys = (!keys.is_empty()).then_some(keys);
        self
    }

    /// Pins the chain to signed checkpoints (of this chain's tenant): each checkpoint's
    /// signature must verify with `trusted`, the entry at its sequence must have its head
    /// hash, and the chain must reach its sequence.
    pub fn with_checkpoints(mut self, checkpoints: &[Checkpoint], trusted: &TrustedKeys) -> Self {
        let mut sorted: Vec<&Checkpoint> = checkpoints.iter().collect();
        sorted.sort_by_key(|c| c.sequence_number);
        for checkpoint in sorted {
            self.add_checkpoint(checkpoint, trusted);
        }
        self
    }

    /// Adds one checkpoint while entries stream in (e.g. the ones embedded in an export);
    /// it must arrive before the entry at its sequence.
    pub fn add_checkpoint(&mut self, checkpoint: &Checkpoint, trusted: &TrustedKeys) {
        let seq = checkpoint.sequence_number;
        let problem = match trusted.check(checkpoint) {
            CheckpointCheck::BadSignature => Some(Problem::BadCheckpointSignature),
            CheckpointCheck::UnknownKey => Some(Problem::UnknownCheckpointKey),
            CheckpointCheck::Valid => match checkpoint.head() {
                None => Some(Problem::BadCheckpointSignature),
                Some(head) => match self.pins.insert(seq, head) {
                    // Two validly signed checkpoints disagree: the chain forked.
                    Some(other) if other != head => Some(Problem::CheckpointMismatch),
                    _ => None,
                },
            },
        };
        if let Some(problem) = problem {
            self.fail(seq, problem);
        }
    }

    fn fail(&mut self, seq: i64, problem: Problem) {
        if self.failure.is_none() {
            self.failure = Some((seq, problem));
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
                    } else if let Some(problem) = self.check_signature(stored, &cur) {
                        Some(problem)
                    } else if self.pins.get(&seq).is_some_and(|pin| *pin != cur) {
                        Some(Problem::CheckpointMismatch)
                    } else {
                        if self.pins.contains_key(&seq) {
                            self.checkpoints_matched += 1;
                        }
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

    fn check_signature(&mut self, stored: &StoredEntry, current: &[u8; 32]) -> Option<Problem> {
        let Some(signature) = &stored.signature else {
            self.unsigned_entries += 1;
            return (self.seen_signed || self.keys.is_some()).then_some(Problem::MissingSignature);
        };
        self.seen_signed = true;
        let keys = self.keys.as_ref()?;
        self.signatures_checked += 1;
        match keys.check(current, signature) {
            SignatureCheck::Valid => None,
            SignatureCheck::Invalid => Some(Problem::BadSignature),
            SignatureCheck::UnknownKey => Some(Problem::UnknownSignatureKey),
        }
    }

    /// Ends verification against the recorded head sequence, if known, and the
    /// checkpoints: a checkpoint beyond the last entry means the tail was truncated.
    pub fn finish(mut self, head_sequence: Option<i64>) -> Outcome {
        if self.failure.is_none() {
            if self.pins.range(self.expected_sequence..).next().is_some() {
                self.failure = Some((self.expected_sequence, Problem::Truncated));
            } else if let Some(head) = head_sequence
                && head >= self.expected_sequence
            {
                self.failure = Some((self.expected_sequence, Problem::HeadMismatch));
            }
        }
        Outcome {
            ok: self.failure.is_none(),
            entries_checked: self.checked,
            last_sequence: self.expected_sequence - 1,
            first_bad_sequence: self.failure.map(|(seq, _)| seq),
            problem: self.failure.map(|(_, problem)| problem),
            last_hash: hex::encode(self.previous),
            signatures_checked: self.signatures_checked,
            unsigned_entries: self.unsigned_entries,
            checkpoints: self.pins.len() as u64,
            checkpoints_matched: self.checkpoints_matched,
        }
    }
}

/// The result of verifying a chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub ok: bool,
    pub entries_checked: u64,
    /// Sequence number of the last entry that verified.
    pub last_sequence: i64,
    pub first_bad_sequence: Option<i64>,
    pub problem: Option<Problem>,
    /// Hash of the last entry that verified.
    pub last_hash: String,
    /// Entries whose HMAC was checked (0 without keys).
    pub signatures_checked: u64,
    pub unsigned_entries: u64,
    /// Checkpoints whose signature verified and that pin this chain.
    pub checkpoints: u64,
    /// Of those, how many were matched against an entry.
    pub checkpoints_matched: u64,
}

/// The field encoding of `docs/audit-chain.md`: null is `0x00`; a present value is `0x01`,
/// its UTF-8 length as u32 big-endian, then the bytes.
pub fn encode_fields(out: &mut Vec<u8>, fields: &[Option<&str>]) {
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
}

fn decode(hash: &str) -> Option<[u8; 32]> {
    let mut out = [0; 32];
    hex::decode_to_slice(hash, &mut out).ok()?;
    Some(out)
}

/// Links `entries` (already numbered from `head_sequence + 1`) after `head_hash`, each
/// signed with the active HMAC key of `keys` (unsigned when it has none).
pub fn append(
    head_hash: [u8; 32],
    entries: Vec<ChainEntry>,
    keys: &HmacKeyring,
) -> (Vec<StoredEntry>, [u8; 32]) {
    let mut previous = head_hash;
    let stored = entries
        .into_iter()
        .map(|entry| {
            let current = entry.link(&previous);
            let stored = StoredEntry {
                entry,
                previous_hash: hex::encode(previous),
                current_hash: hex::encode(current),
                signature: keys.sign(&current),
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
    use crate::audit::checkpoint::CheckpointSigner;

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
        append(GENESIS, (1..=n).map(entry).collect(), &HmacKeyring::empty()).0
    }

    fn keys() -> HmacKeyring {
        HmacKeyring::parse(&format!("k1:{}", "11".repeat(32)), "k1").unwrap()
    }

    fn signed_chain(n: i64) -> Vec<StoredEntry> {
        append(GENESIS, (1..=n).map(entry).collect(), &keys()).0
    }

    fn signer() -> CheckpointSigner {
        CheckpointSigner::from_settings(&"07".repeat(32), "cp1")
            .unwrap()
            .unwrap()
    }

    fn checkpoint_at(entries: &[StoredEntry], seq: i64) -> Checkpoint {
        let head = parse_hash(&entries[(seq - 1) as usize].current_hash).unwrap();
        signer().sign(Uuid::from_u128(1), seq, &head, 1)
    }

    fn verify_with(
        entries: &[StoredEntry],
        checkpoints: &[Checkpoint],
        head: Option<i64>,
    ) -> Outcome {
        let trusted = TrustedKeys::from_settings(Some(&signer()), "").unwrap();
        let mut verifier = Verifier::new()
            .with_keys(keys())
            .with_checkpoints(checkpoints, &trusted);
        entries.iter().for_each(|e| verifier.push(e));
        verifier.finish(head)
    }

    fn problem(out: &Outcome) -> (Option<i64>, Option<Problem>) {
        (out.first_bad_sequence, out.problem)
    }

    #[test]
    fn signed_chain_with_checkpoints_verifies() {
        let entries = signed_chain(6);
        let cps = [checkpoint_at(&entries, 3), checkpoint_at(&entries, 6)];
        let out = verify_with(&entries, &cps, Some(6));
        assert!(out.ok, "{out:?}");
        assert_eq!(
            (
                out.signatures_checked,
                out.checkpoints,
                out.checkpoints_matched
            ),
            (6, 2, 2)
        );
    }

    #[test]
    fn verification_resumes_after_a_checkpoint() {
        let entries = signed_chain(8);
        let anchor = checkpoint_at(&entries, 4);
        let trusted = TrustedKeys::from_settings(Some(&signer()), "").unwrap();
        let run = |verifier: Verifier, from: usize| {
            let mut verifier = verifier
                .with_keys(keys())
                .with_checkpoints(std::slice::from_ref(&anchor), &trusted);
            entries[from..].iter().for_each(|e| verifier.push(e));
            verifier.finish(Some(8))
        };
        let out = run(Verifier::after_checkpoint(&anchor, &trusted).unwrap(), 4);
        assert!(out.ok, "{out:?}");
        assert_eq!(out.entries_checked, 4);
        // A gap right after the anchor is still a gap.
        let out = run(Verifier::after_checkpoint(&anchor, &trusted).unwrap(), 5);
        assert_eq!(problem(&out), (Some(5), Some(Problem::SequenceGap)));
        let mut forged = anchor.clone();
        forged.sequence_number = 3;
        assert!(Verifier::after_checkpoint(&forged, &trusted).is_none());
    }

    #[test]
    fn signatures_catch_changes_and_stripping() {
        let mut entries = signed_chain(4);
        entries[1].signature.as_mut().unwrap().mac = "00".repeat(32);
        assert_eq!(
            problem(&verify_with(&entries, &[], None)),
            (Some(2), Some(Problem::BadSignature))
        );

        let mut entries = signed_chain(4);
        entries[2].signature.as_mut().unwrap().key_id = "k9".into();
        assert_eq!(
            problem(&verify_with(&entries, &[], None)),
            (Some(3), Some(Problem::UnknownSignatureKey))
        );

        // Without keys, an unsigned entry after a signed one is still caught.
        let mut entries = signed_chain(4);
        entries[3].signature = None;
        let mut verifier = Verifier::new();
        entries.iter().for_each(|e| verifier.push(e));
        assert_eq!(
            problem(&verifier.finish(None)),
            (Some(4), Some(Problem::MissingSignature))
        );

        // With keys, every entry must be signed.
        let unsigned = chain(2);
        assert_eq!(
            problem(&verify_with(&unsigned, &[], None)),
            (Some(1), Some(Problem::MissingSignature))
        );
    }

    #[test]
    fn checkpoints_catch_truncation_and_rewrite() {
        let entries = signed_chain(6);
        let cps = [checkpoint_at(&entries, 5)];

        // Tail truncated and the head row moved back: the chain itself is consistent.
        let truncated = &entries[..3];
        assert!(verify_with(truncated, &[], Some(3)).ok);
        assert_eq!(
            problem(&verify_with(truncated, &cps, Some(3))),
            (Some(4), Some(Problem::Truncated))
        );

        // Whole chain rewritten from entry 2 with recomputed hashes, signatures dropped.
        let mut forged: Vec<ChainEntry> = entries.iter().map(|e| e.entry.clone()).collect();
        forged[1].domain = "evil.test".into();
        let forged = append(GENESIS, forged, &HmacKeyring::empty()).0;
        let mut verifier = Verifier::new().with_checkpoints(
            &cps,
            &TrustedKeys::from_settings(Some(&signer()), "").unwrap(),
        );
        forged.iter().for_each(|e| verifier.push(e));
        assert_eq!(
            problem(&verifier.finish(Some(6))),
            (Some(5), Some(Problem::CheckpointMismatch))
        );

        // A forged checkpoint does not verify.
        let mut bad = cps[0].clone();
        bad.head_hash = forged[4].current_hash.clone();
        assert_eq!(
            problem(&verify_with(&entries, &[bad], Some(6))),
            (Some(5), Some(Problem::BadCheckpointSignature))
        );
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
