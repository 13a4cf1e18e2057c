//! The tamper-evident audit log: the pure hash chain ([`chain`]), entry HMACs
//! ([`signing`]), Ed25519 checkpoints ([`checkpoint`]), the export record format
//! ([`export`]), ingest validation ([`ingest`]), the periodic checkpoint task
//! ([`checkpointer`]) and storage maintenance with retention ([`retention`]). Persistence
//! lives in `storage::audit`.

pub mod admin;
pub mod chain;
pub mod checkpoint;
pub mod checkpointer;
pub mod export;
pub mod ingest;
pub mod retention;
pub mod signing;

use checkpoint::{CheckpointSigner, TrustedKeys};
use signing::HmacKeyring;

/// The audit keys, built once from the settings at startup.
#[derive(Debug)]
pub struct AuditKeys {
    pub hmac: HmacKeyring,
    pub checkpoint_signer: Option<CheckpointSigner>,
    pub trusted: TrustedKeys,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditKeysError {
    #[error("audit.hmac_keys: {0}")]
    Hmac(#[from] signing::KeyringError),
    #[error("audit checkpoint key: {0}")]
    Checkpoint(#[from] checkpoint::KeyError),
}

// === impl AuditKeys ===

impl AuditKeys {
    pub fn from_settings(settings: &crate::config::Audit) -> Result<Self, AuditKeysError> {
        let hmac = HmacKeyring::parse(settings.hmac_keys.expose(), &settings.hmac_active_key)?;
        let checkpoint_signer = CheckpointSigner::from_settings(
            settings.checkpoint_signing_key.expose(),
            &settings.checkpoint_key_id,
        )?;
        let trusted = TrustedKeys::from_settings(
            checkpoint_signer.as_ref(),
            &settings.checkpoint_trusted_keys,
        )?;
        Ok(Self {
            hmac,
            checkpoint_signer,
            trusted,
        })
    }
}
