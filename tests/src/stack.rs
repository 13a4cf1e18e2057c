//! The whole ChronoGuard stack for one test (or the demo).

use crate::certs::{AgentCert, Pki};
use crate::control_plane::{ControlPlane, ControlPlaneConfig};
use crate::envoy::{Envoy, EnvoyConfig};
use crate::postgres::Postgres;
use crate::redis::Redis;
use crate::upstream::Upstream;
use anyhow::Context as _;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;

/// The gateway fleet of the stack's Envoy; [`Stack::create_tenant`] adds every tenant
/// it creates to it.
pub const FLEET: &str = "egress";

pub struct StackOptions {
    /// Envoy worker threads.
    pub concurrency: u32,
    /// How long Envoy's listener waits for the first ECDS response.
    pub initial_fetch_timeout: &'static str,
    pub audit_flush_interval_ms: u64,
    /// The filter module; default [`crate::envoy::wasm`].
    pub wasm: Option<PathBuf>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            initial_fetch_timeout: "10s",
            audit_flush_interval_ms: 100,
            wasm: None,
        }
    }
}

pub struct Stack {
    pub dir: PathBuf,
    pub pki: Pki,
    pub database_url: String,
    pub db: sqlx::PgPool,
    pub upstream: Upstream,
    pub control_plane: ControlPlane,
    pub envoy: Envoy,
    pub http: reqwest::Client,
    wasm: PathBuf,
    envoy_concurrency: u32,
    envoy_fetch_timeout: &'static str,
    plain_envoy: bool,
    plain_twin: bool,
    envoy_wrapper: Vec<String>,
    envoy_request_ids: bool,
    envoy_peer_header: bool,
    audit_port: Option<u16>,
    _postgres: Arc<Postgres>,
    _redis: Arc<Redis>,
}

// === impl Stack ===

impl Stack {
    pub async fn start(options: StackOptions) -> anyhow::Result<Self> {
        let dir = crate::postgres::tempdir("chronoguard-stack")?;
        let (postgres, redis, upstream) =
            tokio::try_join!(Postgres::shared(), Redis::shared(), Upstream::start())?;
        let database_url = postgres.fresh_database().await?;
        let pki = Pki::new(dir.join("pki"))?;
        let wasm = options.wasm.clone().unwrap_or_else(crate::envoy::wasm);
        anyhow::ensure!(
            wasm.exists(),
            "{} not found: run `cargo xtask build-filter`",
            wasm.display()
        );
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            database_url: database_url.clone(),
            redis_url: redis.url(),
            wasm: wasm.clone(),
            log: dir.join("control-plane.log"),
            audit_flush_interval_ms: options.audit_flush_interval_ms,
        })
        .await
        .context("starting the control plane")?;
        register_fleet(&control_plane, FLEET)
            .await
            .context("registering the gateway fleet")?;
        let envoy = Envoy::start(EnvoyConfig {
            node_id: "gateway-1",
            fleet: FLEET,
            cp_grpc_port: control_plane.grpc_port,
            cp_http_port: control_plane.http_port,
            upstream_port: upstream.port,
            ca: &pki.ca_path,
            server_cert: &pki.server_cert_path,
            server_key: &pki.server_key_path,
            wasm: &wasm,
            initial_fetch_timeout: options.initial_fetch_timeout,
            concurrency: options.concurrency,
            dir: &dir,
            without_filter: false,
            plain_twin: false,
            request_ids: true,
            peer_header: true,
            wrapper: &[],
        })
        .await
        .context("starting envoy")?;
        let db = sqlx::PgPool::connect(&database_url).await?;
        Ok(Self {
            dir,
            pki,
            database_url,
            db,
            upstream,
            control_plane,
            envoy,
            http: crate::client::plain_client()?,
            wasm,
            envoy_concurrency: options.concurrency,
            envoy_fetch_timeout: options.initial_fetch_timeout,
            plain_envoy: false,
            plain_twin: false,
            envoy_wrapper: Vec::new(),
            envoy_request_ids: true,
            envoy_peer_header: true,
            audit_port: None,
            _postgres: postgres,
            _redis: redis,
        })
    }

    /// Stops Envoy and starts a new one with the same bootstrap (new ports), returning when
    /// its listener is warm, with the time from spawn to ready.
    pub async fn restart_envoy(&mut self) -> anyhow::Result<std::time::Duration> {
        self.envoy.stop();
        let started = std::time::Instant::now();
        let envoy = Envoy::start(EnvoyConfig {
            cp_http_port: self.audit_port.unwrap_or(self.control_plane.http_port),
            without_filter: self.plain_envoy,
            plain_twin: self.plain_twin,
            wrapper: &self.envoy_wrapper,
            request_ids: self.envoy_request_ids,
            peer_header: self.envoy_peer_header,
            ..self.envoy_config("gateway-1", FLEET)
        })
        .await?;
        self.envoy = envoy;
        Ok(started.elapsed())
    }

    /// The bootstrap of an Envoy wired like the stack's own: node `node_id` of fleet
    /// `fleet`, audit to the control plane, with the filter.
    fn envoy_config<'a>(&'a self, node_id: &'a str, fleet: &'a str) -> EnvoyConfig<'a> {
        EnvoyConfig {
            node_id,
            fleet,
            cp_grpc_port: self.control_plane.grpc_port,
            cp_http_port: self.control_plane.http_port,
            upstream_port: self.upstream.port,
            ca: &self.pki.ca_path,
            server_cert: &self.pki.server_cert_path,
            server_key: &self.pki.server_key_path,
            wasm: &self.wasm,
            initial_fetch_timeout: self.envoy_fetch_timeout,
            concurrency: self.envoy_concurrency,
            dir: &self.dir,
            without_filter: false,
            plain_twin: false,
            request_ids: true,
            peer_header: true,
            wrapper: &[],
        }
    }

    /// Where [`Stack::restart_envoy`] has the filter send its audit batches: this port on
    /// 127.0.0.1 instead of the control plane (`None`). The benchmark points it at the
    /// upstream (which acknowledges everything) so the control plane's and PostgreSQL's
    /// ingest work does not compete with the load generator on a 2-core machine; tests
    /// point it at sinks that answer what they need. Envoy's own audit work is unchanged.
    pub fn set_audit_port(&mut self, port: Option<u16>) {
        self.audit_port = port;
    }

    /// Whether [`Stack::restart_envoy`] starts Envoy without the ChronoGuard filter (the
    /// benchmark's baseline).
    pub fn set_plain_envoy(&mut self, plain: bool) {
        self.plain_envoy = plain;
    }

    /// Whether [`Stack::restart_envoy`] adds a twin of the gateway listener without the
    /// filter ([`crate::envoy::EnvoyConfig::plain_twin`]; benchmark only).
    pub fn set_plain_twin(&mut self, twin: bool) {
        self.plain_twin = twin;
    }

    /// The command [`Stack::restart_envoy`] runs Envoy under
    /// ([`crate::envoy::EnvoyConfig::wrapper`]; benchmark only).
    pub fn set_envoy_wrapper(&mut self, wrapper: Vec<String>) {
        self.envoy_wrapper = wrapper;
    }

    /// Whether [`Stack::restart_envoy`]'s Envoy writes request ids
    /// ([`crate::envoy::EnvoyConfig::request_ids`]).
    pub fn set_envoy_request_ids(&mut self, request_ids: bool) {
        self.envoy_request_ids = request_ids;
    }

    /// Whether [`Stack::restart_envoy`]'s listener writes the peer header
    /// ([`crate::envoy::EnvoyConfig::peer_header`]).
    pub fn set_envoy_peer_header(&mut self, peer_header: bool) {
        self.envoy_peer_header = peer_header;
    }

    /// Sends an admin request; fails unless the status is 2xx. Returns the JSON body.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, body) = self.admin_raw(method.clone(), path, body).await?;
        anyhow::ensure!(status.is_success(), "{method} {path} → {status}: {body}");
        Ok(body)
    }

    /// Sends an admin request and returns status and JSON body whatever they are. PUT and
    /// PATCH go with `If-Match` set to the resource's current `ETag` (read just before), as
    /// an admin's read-modify-write would; the admin API tests exercise stale versions.
    pub async fn admin_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let if_match = if method == reqwest::Method::PUT || method == reqwest::Method::PATCH {
            self.current_etag(path).await?
        } else {
            None
        };
        let mut request = self
            .http
            .request(method, self.control_plane.url(path))
            .bearer_auth(&self.control_plane.admin_token);
        if let Some(tag) = if_match {
            request = request.header(reqwest::header::IF_MATCH, tag);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// The `ETag` a GET of `path` answers with, if any.
    async fn current_etag(&self, path: &str) -> anyhow::Result<Option<String>> {
        let response = self
            .http
            .get(self.control_plane.url(path))
            .bearer_auth(&self.control_plane.admin_token)
            .send()
            .await?;
        Ok(response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned))
    }

    /// A JWT for `role` (`platform-admin`, `admin`, `auditor`) in `tenant`, valid 10 min.
    pub fn token(&self, role: &str, tenant: Option<&str>) -> String {
        crate::jwt::mint(&self.control_plane.jwt_secret(), role, tenant, 600)
    }

    /// Creates a tenant served by the stack's fleet ([`FLEET`]).
    pub async fn create_tenant(&self, name: &str) -> anyhow::Result<String> {
        let tenant = self.create_unserved_tenant(name).await?;
        self.serve_tenant(FLEET, &tenant).await?;
        Ok(tenant)
    }

    /// Creates a tenant no gateway fleet serves (yet).
    pub async fn create_unserved_tenant(&self, name: &str) -> anyhow::Result<String> {
        let tenant = self
            .admin(
                reqwest::Method::POST,
                "/api/v1/tenants",
                Some(json!({"name": name})),
            )
            .await?;
        str_field(&tenant, "id")
    }

    /// Sets the tenants gateway fleet `fleet` serves (creating the fleet if needed).
    pub async fn set_fleet(&self, fleet: &str, tenants: &[&str]) -> anyhow::Result<Value> {
        self.admin(
            reqwest::Method::PUT,
            &format!("/api/v1/gateways/{fleet}"),
            Some(json!({ "tenant_ids": tenants })),
        )
        .await
    }

    /// Adds `tenant` to the tenants `fleet` serves.
    pub async fn serve_tenant(&self, fleet: &str, tenant: &str) -> anyhow::Result<()> {
        let (status, current) = self
            .admin_raw(
                reqwest::Method::GET,
                &format!("/api/v1/gateways/{fleet}"),
                None,
            )
            .await?;
        let mut tenants: Vec<String> = if status.is_success() {
            serde_json::from_value(current["tenant_ids"].clone())?
        } else {
            Vec::new()
        };
        tenants.push(tenant.to_owned());
        let tenants: Vec<&str> = tenants.iter().map(String::as_str).collect();
        self.set_fleet(fleet, &tenants).await?;
        Ok(())
    }

    /// Starts another Envoy, node `node_id` of gateway fleet `fleet`, wired like the
    /// stack's own.
    pub async fn start_envoy(&self, node_id: &str, fleet: &str) -> anyhow::Result<Envoy> {
        Envoy::start(self.envoy_config(node_id, fleet)).await
    }

    /// Waits until every Envoy acknowledged the version the control plane publishes now
    /// for its fleet (a 2xx write means "published", not yet "applied by Envoy").
    pub async fn wait_envoy_synced(&self) -> anyhow::Result<()> {
        crate::wait_for(
            "envoy on the published bundle",
            std::time::Duration::from_secs(15),
            || async {
                let envoys = self
                    .admin(reqwest::Method::GET, "/api/v1/envoys", None)
                    .await
                    .ok()?;
                let envoys = envoys.as_array()?;
                (!envoys.is_empty()
                    && envoys.iter().all(|e| {
                        e["expected_version"].is_string()
                            && e["acked_version"] == e["expected_version"]
                    }))
                .then_some(())
            },
        )
        .await
    }

    /// Registers an agent with a fresh certificate, activates it, and waits until Envoy
    /// enforces the resulting bundle.
    pub async fn create_active_agent(
        &self,
        tenant: &str,
        name: &str,
        policy_ids: &[&str],
    ) -> anyhow::Result<(String, AgentCert)> {
        let cert = self.pki.agent(name)?;
        let agent = self
            .admin(
                reqwest::Method::POST,
                "/api/v1/agents",
                Some(json!({"tenant_id": tenant, "name": name, "certificate_pem": cert.cert_pem})),
            )
            .await?;
        let id = str_field(&agent, "id")?;
        self.admin(
            reqwest::Method::PATCH,
            &format!("/api/v1/agents/{id}"),
            Some(json!({"status": "active", "policy_ids": policy_ids})),
        )
        .await?;
        self.wait_envoy_synced().await?;
        Ok((id, cert))
    }

    pub async fn create_policy(
        &self,
        tenant: &str,
        name: &str,
        allowed: &[&str],
        blocked: &[&str],
    ) -> anyhow::Result<String> {
        let policy = self
            .admin(
                reqwest::Method::POST,
                "/api/v1/policies",
                Some(json!({
                    "tenant_id": tenant, "name": name, "priority": 100,
                    "allowed_domains": allowed, "blocked_domains": blocked
                })),
            )
            .await?;
        str_field(&policy, "id")
    }

    /// The usual test setup: tenant `acme`, policy `web` (priority 100) with these
    /// domain lists, an active agent `bot` on it (Envoy already enforcing), and its client.
    pub async fn tenant_with_agent(
        &self,
        allowed: &[&str],
        blocked: &[&str],
    ) -> anyhow::Result<Setup> {
        let tenant = self.create_tenant("acme").await?;
        let policy = self.create_policy(&tenant, "web", allowed, blocked).await?;
        let (agent_id, cert) = self.create_active_agent(&tenant, "bot", &[&policy]).await?;
        let client = self.agent_client(Some(&cert))?;
        Ok(Setup {
            tenant,
            policy,
            agent_id,
            cert,
            client,
        })
    }

    /// A client presenting `agent`'s certificate (or none) to Envoy.
    /// Waits until every one of `ids` is an audit entry of `tenant` in PostgreSQL; returns
    /// all of the tenant's entry ids.
    pub async fn audit_entries_with(
        &self,
        tenant: &str,
        ids: &[String],
        within: std::time::Duration,
    ) -> anyhow::Result<Vec<String>> {
        crate::wait_for("audit entries", within, || async {
            let stored: Vec<String> = sqlx::query_scalar(
                "SELECT entry_id::text FROM audit_entries WHERE tenant_id = $1::uuid",
            )
            .bind(tenant)
            .fetch_all(&self.db)
            .await
            .ok()?;
            ids.iter().all(|id| stored.contains(id)).then_some(stored)
        })
        .await
    }

    pub fn agent_client(&self, agent: Option<&AgentCert>) -> anyhow::Result<reqwest::Client> {
        crate::client::agent_client(&self.pki.ca_pem, agent)
    }

    /// One HTTP/2 connection to the gateway as `agent` (`crate::client::agent_h2_connection`).
    pub async fn agent_h2_connection(
        &self,
        agent: Option<&AgentCert>,
    ) -> anyhow::Result<crate::client::H2Sender> {
        let gateway = std::net::SocketAddr::from(([127, 0, 0, 1], self.envoy.listen_port));
        crate::client::agent_h2_connection(&self.pki.ca_pem, agent, gateway).await
    }

    /// `size` HTTP/1.1 connections as `agent` to the gateway listener, or with `twin` to
    /// its twin without the filter (`crate::client::H1Pool`).
    pub async fn agent_pool(
        &self,
        agent: Option<&AgentCert>,
        twin: bool,
        size: usize,
    ) -> anyhow::Result<crate::client::H1Pool> {
        let port = if twin {
            self.envoy
                .twin_port
                .ok_or_else(|| anyhow::anyhow!("Envoy has no twin listener"))?
        } else {
            self.envoy.listen_port
        };
        let listener = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        crate::client::H1Pool::open(&self.pki.ca_pem, agent, listener, size).await
    }

    /// `GET https://<domain><path>` through the gateway with `client`.
    pub async fn request(
        &self,
        client: &reqwest::Client,
        domain: &str,
        path: &str,
    ) -> anyhow::Result<Reply> {
        let response = client
            .get(self.envoy.url(path))
            .header(reqwest::header::HOST, domain)
            .send()
            .await?;
        let status = response.status().as_u16();
        // One decision id per response: the filter's local replies carry their own, the
        // route copies the request's onto proxied responses (`envoy-config/`).
        anyhow::ensure!(
            response
                .headers()
                .get_all("x-chronoguard-decision-id")
                .iter()
                .count()
                <= 1,
            "more than one x-chronoguard-decision-id header"
        );
        let decision_id = response
            .headers()
            .get("x-chronoguard-decision-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply {
            status,
            decision_id,
            body,
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Keep the logs of a failed test for inspection (and of any run with
        // CHRONOGUARD_KEEP_STACK set); clean up after a passing one.
        if std::thread::panicking() {
            eprintln!("stack logs kept in {}", self.dir.display());
            return;
        }
        self.envoy.stop();
        self.control_plane.stop();
        if std::env::var_os("CHRONOGUARD_KEEP_STACK").is_some() {
            eprintln!("stack logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What [`Stack::tenant_with_agent`] created.
pub struct Setup {
    pub tenant: String,
    pub policy: String,
    pub agent_id: String,
    pub cert: AgentCert,
    pub client: reqwest::Client,
}

/// What the gateway answered.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub decision_id: Option<String>,
    pub body: Value,
}

/// Registers gateway fleet `name` (serving no tenant yet) before any Envoy connects.
pub(crate) async fn register_fleet(control_plane: &ControlPlane, name: &str) -> anyhow::Result<()> {
    let response = crate::client::plain_client()?
        .put(control_plane.url(&format!("/api/v1/gateways/{name}")))
        .bearer_auth(&control_plane.admin_token)
        .json(&json!({"tenant_ids": []}))
        .send()
        .await?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "PUT /api/v1/gateways/{name} → {status}: {}",
        response.text().await?
    );
    Ok(())
}

pub fn str_field(value: &Value, key: &str) -> anyhow::Result<String> {
    value[key]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no string {key} in {value}"))
}
