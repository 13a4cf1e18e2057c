//! An independent implementation of the audit chain link from `docs/audit-chain.md`, for
//! tests that check stored rows without trusting the control plane's code.

use sha2::{Digest, Sha256};

/// `SHA-256(canonical_bytes ‖ previous)` for the 17 canonical fields in order (`None` for
/// null).
pub fn link(fields: [Option<&str>; 17], previous: &[u8; 32]) -> [u8; 32] {
    let mut bytes = vec![1u8];
    for field in fields {
        match field {
            None => bytes.push(0),
            Some(text) => {
                bytes.push(1);
                bytes.extend_from_slice(&(text.len() as u32).to_be_bytes());
                bytes.extend_from_slice(text.as_bytes());
            }
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(&bytes);
    hasher.update(previous);
    hasher.finalize().into()
}
