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
    let tls = tls_connect(Arc::new(tls_config(ca_pem, agent, true)?), gateway).await?;
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

/// A TLS connection to the gateway at `gateway`, which presents the name `localhost`.
async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    gateway: std::net::SocketAddr,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(gateway).await?;
    tcp.set_nodelay(true)?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?)
}

/// A fixed set of HTTP/1.1 connections to one gateway listener as one agent, all opened
/// (mTLS handshakes done) before use. A request waits, first come first served, for an
/// idle connection, as with clients whose pools are bounded: however requests queue, no
/// connection is opened while a load runs. A connection that fails leaves the pool.
pub struct H1Pool {
    idle: std::sync::Mutex<Vec<H1Sender>>,
    free: tokio::sync::Semaphore,
}

type H1Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<hyper::body::Bytes>>;

impl H1Pool {
    /// `size` connections to `gateway` as `agent`.
    pub async fn open(
        ca_pem: &str,
        agent: Option<&AgentCert>,
        gateway: std::net::SocketAddr,
        size: usize,
    ) -> anyhow::Result<Self> {
        let config = Arc::new(tls_config(ca_pem, agent, false)?);
        let mut idle = Vec::with_capacity(size);
        for _ in 0..size {
            let tls = tls_connect(config.clone(), gateway).await?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(connection);
            idle.push(sender);
        }
        Ok(Self {
            idle: std::sync::Mutex::new(idle),
            free: tokio::sync::Semaphore::new(size),
        })
    }

    /// `GET <path>` with `Host: <domain>` on every connection at once: a TLS 1.3 server
    /// finishes its handshake after the client has, so this leaves none of that work to
    /// fall into a load.
    pub async fn warm(&self, domain: &str, path: &str) -> anyhow::Result<()> {
        let size = self.free.available_permits();
        for response in futures::future::join_all((0..size).map(|_| self.get(domain, path))).await {
            response?;
        }
        Ok(())
    }

    /// `GET <path>` with `Host: <domain>` on the next idle connection; the response with
    /// its whole body.
    pub async fn get(
        &self,
        domain: &str,
        path: &str,
    ) -> anyhow::Result<hyper::Response<hyper::body::Bytes>> {
        use http_body_util::BodyExt;
        let permit = self.free.acquire().await?;
        let idle = || self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut sender = idle()
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no idle connection behind a permit"))?;
        let response = async {
            sender.ready().await?;
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, domain)
                .body(http_body_util::Empty::new())?;
            let (head, body) = sender.send_request(request).await?.into_parts();
            anyhow::Ok(hyper::Response::from_parts(
                head,
                body.collect().await?.to_bytes(),
            ))
        }
        .await;
        match response {
            Ok(_) => idle().push(sender),
            Err(_) => permit.forget(),
        }
        response
    }
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
