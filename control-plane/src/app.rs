//! Application state and the two servers (REST on `http.addr`, ECDS gRPC on `grpc.addr`).

use crate::bundle::Publisher;
use crate::config::Settings;
use crate::storage::Store;
use crate::xds::{EcdsServer, EnvoyRegistry};
use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryServiceServer;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub publisher: Arc<Publisher>,
    pub registry: EnvoyRegistry,
    /// Audit HMAC keys and the checkpoint signer, checked at startup.
    pub audit: Arc<crate::audit::AuditKeys>,
}

/// Runs until SIGINT/SIGTERM.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let audit = Arc::new(
        crate::audit::AuditKeys::from_settings(&settings.audit).context("audit settings")?,
    );
    if audit.checkpoint_signer.is_none() {
        tracing::warn!("audit.checkpoint_signing_key is not set: no signed checkpoints are taken");
    }
    let store = Store::connect(&settings)
        .await
        .context("connecting to the database")?;
    let publisher = Arc::new(Publisher::new(
        store.pool.clone(),
        settings.gateway.clone(),
        settings.auth.ingest_token.clone(),
    ));
    // The bundle is rebuilt from the database at start: same content, same version.
    publisher
        .rebuild()
        .await
        .context("building the initial policy bundle")?;
    tokio::spawn(crate::bundle::refresh_periodically(publisher.clone()));
    let registry = EnvoyRegistry::default();
    let state = AppState {
        settings: Arc::new(settings.clone()),
        store,
        publisher: publisher.clone(),
        registry: registry.clone(),
        audit: audit.clone(),
    };
    if settings.audit.checkpoint_interval_secs > 0 {
        tokio::spawn(crate::audit::checkpointer::run(
            state.store.pool.clone(),
            audit,
            Duration::from_secs(settings.audit.checkpoint_interval_secs),
        ));
    }
    // Storage maintenance: once now (start-up), then periodically.
    tokio::spawn(crate::audit::retention::run(
        state.store.pool.clone(),
        state.audit.clone(),
        crate::audit::retention::Policy::from_settings(&settings.audit),
        (settings.audit.maintenance_interval_secs > 0)
            .then(|| Duration::from_secs(settings.audit.maintenance_interval_secs)),
    ));

    let http = tokio::net::TcpListener::bind(settings.http.addr)
        .await
        .with_context(|| format!("binding {}", settings.http.addr))?;
    let grpc = tokio::net::TcpListener::bind(settings.grpc.addr)
        .await
        .with_context(|| format!("binding {}", settings.grpc.addr))?;
    tracing::info!(http = %http.local_addr()?, grpc = %grpc.local_addr()?, "control plane listening");

    // TCP_NODELAY on both servers: neither axum nor tonic (with our own listener) sets it,
    // and Nagle's algorithm against the peer's delayed ACK holds back the tail of a
    // multi-segment response by ~40 ms (a 430 KB ECDS push, an ingest answer).
    let http = http.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(error = %err, "could not set TCP_NODELAY on a REST connection");
        }
    });
    let rest =
        axum::serve(http, crate::api::router(state)).with_graceful_shutdown(shutdown_signal());
    let ecds = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(ExtensionConfigDiscoveryServiceServer::new(EcdsServer::new(
            publisher, registry,
        )))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            shutdown_signal(),
        );
    let (rest, ecds) = tokio::join!(rest, ecds);
    rest.context("rest server")?;
    ecds.context("ecds server")?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return ctrl_c.await.unwrap_or_default(),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or_default();
}
