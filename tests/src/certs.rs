//! A throwaway PKI: a tenant CA, Envoy's server certificate and agent client certificates.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub ca_path: PathBuf,
    pub server_cert_path: PathBuf,
    pub server_key_path: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// An agent's client certificate.
#[derive(Clone)]
pub struct AgentCert {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Lower-case hex SHA-256 of the DER certificate.
    pub fingerprint: String,
}

// === impl Pki ===

impl Pki {
    pub fn new(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, "ChronoGuard demo tenant CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_pem = ca.pem();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, &ca_pem)?;

        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "chronoguard-gateway");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &ca)?;
        let server_cert_path = dir.join("server.pem");
        let server_key_path = dir.join("server-key.pem");
        std::fs::write(&server_cert_path, server_cert.pem())?;
        std::fs::write(&server_key_path, server_key.serialize_pem())?;
        Ok(Self {
            dir,
            ca_pem,
            ca_path,
            server_cert_path,
            server_key_path,
            ca,
        })
    }

    /// Issues a client certificate for an agent, valid from now for a day.
    pub fn agent(&self, name: &str) -> anyhow::Result<AgentCert> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ChronoGuard agents");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(60)).into();
        params.not_after = (now + std::time::Duration::from_secs(86_400)).into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let agent = AgentCert {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            fingerprint: hex::encode(Sha256::digest(cert.der())),
        };
        std::fs::write(self.dir.join(format!("{name}.pem")), &agent.cert_pem)?;
        std::fs::write(self.dir.join(format!("{name}-key.pem")), &agent.key_pem)?;
        Ok(agent)
    }
}
