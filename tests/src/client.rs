//! HTTP clients: an mTLS client for agents (through Envoy) and a plain admin client.

use crate::certs::AgentCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// A client that trusts `ca_pem` and presents `agent`'s certificate (or none).
pub fn agent_client(ca_pem: &str, agent: Option<&AgentCert>) -> anyhow::Result<reqwest::Client> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match agent {
        Some(agent) => {
            let chain = CertificateDer::pem_slice_iter(agent.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(agent.key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(std::time::Duration::from_secs(10))
        .build()?)
}

/// A client for the control plane's REST API.
pub fn plain_client() -> anyhow::Result<reqwest::Client> {
    install_crypto_provider();
    Ok(reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?)
}

/// reqwest is built without a default provider: use ring, process-wide, once.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
