//! A lighter stack for admin API tests: real PostgreSQL, Redis and the control plane
//! binary, no Envoy. Callers authenticate with the bootstrap token or with JWTs minted
//! for a role and tenant.

use crate::control_plane::{ControlPlane, ControlPlaneConfig};
use crate::postgres::Postgres;
use crate::redis::Redis;
use anyhow::Context as _;
use rcgen::{CertificateParams, DnType, KeyPair};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub struct ApiStack {
    pub dir: PathBuf,
    pub database_url: String,
    pub db: sqlx::PgPool,
    pub control_plane: ControlPlane,
    pub http: reqwest::Client,
    _postgres: Arc<Postgres>,
    _redis: Option<Arc<Redis>>,
}

/// An answer of the API.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub etag: Option<String>,
    pub body: Value,
}

/// One request: who, what, and optionally `If-Match`.
pub struct Call<'a> {
    pub token: &'a str,
    pub method: Method,
    pub path: &'a str,
    pub body: Option<Value>,
    pub if_match: Option<&'a str>,
}

// === impl ApiStack ===

impl ApiStack {
    /// With the process-wide Redis.
    pub async fn start() -> anyhow::Result<Self> {
        let redis = Redis::shared().await?;
        let url = redis.url();
        Self::start_with(url, Some(redis)).await
    }

    /// With the Redis at `redis_url` (e.g. one the test stops to see the API without it).
    pub async fn start_with_redis(redis_url: String) -> anyhow::Result<Self> {
        Self::start_with(redis_url, None).await
    }

    async fn start_with(redis_url: String, redis: Option<Arc<Redis>>) -> anyhow::Result<Self> {
        let dir = crate::postgres::tempdir("chronoguard-api")?;
        let postgres = Postgres::shared().await?;
        let database_url = postgres.fresh_database().await?;
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            database_url: database_url.clone(),
            redis_url,
            wasm: dir.join("chronoguard.wasm"),
            log: dir.join("control-plane.log"),
            audit_flush_interval_ms: 100,
        })
        .await
        .context("starting the control plane")?;
        crate::stack::register_fleet(&control_plane, crate::stack::FLEET)
            .await
            .context("registering the gateway fleet")?;
        let db = sqlx::PgPool::connect(&database_url).await?;
        Ok(Self {
            dir,
            database_url,
            db,
            control_plane,
            http: crate::client::plain_client()?,
            _postgres: postgres,
            _redis: redis,
        })
    }

    /// The bootstrap platform-admin token.
    pub fn bootstrap(&self) -> String {
        self.control_plane.admin_token.clone()
    }

    /// A JWT for `role` (`platform-admin`, `admin`, `auditor`) in `tenant`, valid 10 min.
    pub fn token(&self, role: &str, tenant: Option<&str>) -> String {
        crate::jwt::mint(&self.control_plane.jwt_secret(), role, tenant, 600)
    }

    pub async fn call(&self, call: Call<'_>) -> anyhow::Result<Answer> {
        let mut request = self
            .http
            .request(call.method, self.control_plane.url(call.path))
            .bearer_auth(call.token);
        if let Some(body) = call.body {
            request = request.json(&body);
        }
        if let Some(tag) = call.if_match {
            request = request.header(reqwest::header::IF_MATCH, tag);
        }
        answer(request.send().await?).await
    }

    /// Sends a raw body (any bytes, any content type) with `token`.
    pub async fn raw(
        &self,
        token: &str,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        if_match: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut request = self
            .http
            .request(method, self.control_plane.url(path))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        if let Some(tag) = if_match {
            request = request.header(reqwest::header::IF_MATCH, tag);
        }
        answer(request.send().await?).await
    }

    /// `method path` with `token` and an optional JSON body.
    pub async fn send(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Answer> {
        self.call(Call {
            token,
            method,
            path,
            body,
            if_match: None,
        })
        .await
    }

    /// Like [`ApiStack::send`], failing unless the answer is `want`.
    pub async fn expect(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        want: u16,
    ) -> anyhow::Result<Answer> {
        let answer = self.send(token, method.clone(), path, body).await?;
        anyhow::ensure!(
            answer.status.as_u16() == want,
            "{method} {path} → {} (wanted {want}): {}",
            answer.status,
            answer.body
        );
        Ok(answer)
    }

    pub async fn create_tenant(&self, name: &str) -> anyhow::Result<String> {
        let answer = self
            .expect(
                &self.bootstrap(),
                Method::POST,
                "/api/v1/tenants",
                Some(json!({"name": name})),
                201,
            )
            .await?;
        let tenant = crate::stack::str_field(&answer.body, "id")?;
        self.serve_tenant(&tenant).await?;
        Ok(tenant)
    }

    /// Adds `tenant` to the gateway fleet [`crate::stack::FLEET`] (registered at start),
    /// so its changes publish bundles as in a deployment.
    pub async fn serve_tenant(&self, tenant: &str) -> anyhow::Result<()> {
        let path = format!("/api/v1/gateways/{}", crate::stack::FLEET);
        let admin = self.bootstrap();
        let current = self.send(&admin, Method::GET, &path, None).await?;
        let mut tenants: Vec<String> = if current.status.is_success() {
            serde_json::from_value(current.body["tenant_ids"].clone())?
        } else {
            Vec::new()
        };
        tenants.push(tenant.to_owned());
        let answer = self
            .call(Call {
                token: &admin,
                method: Method::PUT,
                path: &path,
                body: Some(json!({ "tenant_ids": tenants })),
                if_match: current.etag.as_deref(),
            })
            .await?;
        anyhow::ensure!(
            answer.status.is_success(),
            "PUT {path} → {}: {}",
            answer.status,
            answer.body
        );
        Ok(())
    }
}

impl Drop for ApiStack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("api stack logs kept in {}", self.dir.display());
        } else {
            self.control_plane.stop();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn answer(response: reqwest::Response) -> anyhow::Result<Answer> {
    let status = response.status();
    let header = |name: reqwest::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(reqwest::header::CONTENT_TYPE).unwrap_or_default();
    let etag = header(reqwest::header::ETAG);
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer {
        status,
        content_type,
        etag,
        body,
    })
}

/// A self-signed client certificate (PEM) for `name`, valid from `not_before` to
/// `not_after` seconds relative to now.
pub fn certificate(name: &str, not_before: i64, not_after: i64) -> anyhow::Result<String> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    let at = |offset: i64| {
        let now = SystemTime::now();
        let delta = Duration::from_secs(offset.unsigned_abs());
        if offset < 0 { now - delta } else { now + delta }
    };
    params.not_before = at(not_before).into();
    params.not_after = at(not_after).into();
    let cert = params.self_signed(&KeyPair::generate()?)?;
    Ok(cert.pem())
}

/// A minimal WebSocket client for `/ws/v1/events` (text frames from the server, which
/// never masks them), enough to read the event stream without another dependency.
pub struct EventStream {
    stream: tokio::net::TcpStream,
}

// === impl EventStream ===

impl EventStream {
    /// Connects with `token`; `Err(status)` when the upgrade is refused.
    pub async fn connect(port: u16, token: &str) -> anyhow::Result<Result<Self, u16>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!(
            "GET /ws/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        // Read the response head byte by byte so no frame bytes are consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = stream.read_u8().await?;
            head.push(byte);
            anyhow::ensure!(head.len() < 16_384, "response head too long");
        }
        let head = String::from_utf8_lossy(&head);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in {head}"))?;
        Ok(if status == 101 {
            Ok(Self { stream })
        } else {
            Err(status)
        })
    }

    /// The next text frame as JSON, or `None` when nothing arrives within `wait`.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<Value>> {
        match tokio::time::timeout(wait, self.read_text()).await {
            Ok(text) => Ok(Some(serde_json::from_str(&text?)?)),
            Err(_) => Ok(None),
        }
    }

    async fn read_text(&mut self) -> anyhow::Result<String> {
        use tokio::io::AsyncReadExt;
        loop {
            let b0 = self.stream.read_u8().await?;
            let b1 = self.stream.read_u8().await?;
            anyhow::ensure!(b1 & 0x80 == 0, "the server masked a frame");
            let len = match b1 & 0x7f {
                126 => u64::from(self.stream.read_u16().await?),
                127 => self.stream.read_u64().await?,
                n => u64::from(n),
            };
            let mut payload = vec![0; usize::try_from(len)?];
            self.stream.read_exact(&mut payload).await?;
            match b0 & 0x0f {
                0x1 => return Ok(String::from_utf8(payload)?),
                0x8 => anyhow::bail!("the server closed the stream"),
                _ => continue,
            }
        }
    }
}
