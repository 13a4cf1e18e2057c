//! Ed25519-signed checkpoints of a tenant's chain head.
//!
//! A checkpoint says "tenant T's chain had `sequence_number` entries and its last hash was
//! `head_hash` at `created_at_ns`", signed by the control plane's checkpoint key. Auditors
//! keep the checkpoints (and the public key) outside our database; a truncated tail or a
//! whole chain rewritten with recomputed hashes no longer matches them.
//!
//! Signed message: the ASCII bytes `chronoguard.audit.checkpoint.v1\n`, then the five
//! fields tenant id, sequence number, head hash (hex), creation time (ns) and key id, each
//! in the field encoding of `canonical_bytes` (see `docs/audit-chain.md`).

use super::chain;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use std::collections::BTreeMap;
use std::fmt;
use uuid::Uuid;

/// Domain separation prefix of the signed message.
pub const CHECKPOINT_CONTEXT: &[u8] = b"chronoguard.audit.checkpoint.v1\n";

/// A signed chain head, as stored, served and exported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub tenant_id: Uuid,
    pub sequence_number: i64,
    /// The `current_hash` of entry `sequence_number`, 64 lower-case hex digits.
    pub head_hash: String,
    pub created_at_ns: i64,
    pub key_id: String,
    /// Ed25519 signature over [`Checkpoint::signed_bytes`], 128 lower-case hex digits.
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the checkpoint signing key must be 64 hex digits (a 32-byte Ed25519 seed)")]
    Seed,
    #[error("the checkpoint key id must not be empty when a signing key is set")]
    KeyId,
    #[error("trusted checkpoint key entry {0:?} is not `key_id:hex_public_key`")]
    Format(String),
    #[error("trusted checkpoint key {0:?} is not a valid Ed25519 public key")]
    PublicKey(String),
}

/// Why a checkpoint was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointCheck {
    Valid,
    /// The signature does not verify (the checkpoint or its signature was changed).
    BadSignature,
    /// No trusted public key has this key id.
    UnknownKey,
}

/// The control plane's checkpoint signing key; the seed never appears in `Debug`.
pub struct CheckpointSigner {
    key_id: String,
    key: SigningKey,
}

/// The public keys checkpoints are verified with, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
}

/// One published public key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublicKey {
    pub key_id: String,
    pub algorithm: String,
    /// The 32-byte Ed25519 public key, 64 lower-case hex digits.
    pub public_key: String,
}

// === impl Checkpoint ===

impl Checkpoint {
    /// The exact bytes the Ed25519 signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        signed_bytes(
            self.tenant_id,
            self.sequence_number,
            &self.head_hash,
            self.created_at_ns,
            &self.key_id,
        )
    }

    /// The pinned head hash, if well formed.
    pub fn head(&self) -> Option<[u8; 32]> {
        chain::parse_hash(&self.head_hash)
    }
}

fn signed_bytes(tenant: Uuid, sequence: i64, head: &str, at_ns: i64, key_id: &str) -> Vec<u8> {
    let mut out = CHECKPOINT_CONTEXT.to_vec();
    let tenant = tenant.hyphenated().to_string();
    let sequence = sequence.to_string();
    let at = at_ns.to_string();
    chain::encode_fields(
        &mut out,
        &[
            Some(&tenant),
            Some(&sequence),
            Some(head),
            Some(&at),
            Some(key_id),
        ],
    );
    out
}

// === impl CheckpointSigner ===

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("key_id", &self.key_id)
            .field(
                "public_key",
                &hex::encode(self.key.verifying_key().as_bytes()),
            )
            .finish()
    }
}

impl CheckpointSigner {
    /// From a hex 32-byte seed; `Ok(None)` when no seed is configured.
    pub fn from_settings(seed_hex: &str, key_id: &str) -> Result<Option<Self>, KeyError> {
        let seed_hex = seed_hex.trim();
        if seed_hex.is_empty() {
            return Ok(None);
        }
        let mut seed = [0u8; 32];
        hex::decode_to_slice(seed_hex, &mut seed).map_err(|_| KeyError::Seed)?;
        let key_id = key_id.trim();
        if key_id.is_empty() {
            return Err(KeyError::KeyId);
        }
        Ok(Some(Self {
            key_id: key_id.to_owned(),
            key: SigningKey::from_bytes(&seed),
        }))
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key_id: self.key_id.clone(),
            algorithm: "ed25519".into(),
            public_key: hex::encode(self.key.verifying_key().as_bytes()),
        }
    }

    /// Signs a chain head.
    pub fn sign(&self, tenant: Uuid, sequence: i64, head: &[u8; 32], at_ns: i64) -> Checkpoint {
        let head_hash = hex::encode(head);
        let message = signed_bytes(tenant, sequence, &head_hash, at_ns, &self.key_id);
        Checkpoint {
            tenant_id: tenant,
            sequence_number: sequence,
            head_hash,
            created_at_ns: at_ns,
            key_id: self.key_id.clone(),
            signature: hex::encode(self.key.sign(&message).to_bytes()),
        }
    }
}

// === impl TrustedKeys ===

impl TrustedKeys {
    /// The signer's own key plus `id:hex,id:hex` earlier (rotated-out) public keys.
    pub fn from_settings(signer: Option<&CheckpointSigner>, spec: &str) -> Result<Self, KeyError> {
        let mut trusted = Self::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, key) = item
                .split_once(':')
                .ok_or_else(|| KeyError::Format(item.to_owned()))?;
            trusted.insert(PublicKey {
                key_id: id.trim().to_owned(),
                algorithm: "ed25519".into(),
                public_key: key.trim().to_owned(),
            })?;
        }
        if let Some(signer) = signer {
            trusted
                .keys
                .insert(signer.key_id.clone(), signer.key.verifying_key());
        }
        Ok(trusted)
    }

    /// Adds a published key.
    pub fn insert(&mut self, key: PublicKey) -> Result<(), KeyError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&key.public_key, &mut bytes)
            .map_err(|_| KeyError::PublicKey(key.key_id.clone()))?;
        let verifying = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::PublicKey(key.key_id.clone()))?;
        self.keys.insert(key.key_id, verifying);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every trusted key, for publication.
    pub fn public_keys(&self) -> Vec<PublicKey> {
        self.keys
            .iter()
            .map(|(id, key)| PublicKey {
                key_id: id.clone(),
                algorithm: "ed25519".into(),
                public_key: hex::encode(key.as_bytes()),
            })
            .collect()
    }

    /// Verifies a checkpoint's signature (strict Ed25519 verification).
    pub fn check(&self, checkpoint: &Checkpoint) -> CheckpointCheck {
        let Some(key) = self.keys.get(&checkpoint.key_id) else {
            return CheckpointCheck::UnknownKey;
        };
        let mut signature = [0u8; 64];
        if hex::decode_to_slice(&checkpoint.signature, &mut signature).is_err() {
            return CheckpointCheck::BadSignature;
        }
        let signature = ed25519_dalek::Signature::from_bytes(&signature);
        match key.verify(&checkpoint.signed_bytes(), &signature) {
            Ok(()) if checkpoint.head().is_some() => CheckpointCheck::Valid,
            _ => CheckpointCheck::BadSignature,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(seed: u8, id: &str) -> CheckpointSigner {
        CheckpointSigner::from_settings(&hex::encode([seed; 32]), id)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn sign_and_verify_and_detect_changes() {
        let signer = signer(1, "cp1");
        let trusted = TrustedKeys::from_settings(Some(&signer), "").unwrap();
        let cp = signer.sign(Uuid::from_u128(1), 5, &[9; 32], 1_700_000_000_000_000_000);
        assert_eq!(trusted.check(&cp), CheckpointCheck::Valid);
        for tamper in [
            |c: &mut Checkpoint| c.sequence_number = 4,
            |c: &mut Checkpoint| c.head_hash = hex::encode([8u8; 32]),
            |c: &mut Checkpoint| c.tenant_id = Uuid::from_u128(2),
            |c: &mut Checkpoint| c.created_at_ns += 1,
            |c: &mut Checkpoint| c.signature = "00".repeat(64),
        ] {
            let mut changed = cp.clone();
            tamper(&mut changed);
            assert_eq!(trusted.check(&changed), CheckpointCheck::BadSignature);
        }
        let mut other = cp.clone();
        other.key_id = "cp9".into();
        assert_eq!(trusted.check(&other), CheckpointCheck::UnknownKey);
    }

    #[test]
    fn rotated_keys_stay_trusted() {
        let old = signer(1, "cp1");
        let new = signer(2, "cp2");
        let published = old.public_key();
        let spec = format!("{}:{}", published.key_id, published.public_key);
        let trusted = TrustedKeys::from_settings(Some(&new), &spec).unwrap();
        let old_cp = old.sign(Uuid::nil(), 1, &[1; 32], 1);
        let new_cp = new.sign(Uuid::nil(), 2, &[2; 32], 2);
        assert_eq!(trusted.check(&old_cp), CheckpointCheck::Valid);
        assert_eq!(trusted.check(&new_cp), CheckpointCheck::Valid);
        assert_eq!(trusted.public_keys().len(), 2);
    }

    #[test]
    fn settings_are_validated_and_seed_stays_hidden() {
        assert!(CheckpointSigner::from_settings("", "").unwrap().is_none());
        assert_eq!(
            CheckpointSigner::from_settings("abcd", "k").unwrap_err(),
            KeyError::Seed
        );
        assert_eq!(
            CheckpointSigner::from_settings(&"11".repeat(32), " ").unwrap_err(),
            KeyError::KeyId
        );
        let s = signer(0x42, "cp1");
        assert!(!format!("{s:?}").contains(&"42".repeat(32)));
        assert!(TrustedKeys::from_settings(None, "x:zz").is_err());
    }

    #[test]
    fn signed_bytes_layout() {
        let signer = signer(1, "k");
        let cp = signer.sign(Uuid::nil(), 1, &[0; 32], 7);
        let bytes = cp.signed_bytes();
        assert!(bytes.starts_with(CHECKPOINT_CONTEXT));
        let rest = &bytes[CHECKPOINT_CONTEXT.len()..];
        assert_eq!(&rest[..5], &[1, 0, 0, 0, 36]);
        assert!(rest.ends_with(&[1, 0, 0, 0, 1, b'k']));
    }
}
