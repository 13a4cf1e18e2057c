//! Domain types and the rules that make them valid: statuses, domain patterns, agent
//! certificates.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The id of the gateway chain: decisions about requests that no tenant owns (no or
/// unknown certificate) are chained under it.
pub const GATEWAY_TENANT: uuid::Uuid = uuid::Uuid::nil();

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Pending,
    Active,
    Suspended,
    Deactivated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyStatus {
    Draft,
    Active,
    Archived,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    #[default]
    Enforce,
    DryRun,
}

macro_rules! str_enum {
    ($ty:ty { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(Self::$variant),)* _ => None }
            }
        }
    };
}

str_enum!(AgentStatus { Pending => "pending", Active => "active", Suspended => "suspended", Deactivated => "deactivated" });
str_enum!(PolicyStatus { Draft => "draft", Active => "active", Archived => "archived" });
str_enum!(PolicyMode { Enforce => "enforce", DryRun => "dry_run" });

// === impl AgentStatus ===

impl AgentStatus {
    /// `pending → active ⇄ suspended → deactivated`; deactivated is terminal.
    pub fn can_become(self, next: AgentStatus) -> bool {
        use AgentStatus::*;
        matches!(
            (self, next),
            (Pending, Active)
                | (Pending, Deactivated)
                | (Active, Suspended)
                | (Active, Deactivated)
                | (Suspended, Active)
                | (Suspended, Deactivated)
        )
    }
}

/// Normalises and checks a domain pattern: `example.com` or `*.example.com`, ASCII only
/// (IDNs in punycode), lower-cased, trailing dot removed.
pub fn domain_pattern(raw: &str) -> Result<String, String> {
    let lowered = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let host = lowered.strip_prefix("*.").unwrap_or(&lowered);
    if host.is_empty() {
        return Err(format!("{raw:?} is empty"));
    }
    if !lowered.is_ascii() {
        return Err(format!(
            "{raw:?} is not ASCII; write IDNs in punycode (xn--)"
        ));
    }
    if host.len() > 253 {
        return Err(format!("{raw:?} is longer than 253 characters"));
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(format!(
                "{raw:?} is not a domain name or a *.suffix wildcard"
            ));
        }
    }
    Ok(lowered)
}

/// What the control plane keeps of an agent's client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCertificate {
    /// Lower-case hex SHA-256 of the DER encoding: what Envoy reports as
    /// `connection.sha256_peer_certificate_digest`.
    pub fingerprint: String,
    pub subject: String,
    pub sans: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub pem: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("certificate_pem is not a PEM-encoded X.509 certificate: {0}")]
    Malformed(String),
    #[error("certificate expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("certificate is not valid before {0}")]
    NotYetValid(DateTime<Utc>),
}

// === impl AgentCertificate ===

impl AgentCertificate {
    pub fn parse(pem: &str, now: DateTime<Utc>) -> Result<Self, CertificateError> {
        let (_, pem_block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| CertificateError::Malformed(e.to_string()))?;
        if pem_block.label != "CERTIFICATE" {
            return Err(CertificateError::Malformed(format!(
                "PEM block is {:?}, not CERTIFICATE",
                pem_block.label
            )));
        }
        let cert = pem_block
            .parse_x509()
            .map_err(|e| CertificateError::Malformed(e.to_string()))?;
        let validity = cert.validity();
        let to_utc = |t: x509_parser::time::ASN1Time| {
            DateTime::<Utc>::from_timestamp(t.timestamp(), 0).unwrap_or_default()
        };
        let not_before = to_utc(validity.not_before);
        let not_after = to_utc(validity.not_after);
        if now < not_before {
            return Err(CertificateError::NotYetValid(not_before));
        }
        if now > not_after {
            return Err(CertificateError::Expired(not_after));
        }
        let sans = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .map(|name| name.to_string())
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            fingerprint: hex::encode(Sha256::digest(&pem_block.contents)),
            subject: cert.subject().to_string(),
            sans,
            not_before,
            not_after,
            pem: pem.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_patterns() {
        assert_eq!(domain_pattern("Example.COM.").unwrap(), "example.com");
        assert_eq!(domain_pattern("*.example.com").unwrap(), "*.example.com");
        assert_eq!(
            domain_pattern("xn--bcher-kva.example").unwrap(),
            "xn--bcher-kva.example"
        );
        for bad in [
            "",
            "*.",
            "a..b",
            "*.*.x",
            "bü.example",
            "-a.com",
            "a b.com",
            "http://x.com",
        ] {
            assert!(domain_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lifecycle() {
        use AgentStatus::*;
        assert!(Pending.can_become(Active));
        assert!(Active.can_become(Suspended));
        assert!(Suspended.can_become(Active));
        assert!(!Deactivated.can_become(Active));
        assert!(!Pending.can_become(Suspended));
        assert!(!Active.can_become(Pending));
    }

    #[test]
    fn malformed_certificate() {
        let err = AgentCertificate::parse("nope", Utc::now()).unwrap_err();
        assert!(matches!(err, CertificateError::Malformed(_)));
    }
}
