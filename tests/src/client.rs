//! HTTP clients: an mTLS client for agents (through Envoy) and a plain admin client.

use crate::certs::AgentCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// A client that trusts `ca_pem` and presents `agent`'s certificate (or none). It speaks
/// HTTP/1.1: a connection per request in flight.
pub fn agent_client(ca_pem: &str, agent: Option<&AgentCert>) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(ca_pem, agent, false)?)
        .timeout(std::time::Duration::from_secs(10))
        .build()?)
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

/// `GET https://<domain><path>` on `sender`'s connection, the domain in `:authority`; the
/// response with its whole body.
pub async fn h2_get(
    sender: &H2Sender,
    domain: &str,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Bytes>> {
    use http_body_util::BodyExt;
    let request =
        hyper::Request::get(format!("https://{domain}{path}")).body(http_body_util::Empty::new())?;
    let mut sender = sender.clone();
    sender.ready().await?;
    let (head, body) = sender.send_request(request).await?.into_parts();
    Ok(hyper::Response::from_parts(
        head,
        body.collect().await?.to_bytes(),
    ))
}

/// TLS towards the gateway as `agent`; with `http2`, offering HTTP/2 by ALPN.
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
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
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
