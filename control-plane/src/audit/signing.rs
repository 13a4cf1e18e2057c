//! HMAC-SHA256 entry signatures with key ids, so keys can rotate.
//!
//! `signature = HMAC-SHA256(secret[key_id], "chronoguard.audit.entry.v1\n" ‖ current_hash)`
//! over the 32 raw bytes of the entry's `current_hash` (which commits to the entry's
//! canonical bytes and, through `previous_hash`, to the whole chain before it). The control
//! plane signs with one active key; verification accepts every configured key id.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::fmt;

/// Domain separation prefix of the signed message.
pub const ENTRY_SIGNATURE_CONTEXT: &[u8] = b"chronoguard.audit.entry.v1\n";

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// A stored signature: which key, and the MAC as 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntrySignature {
    pub key_id: String,
    pub mac: String,
}

/// Outcome of checking one entry's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureCheck {
    Valid,
    /// The MAC does not match (the entry or its signature was changed).
    Invalid,
    /// The key id is not configured here.
    UnknownKey,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("hmac key entry {0:?} is not `key_id:hex_secret`")]
    Format(String),
    #[error("hmac key {0:?}: the secret is not hex")]
    Hex(String),
    #[error(
        "hmac key {key_id:?}: the secret has {len} bytes, at least {MIN_SECRET_BYTES} are required"
    )]
    Short { key_id: String, len: usize },
    #[error("hmac key id {0:?} is configured twice")]
    Duplicate(String),
    #[error("the active hmac key {0:?} is not among the configured keys")]
    UnknownActive(String),
    #[error("hmac keys are configured but no active key id is set")]
    NoActive,
}

/// The configured HMAC keys; secrets never appear in `Debug` output.
#[derive(Clone)]
pub struct HmacKeyring {
    /// Per key id, the HMAC state already keyed with its secret: cloned per MAC, so the
    /// key pads are not recomputed for every entry.
    keys: BTreeMap<String, Hmac<Sha256>>,
    active: Option<String>,
}

// === impl HmacKeyring ===

impl fmt::Debug for HmacKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacKeyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

impl HmacKeyring {
    /// Parses `id:hex,id:hex` (whitespace around entries ignored); an empty spec means no
    /// keys (entries are stored unsigned). With keys, `active` must name one of them.
    pub fn parse(spec: &str, active: &str) -> Result<Self, KeyringError> {
        let mut keys = BTreeMap::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, secret) = item
                .split_once(':')
                .filter(|(id, s)| !id.trim().is_empty() && !s.trim().is_empty())
                .ok_or_else(|| KeyringError::Format(redact(item)))?;
            let id = id.trim().to_owned();
            let secret = hex::decode(secret.trim()).map_err(|_| KeyringError::Hex(id.clone()))?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(KeyringError::Short {
                    key_id: id,
                    len: secret.len(),
                });
            }
            let keyed = <Hmac<Sha256> as Mac>::new_from_slice(&secret).map_err(|_| {
                KeyringError::Short {
                    key_id: id.clone(),
                    len: secret.len(),
                }
            })?;
            if keys.insert(id.clone(), keyed).is_some() {
                return Err(KeyringError::Duplicate(id));
            }
        }
        let active = active.trim();
        let active = match (keys.is_empty(), active.is_empty()) {
            (true, _) => None,
            (false, true) => return Err(KeyringError::NoActive),
            (false, false) if keys.contains_key(active) => Some(active.to_owned()),
            (false, false) => return Err(KeyringError::UnknownActive(active.to_owned())),
        };
        Ok(Self { keys, active })
    }

    /// A keyring that signs nothing and knows no keys.
    pub fn empty() -> Self {
        Self {
            keys: BTreeMap::new(),
            active: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn active_key_id(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// Signs an entry's current hash with the active key (`None` without keys).
    pub fn sign(&self, current_hash: &[u8; 32]) -> Option<EntrySignature> {
        let (key_id, mac) = self.sign_raw(current_hash)?;
        Some(EntrySignature {
            key_id: key_id.to_owned(),
            mac: hex::encode(mac),
        })
    }

    /// Like [`HmacKeyring::sign`], without allocating: the active key id and the raw MAC.
    pub fn sign_raw(&self, current_hash: &[u8; 32]) -> Option<(&str, [u8; 32])> {
        let key_id = self.active.as_deref()?;
        let keyed = self.keys.get(key_id)?;
        Some((
            key_id,
            mac(keyed, current_hash).finalize().into_bytes().into(),
        ))
    }

    /// Checks a signature in constant time.
    pub fn check(&self, current_hash: &[u8; 32], signature: &EntrySignature) -> SignatureCheck {
        self.check_hex(current_hash, &signature.key_id, &signature.mac)
    }

    /// Checks a signature given as key id and hex MAC, in constant time, without allocating.
    pub fn check_hex(
        &self,
        current_hash: &[u8; 32],
        key_id: &str,
        mac_hex: &str,
    ) -> SignatureCheck {
        let Some(keyed) = self.keys.get(key_id) else {
            return SignatureCheck::UnknownKey;
        };
        let mut presented = [0u8; 32];
        if hex::decode_to_slice(mac_hex, &mut presented).is_err() {
            return SignatureCheck::Invalid;
        }
        match mac(keyed, current_hash).verify_slice(&presented) {
            Ok(()) => SignatureCheck::Valid,
            Err(_) => SignatureCheck::Invalid,
        }
    }
}

/// The entry MAC: a clone of the keyed state fed the context and the hash.
fn mac(keyed: &Hmac<Sha256>, current_hash: &[u8; 32]) -> Hmac<Sha256> {
    let mut mac = keyed.clone();
    mac.update(ENTRY_SIGNATURE_CONTEXT);
    mac.update(current_hash);
    mac
}

/// Only the key id part of a malformed entry may reach an error message.
fn redact(item: &str) -> String {
    match item.split_once(':') {
        Some((id, _)) => format!("{id}:…"),
        None => "…".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const K2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn signs_with_active_and_verifies_any_configured_key() {
        let old = HmacKeyring::parse(&format!("k1:{K1}"), "k1").unwrap();
        let rotated = HmacKeyring::parse(&format!("k1:{K1}, k2:{K2}"), "k2").unwrap();
        let hash = [7u8; 32];
        let by_old = old.sign(&hash).unwrap();
        let by_new = rotated.sign(&hash).unwrap();
        assert_eq!(by_new.key_id, "k2");
        assert_eq!(rotated.check(&hash, &by_old), SignatureCheck::Valid);
        assert_eq!(rotated.check(&hash, &by_new), SignatureCheck::Valid);
        assert_eq!(old.check(&hash, &by_new), SignatureCheck::UnknownKey);
        assert_eq!(rotated.check(&[8u8; 32], &by_new), SignatureCheck::Invalid);
        let forged = EntrySignature {
            key_id: "k2".into(),
            mac: by_old.mac.clone(),
        };
        assert_eq!(rotated.check(&hash, &forged), SignatureCheck::Invalid);
    }

    /// A fixed vector for auditors' implementations (see docs/audit-chain.md).
    #[test]
    fn fixed_vector() {
        let ring = HmacKeyring::parse(&format!("k1:{K1}"), "k1").unwrap();
        let sig = ring.sign(&[0u8; 32]).unwrap();
        let mut reference = <Hmac<Sha256> as Mac>::new_from_slice(&[0x11; 32]).unwrap();
        reference.update(b"chronoguard.audit.entry.v1\n");
        reference.update(&[0u8; 32]);
        assert_eq!(sig.mac, hex::encode(reference.finalize().into_bytes()));
        // The vector published in docs/audit-chain.md.
        assert_eq!(
            sig.mac,
            "2219dcced97375a0c20af284414a78dee2514e391c0c773a1a6c8315be46802d"
        );
        assert_eq!(sig.mac.len(), 64);
    }

    #[test]
    fn bad_configuration_fails_without_leaking_secrets() {
        assert!(HmacKeyring::parse("", "").unwrap().is_empty());
        assert!(HmacKeyring::parse("", "").unwrap().sign(&[0; 32]).is_none());
        let err = HmacKeyring::parse("k1-deadbeef", "k1").unwrap_err();
        assert!(!err.to_string().contains("deadbeef"), "{err}");
        assert_eq!(
            HmacKeyring::parse("k1:abcd", "k1").unwrap_err(),
            KeyringError::Short {
                key_id: "k1".into(),
                len: 2
            }
        );
        assert_eq!(
            HmacKeyring::parse(&format!("k1:{K1}"), "k9").unwrap_err(),
            KeyringError::UnknownActive("k9".into())
        );
        assert_eq!(
            HmacKeyring::parse(&format!("k1:{K1}"), "").unwrap_err(),
            KeyringError::NoActive
        );
        assert_eq!(
            HmacKeyring::parse(&format!("k1:{K1},k1:{K2}"), "k1").unwrap_err(),
            KeyringError::Duplicate("k1".into())
        );
        assert!(matches!(
            HmacKeyring::parse("k1:zz", "k1").unwrap_err(),
            KeyringError::Hex(_)
        ));
        assert!(
            !format!(
                "{:?}",
                HmacKeyring::parse(&format!("k1:{K1}"), "k1").unwrap()
            )
            .contains(K1)
        );
    }
}
