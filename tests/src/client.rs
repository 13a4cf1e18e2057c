//! HTTP clients: an mTLS client for agents (through Envoy) and a plain admin client.

use crate::certs::AgentCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// A client that trusts `ca_pem` and presents `agent`'s certificate (or none). It speaks
/// HTTP/1.1: a connection per request in flight.
pub fn agent_client(ca_pem: &str, agent: Option<&AgentCert>) -> anyhow::Result<reqwest::Client> {
    agent_client_with(ca_pem, agent, false)
}

/// An HTTP/2 client of the gateway, presenting `agent`'s certificate: over HTTP/2 the
/// target domain travels in `:authority`, which clients take from the URL, so this client
/// is sent URLs naming the domain (`Envoy::domain_url`). It connects every name to the
/// gateway and checks the gateway's certificate for the gateway's own name (`localhost`),
/// as an agent configured with the gateway as its endpoint does. It offers HTTP/2 by ALPN
/// (the gateway accepts it): its requests share one connection.
pub fn agent_client_h2(ca_pem: &str, agent: Option<&AgentCert>) -> anyhow::Result<reqwest::Client> {
    agent_client_with(ca_pem, agent, true)
}

/// A request sender on one HTTP/2 connection to the gateway at `gateway` as `agent`: each
/// request names its domain in its URI's authority, so one connection serves every
/// domain, as with HTTP/2 clients that send a Host header as `:authority` (curl, Go,
/// httpx).
pub async fn agent_h2_connection(
    ca_pem: &str,
    agent: Option<&AgentCert>,
    gateway: std::net::SocketAddr,
) -> anyhow::Result<H2Sender> {
    let config = tls_config(ca_pem, agent, true)?;
    let tcp = tokio::net::TcpStream::connect(gateway).await?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    anyhow::ensure!(
        tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        "the gateway did not accept HTTP/2"
    );
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// The sending half of an HTTP/2 connection ([`agent_h2_connection`]); clone it per request.
pub type H2Sender =
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>;

fn agent_client_with(
    ca_pem: &str,
    agent: Option<&AgentCert>,
    http2: bool,
) -> anyhow::Result<reqwest::Client> {
    let mut client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(ca_pem, agent, http2)?)
        .timeout(std::time::Duration::from_secs(10));
    if http2 {
        client = client.dns_resolver(Arc::new(Gateway));
    }
    Ok(client.build()?)
}

/// TLS towards the gateway as `agent`; with `http2`, offering HTTP/2 by ALPN and checking
/// the gateway's certificate for its own name whatever name the connection asks for.
fn tls_config(
    ca_pem: &str,
    agent: Option<&AgentCert>,
    http2: bool,
) -> anyhow::Result<rustls::ClientConfig> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?;
    let builder = if http2 {
        let webpki = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots)).build()?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(GatewayName(webpki)))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut config = match agent {
        Some(agent) => {
            let chain = CertificateDer::pem_slice_iter(agent.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(agent.key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    if http2 {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(config)
}

/// Resolves every name to the gateway (the port comes from the URL).
struct Gateway;

impl reqwest::dns::Resolve for Gateway {
    fn resolve(&self, _: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let gateway = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        Box::pin(std::future::ready(Ok(
            Box::new(std::iter::once(gateway)) as reqwest::dns::Addrs
        )))
    }
}

/// The CA's verifier, checking the gateway's certificate for `localhost` whatever name
/// the URL (and so the TLS server name) carries.
#[derive(Debug)]
struct GatewayName(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for GatewayName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let gateway = rustls::pki_types::ServerName::try_from("localhost")
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.0
            .verify_server_cert(end_entity, intermediates, &gateway, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
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
