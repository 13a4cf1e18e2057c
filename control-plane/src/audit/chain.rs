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

/// The chained fields of one entry, borrowed: what hashing needs, so ingest and the
/// offline verifier hash straight from what they parsed, without owning copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFields<'a> {
    pub tenant_id: Uuid,
    pub sequence_number: i64,
    pub entry_id: Uuid,
    pub timestamp_ns: i64,
    pub kind: &'a str,
    pub agent_id: Option<Uuid>,
    pub agent_fingerprint: &'a str,
    pub agent_subject: &'a str,
    pub domain: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub user_agent: &'a str,
    pub source_ip: &'a str,
    pub decision: &'a str,
    pub reason: &'a str,
    pub policy_id: Option<&'a str>,
    pub config_version: &'a str,
}

// === impl ChainEntry ===

impl ChainEntry {
    /// The borrowed view of the chained fields.
    pub fn fields(&self) -> EntryFields<'_> {
        EntryFields {
            tenant_id: self.tenant_id,
            sequence_number: self.sequence_number,
            entry_id: self.entry_id,
            timestamp_ns: self.timestamp_ns,
            kind: &self.kind,
            agent_id: self.agent_id,
            agent_fingerprint: &self.agent_fingerprint,
            agent_subject: &self.agent_subject,
            domain: &self.domain,
            method: &self.method,
            path: &self.path,
            user_agent: &self.user_agent,
            source_ip: &self.source_ip,
            decision: &self.decision,
            reason: &self.reason,
            policy_id: self.policy_id.as_deref(),
            config_version: &self.config_version,
        }
    }

    /// The canonical encoding (see [`EntryFields::write_canonical`]).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.fields().write_canonical(&mut out);
        out
    }

    /// This entry's hash when linked after `previous`.
    pub fn link(&self, previous: &[u8; 32]) -> [u8; 32] {
        self.fields().link(previous, &mut Vec::with_capacity(256))
    }
}

// === impl EntryFields ===

impl EntryFields<'_> {
    /// Appends the canonical encoding to `out`: the version byte, then each field as a
    /// presence byte (0 = null, 1 = present) followed, when present, by its UTF-8 length as
    /// u32 big-endian and the bytes. Ids are lower-case hyphenated UUIDs, integers decimal.
    /// Nothing is allocated besides `out` growing.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        out.push(CANONICAL_VERSION);
        let mut uuid = Uuid::encode_buffer();
        let mut digits = [0u8; 20];
        put(
            out,
            Some(self.tenant_id.hyphenated().encode_lower(&mut uuid)),
        );
        put(out, Some(decimal(self.sequence_number, &mut digits)));
        put(
            out,
            Some(self.entry_id.hyphenated().encode_lower(&mut uuid)),
        );
        put(out, Some(decimal(self.timestamp_ns, &mut digits)));
        put(out, Some(self.kind));
        match self.agent_id {
            Some(agent) => put(out, Some(agent.hyphenated().encode_lower(&mut uuid))),
            None => put(out, None),
        }
        for field in [
            self.agent_fingerprint,
            self.agent_subject,
            self.domain,
            self.method,
            self.path,
            self.user_agent,
            self.source_ip,
            self.decision,
            self.reason,
        ] {
            put(out, Some(field));
        }
        put(out, self.policy_id);
        put(out, Some(self.config_version));
    }

    /// This entry's hash when linked after `previous`; `scratch` is a reusable buffer.
    pub fn link(&self, previous: &[u8; 32], scratch: &mut Vec<u8>) -> [u8; 32] {
        scratch.clear();
        self.write_canonical(scratch);
        scratch.extend_from_slice(previous);
        Sha256::digest(&scratch[..]).into()
    }
}

/// `value` in decimal (as `i64::to_string` writes it) in `buf`.
fn decimal(value: i64, buf: &mut [u8; 20]) -> &str {
    let mut n = value.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        // u64::MAX has 20 digits but |i64::MIN| only 19, so there is room for the sign.
        at -= 1;
        buf[at] = b'-';
    }
    std::str::from_utf8(&buf[at..]).unwrap_or_default()
}

/// One field of the encoding of `docs/audit-chain.md`.
fn put(out: &mut Vec<u8>, field: Option<&str>) {
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

/// What one entry shows on its own, independent of the entries before it: its links
/// decoded, whether its content hashes to its stored hash (given its stored previous
/// hash), and its signature. Computed by [`EntryChecker::check`], possibly on many threads;
/// [`Verifier::push_checked`] then checks the links in order, which is cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryCheck {
    pub sequence_number: i64,
    /// `(previous_hash, current_hash)`, `None` when either is not 64 hex digits.
    links: Option<([u8; 32], [u8; 32])>,
    content_ok: bool,
    signature: SignatureState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignatureState {
    Unsigned,
    /// Signed, and the checker holds no keys.
    NotChecked,
    Checked(SignatureCheck),
}

/// Checks entries on their own (see [`EntryCheck`]); cheap to clone, `Send + Sync`.
#[derive(Debug, Clone, Default)]
pub struct EntryChecker {
    keys: Option<HmacKeyring>,
}

impl EntryChecker {
    /// `signature` is `(key_id, mac_hex)`; half a signature is passed as `None`.
    /// `scratch` is a reusable buffer.
    pub fn check(
        &self,
        fields: &EntryFields<'_>,
        previous_hash: &str,
        current_hash: &str,
        signature: Option<(&str, &str)>,
        scratch: &mut Vec<u8>,
    ) -> EntryCheck {
        let links = decode(previous_hash).zip(decode(current_hash));
        let (content_ok, signature) = match links {
            None => (false, SignatureState::Unsigned),
            Some((prev, cur)) => {
                let signature = match (signature, &self.keys) {
                    (None, _) => SignatureState::Unsigned,
                    (Some(_), None) => SignatureState::NotChecked,
                    (Some((key_id, mac)), Some(keys)) => {
                        SignatureState::Checked(keys.check_hex(&cur, key_id, mac))
                    }
                };
                (fields.link(&prev, scratch) == cur, signature)
            }
        };
        EntryCheck {
            sequence_number: fields.sequence_number,
            links,
            content_ok,
            signature,
        }
    }

    /// [`EntryChecker::check`] of a stored entry.
    pub fn check_stored(&self, stored: &StoredEntry, scratch: &mut Vec<u8>) -> EntryCheck {
        self.check(
            &stored.entry.fields(),
            &stored.previous_hash,
            &stored.current_hash,
            stored
                .signature
                .as_ref()
                .map(|s| (s.key_id.as_str(), s.mac.as_str())),
            scratch,
        )
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
    checker: EntryChecker,
    scratch: Vec<u8>,
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
            checker: EntryChecker::default(),
            scratch: Vec::with_capacity(512),
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
        self.checker.keys = (!keys.is_empty()).then_some(keys);
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

    /// The checker for this verifier's keys, to run [`EntryChecker::check`] on other
    /// threads before [`Verifier::push_checked`].
    pub fn checker(&self) -> EntryChecker {
        self.checker.clone()
    }

    /// Checks the next entry; after the first failure further entries are ignored.
    pub fn push(&mut self, stored: &StoredEntry) {
        if self.failure.is_some() {
            return;
        }
        let check = self.checker.check_stored(stored, &mut self.scratch);
        self.push_checked(&check);
    }

    /// Takes the next entry, checked on its own by [`Verifier::checker`], and checks its
    /// place in the chain: sequence, link to the previous entry, signature rules, pins.
    pub fn push_checked(&mut self, check: &EntryCheck) {
        if self.failure.is_some() {
            return;
        }
        let seq = check.sequence_number;
        let problem = if seq != self.expected_sequence {
            Some(Problem::SequenceGap)
        } else {
            match check.links {
                Some((prev, cur)) => {
                    if prev != self.previous {
                        Some(Problem::PreviousHashMismatch)
                    } else if !check.content_ok {
                        Some(Problem::HashMismatch)
                    } else if let Some(problem) = self.check_signature(check.signature) {
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
                None => Some(Problem::MalformedHash),
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

    fn check_signature(&mut self, signature: SignatureState) -> Option<Problem> {
        let keys = self.checker.keys.is_some();
        match signature {
            SignatureState::Unsigned => {
                self.unsigned_entries += 1;
                (self.seen_signed || keys).then_some(Problem::MissingSignature)
            }
            SignatureState::NotChecked => {
                self.seen_signed = true;
                // Checked by a checker without keys although this verifier holds some.
                keys.then_some(Problem::BadSignature)
            }
            SignatureState::Checked(result) => {
                self.seen_signed = true;
                if !keys {
                    return None;
                }
                self.signatures_checked += 1;
                match result {
                    SignatureCheck::Valid => None,
                    SignatureCheck::Invalid => Some(Problem::BadSignature),
                    SignatureCheck::UnknownKey => Some(Problem::UnknownSignatureKey),
                }
            }
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
        put(out, *field);
    }
}

/// 64 hex digits (either case, as `hex::decode` accepts) to 32 bytes, through a table:
/// verification decodes two hashes per entry.
fn decode(hash: &str) -> Option<[u8; 32]> {
    const INVALID: u8 = 0xff;
    const TABLE: [u8; 256] = {
        let mut table = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            table[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            table[b'a' as usize + i] = 10 + i as u8;
            table[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        table
    };
    let digits: &[u8; 64] = hash.as_bytes().try_into().ok()?;
    let mut out = [0; 32];
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (TABLE[usize::from(pair[0])], TABLE[usize::from(pair[1])]);
        bad |= (hi | lo) & 0xf0;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    (bad == 0).then_some(out)
}

/// Links `entries` (already numbered from `head_sequence + 1`) after `head_hash`, each
/// signed with the active HMAC key of `keys` (unsigned when it has none).
pub fn append(
    head_hash: [u8; 32],
    entries: Vec<ChainEntry>,
    keys: &HmacKeyring,
) -> (Vec<StoredEntry>, [u8; 32]) {
    let mut previous = head_hash;
    let mut scratch = Vec::with_capacity(512);
    let stored = entries
        .into_iter()
        .map(|entry| {
            let current = entry.fields().link(&previous, &mut scratch);
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
    fn hash_decoding_matches_hex() {
        let hash = "8e5438b516d36e5496779928650853efa78b48b073b9fe12b5c4f5664ade6bf9";
        for text in [hash.to_owned(), hash.to_uppercase()] {
            let mut want = [0u8; 32];
            hex::decode_to_slice(&text, &mut want).unwrap();
            assert_eq!(decode(&text), Some(want));
        }
        for bad in [&hash[1..], "zz", &format!("{}g", &hash[1..])] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn decimal_matches_to_string() {
        for v in [
            0,
            1,
            9,
            10,
            1_700_000_000_000_000_001,
            -1,
            -10,
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(decimal(v, &mut [0; 20]), v.to_string());
        }
    }

    /// Checking entries apart (as the offline verifier does on several threads) and then
    /// in order finds the same first problem as pushing them one by one.
    #[test]
    fn checks_apart_then_in_order_agree_with_push() {
        let mut tampered = signed_chain(6);
        tampered[3].entry.path = "/x".into();
        let mut unsigned_late = signed_chain(6);
        unsigned_late[4].signature = None;
        for entries in [signed_chain(6), tampered, unsigned_late] {
            for keyed in [true, false] {
                let start = || {
                    if keyed {
                        Verifier::new().with_keys(keys())
                    } else {
                        Verifier::new()
                    }
                };
                let mut one_by_one = start();
                entries.iter().for_each(|e| one_by_one.push(e));
                let mut apart = start();
                let checker = apart.checker();
                let checks: Vec<EntryCheck> = entries
                    .iter()
                    .map(|e| checker.check_stored(e, &mut Vec::new()))
                    .collect();
                checks.iter().for_each(|c| apart.push_checked(c));
                assert_eq!(one_by_one.finish(Some(6)), apart.finish(Some(6)));
            }
        }
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
