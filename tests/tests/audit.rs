//! The auditor's side against real PostgreSQL and the real control plane binary: entry
//! HMACs, signed checkpoints, tampering caught by the verify API and by the offline
//! verifier CLI, two replicas ingesting into one database, idempotency, 401/400/422, 503
//! with Retry-After while the database is unreachable, entries listing and exports.
//!
//! Envoy is not needed here: batches are posted the way the filter posts them.

use integration_tests::control_plane::{AuditKeys, ControlPlane, ControlPlaneConfig};
use integration_tests::postgres::Postgres;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// One fresh database and a control plane on it.
struct Fixture {
    dir: PathBuf,
    database_url: String,
    db: sqlx::PgPool,
    cp: ControlPlane,
    http: reqwest::Client,
    _postgres: Arc<Postgres>,
}

impl Fixture {
    async fn start(keys: AuditKeys) -> Self {
        let postgres = Postgres::shared().await.unwrap();
        let database_url = postgres.fresh_database().await.unwrap();
        Self::start_on(postgres, database_url.clone(), database_url, keys).await
    }

    /// The control plane reaches the database through `cp_database_url` (e.g. a proxy);
    /// the test inspects it directly through `database_url`.
    async fn start_on(
        postgres: Arc<Postgres>,
        database_url: String,
        cp_database_url: String,
        keys: AuditKeys,
    ) -> Self {
        let dir = integration_tests::postgres::tempdir("chronoguard-audit").unwrap();
        let config = ControlPlaneConfig {
            database_url: cp_database_url,
            redis_url: String::new(),
            wasm: integration_tests::envoy::wasm(),
            log: dir.join("control-plane.log"),
            audit_flush_interval_ms: 100,
        };
        let cp = ControlPlane::start_with_keys(config, keys).await.unwrap();
        let db = sqlx::PgPool::connect(&database_url).await.unwrap();
        Self {
            dir,
            database_url,
            db,
            cp,
            http: integration_tests::client::plain_client().unwrap(),
            _postgres: postgres,
        }
    }

    /// Another control plane on the same database with the same audit keys.
    async fn replica(&self, keys: AuditKeys, name: &str) -> ControlPlane {
        ControlPlane::start_with_keys(
            ControlPlaneConfig {
                database_url: self.database_url.clone(),
                redis_url: String::new(),
                wasm: integration_tests::envoy::wasm(),
                log: self.dir.join(format!("{name}.log")),
                audit_flush_interval_ms: 100,
            },
            keys,
        )
        .await
        .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("control plane logs kept in {}", self.dir.display());
        } else {
            self.cp.stop();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn call(
    http: &reqwest::Client,
    cp: &ControlPlane,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut request = http.request(method, cp.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

async fn admin(
    f: &Fixture,
    cp: &ControlPlane,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let (status, _, text) = call(&f.http, cp, method, path, Some(&cp.admin_token), body).await;
    (status, parse(&text))
}

async fn post_batch(f: &Fixture, cp: &ControlPlane, batch: &Value) -> (StatusCode, Value) {
    let (status, _, text) = post_raw(f, cp, Some(batch)).await;
    (status, parse(&text))
}

/// POSTs to the ingest endpoint with the filter credential (no body: no content type).
async fn post_raw(
    f: &Fixture,
    cp: &ControlPlane,
    batch: Option<&Value>,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    call(
        &f.http,
        cp,
        Method::POST,
        "/api/v1/audit/batches",
        Some(&cp.ingest_token),
        batch,
    )
    .await
}

/// A batch of `n` decisions for `tenant`, varied so filters have something to select.
fn batch(tenant: Uuid, n: usize, agents: &[Uuid]) -> Value {
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "decision_id": Uuid::new_v4().to_string(),
                "timestamp_ns": 1_764_000_000_000_000_000u64 + i as u64 * 1_000_000,
                "tenant_id": tenant.to_string(),
                "agent_id": agents.get(i % agents.len().max(1)).map(|a| a.to_string()),
                "agent_fingerprint": "ab".repeat(32),
                "agent_subject": "CN=crawler, O=\"Acme, Inc\"",
                "domain": format!("d{}.example", i % 3),
                "method": "GET",
                "path": "/",
                "user_agent": "bot/1.0",
                "source_ip": "127.0.0.1",
                "decision": if i % 2 == 0 { "allow" } else { "deny" },
                "reason": if i % 2 == 0 { "domain_allowed" } else { "domain_blocked" },
                "policy_id": if i % 4 == 0 { Some("p-1") } else { None },
                "config_version": "7",
            })
        })
        .collect();
    json!({"batch_id": Uuid::new_v4().to_string(), "entries": entries})
}

/// Claims a batch id as a control plane that stored it would have.
async fn claim(db: &sqlx::PgPool, batch_id: Uuid) {
    sqlx::query("INSERT INTO audit_batches (batch_id, entry_count) VALUES ($1, 1)")
        .bind(batch_id)
        .execute(db)
        .await
        .unwrap();
}

/// A batch of `n` decisions whose j-th entry belongs to `tenants[(j + shift) % len]`.
fn spanning(tenants: &[Uuid], n: usize, shift: usize) -> Value {
    let mut body = batch(tenants[0], n, &[]);
    for (j, entry) in body["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        entry["tenant_id"] = json!(tenants[(j + shift) % tenants.len()].to_string());
    }
    body
}

async fn ingest(f: &Fixture, tenant: Uuid, batches: usize, per_batch: usize) {
    for _ in 0..batches {
        let (status, body) = post_batch(f, &f.cp, &batch(tenant, per_batch, &[])).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

async fn verify(f: &Fixture, cp: &ControlPlane, tenant: Uuid) -> Value {
    let (status, body) = admin(
        f,
        cp,
        Method::GET,
        &format!("/api/v1/audit/verify?tenant_id={tenant}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn problem(outcome: &Value) -> (Option<i64>, Option<&str>) {
    (
        outcome["first_bad_sequence"].as_i64(),
        outcome["problem"].as_str(),
    )
}

async fn export(f: &Fixture, tenant: Uuid, format: &str) -> String {
    let (status, headers, text) = call(
        &f.http,
        &f.cp,
        Method::GET,
        &format!("/api/v1/audit/export?tenant_id={tenant}&format={format}"),
        Some(&f.cp.admin_token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let expected = if format == "csv" {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    assert_eq!(headers[reqwest::header::CONTENT_TYPE], expected);
    text
}

async fn checkpoint(f: &Fixture, tenant: Uuid) -> Value {
    let (status, body) = admin(
        f,
        &f.cp,
        Method::POST,
        "/api/v1/audit/checkpoints",
        Some(&json!({"tenant_id": tenant})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

/// Runs the offline verifier; returns its exit code and its JSON report.
async fn offline_verify(
    dir: &Path,
    export: &str,
    checkpoints: Option<&Value>,
    public_keys: &Value,
    hmac_keys: Option<&str>,
) -> (i32, Value) {
    let name = Uuid::new_v4().simple().to_string();
    let export_path = dir.join(format!("{name}.jsonl"));
    std::fs::write(&export_path, export).unwrap();
    let keys_path = dir.join(format!("{name}-keys.json"));
    std::fs::write(&keys_path, public_keys.to_string()).unwrap();
    let binary = integration_tests::target_dir().join("debug/chronoguard-audit-verify");
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.arg("--export")
        .arg(&export_path)
        .arg("--public-keys")
        .arg(&keys_path);
    if let Some(checkpoints) = checkpoints {
        let path = dir.join(format!("{name}-checkpoints.json"));
        std::fs::write(&path, checkpoints.to_string()).unwrap();
        cmd.arg("--checkpoints").arg(path);
    }
    cmd.env_remove("CHRONOGUARD_AUDIT_HMAC_KEYS");
    if let Some(keys) = hmac_keys {
        cmd.env("CHRONOGUARD_AUDIT_HMAC_KEYS", keys);
    }
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = parse(stdout.trim());
    (out.status.code().unwrap_or(-1), report)
}

/// The chain as stored, re-encoded here from docs/audit-chain.md (independently of the
/// control plane's code).
#[derive(sqlx::FromRow, Clone)]
struct Row {
    tenant_id: Uuid,
    sequence_number: i64,
    entry_id: Uuid,
    timestamp_ns: i64,
    kind: String,
    agent_id: Option<Uuid>,
    agent_fingerprint: String,
    agent_subject: String,
    domain: String,
    method: String,
    path: String,
    user_agent: String,
    source_ip: String,
    decision: String,
    reason: String,
    policy_id: Option<String>,
    config_version: String,
    current_hash: String,
}

fn link(row: &Row, previous: &[u8; 32]) -> [u8; 32] {
    let (tenant, seq, entry, ts) = (
        row.tenant_id.to_string(),
        row.sequence_number.to_string(),
        row.entry_id.to_string(),
        row.timestamp_ns.to_string(),
    );
    let agent = row.agent_id.map(|a| a.to_string());
    integration_tests::chain::link(
        [
            Some(&tenant),
            Some(&seq),
            Some(&entry),
            Some(&ts),
            Some(&row.kind),
            agent.as_deref(),
            Some(&row.agent_fingerprint),
            Some(&row.agent_subject),
            Some(&row.domain),
            Some(&row.method),
            Some(&row.path),
            Some(&row.user_agent),
            Some(&row.source_ip),
            Some(&row.decision),
            Some(&row.reason),
            row.policy_id.as_deref(),
            Some(&row.config_version),
        ],
        previous,
    )
}

async fn rows(db: &sqlx::PgPool, tenant: Uuid) -> Vec<Row> {
    sqlx::query_as(
        "SELECT tenant_id, sequence_number, entry_id, timestamp_ns, kind, agent_id,
                agent_fingerprint, agent_subject, domain, method, path, user_agent, source_ip,
                decision, reason, policy_id, config_version, current_hash
         FROM audit_entries WHERE tenant_id = $1 ORDER BY sequence_number",
    )
    .bind(tenant)
    .fetch_all(db)
    .await
    .unwrap()
}

async fn sql(db: &sqlx::PgPool, statement: &str, tenant: Uuid) {
    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
        .bind(tenant)
        .execute(db)
        .await
        .unwrap();
}

/// What an auditor keeps from an intact chain: its checkpoints and the public keys.
struct Kept {
    checkpoints: Value,
    public_keys: Value,
}

/// A fresh tenant with 20 signed entries, a checkpoint at 20, verified intact by the API
/// and the CLI (which also checks the HMACs with the keys handed to it).
async fn intact_tenant(f: &Fixture) -> (Uuid, Kept) {
    let tenant = Uuid::new_v4();
    ingest(f, tenant, 2, 10).await;
    let cp = checkpoint(f, tenant).await;
    assert_eq!(cp["sequence_number"], 20);
    let ok = verify(f, &f.cp, tenant).await;
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(
        (
            ok["signatures_checked"].as_u64(),
            ok["checkpoints_matched"].as_u64()
        ),
        (Some(20), Some(1))
    );
    let (_, checkpoints) = admin(
        f,
        &f.cp,
        Method::GET,
        &format!("/api/v1/audit/checkpoints?tenant_id={tenant}"),
        None,
    )
    .await;
    let (status, public_keys) =
        admin(f, &f.cp, Method::GET, "/api/v1/audit/public-key", None).await;
    assert_eq!(status, StatusCode::OK, "{public_keys}");
    let (code, report) = offline_verify(
        &f.dir,
        &export(f, tenant, "jsonl").await,
        Some(&checkpoints),
        &public_keys,
        Some(&f.cp.audit_keys.hmac_keys),
    )
    .await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["outcome"]["signatures_checked"], 20);
    assert_eq!(report["outcome"]["checkpoints_matched"], 1);
    (
        tenant,
        Kept {
            checkpoints,
            public_keys,
        },
    )
}

/// Each way of tampering, caught by the verify API and the offline CLI at the right place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_caught_by_the_api_and_the_offline_verifier() {
    let f = Fixture::start(AuditKeys::generate()).await;
    let hmac = f.cp.audit_keys.hmac_keys.clone();
    let t = "tenant_id = $1";

    // (statement, first bad sequence, problem): ordinary row tampering.
    let cases = [
        ("change a byte", format!("UPDATE audit_entries SET domain = 'd1.examplf' WHERE {t} AND sequence_number = 7"), 7, "hash_mismatch"),
        ("delete a row", format!("DELETE FROM audit_entries WHERE {t} AND sequence_number = 7"), 7, "sequence_gap"),
        (
            "insert a row",
            format!(
                "UPDATE audit_entries SET sequence_number = sequence_number + 1000 WHERE {t} AND sequence_number >= 7;
                 UPDATE audit_entries SET sequence_number = sequence_number - 999 WHERE {t} AND sequence_number >= 1000;
                 INSERT INTO audit_entries SELECT tenant_id, 7, gen_random_uuid(), timestamp_ns, ts, kind, agent_id,
                    agent_fingerprint, agent_subject, 'inserted.example', method, path, user_agent, source_ip,
                    decision, reason, policy_id, config_version, current_hash, current_hash, signature_key_id, signature
                 FROM audit_entries WHERE {t} AND sequence_number = 6"
            ),
            7,
            "hash_mismatch",
        ),
        (
            "swap two",
            format!(
                "UPDATE audit_entries SET sequence_number = -sequence_number WHERE {t} AND sequence_number IN (7, 8);
                 UPDATE audit_entries SET sequence_number = CASE sequence_number WHEN -7 THEN 8 ELSE 7 END
                 WHERE {t} AND sequence_number IN (-7, -8)"
            ),
            7,
            "previous_hash_mismatch",
        ),
    ];
    for (what, statement, bad, expected) in cases {
        let (tenant, kept) = intact_tenant(&f).await;
        for part in statement.split(';') {
            sql(&f.db, part, tenant).await;
        }
        let api = verify(&f, &f.cp, tenant).await;
        assert_eq!(problem(&api), (Some(bad), Some(expected)), "{what}: {api}");
        let (code, report) = offline_verify(
            &f.dir,
            &export(&f, tenant, "jsonl").await,
            Some(&kept.checkpoints),
            &kept.public_keys,
            Some(&hmac),
        )
        .await;
        assert_eq!(code, 1, "{what}: {report}");
        assert_eq!(
            problem(&report["outcome"]),
            (Some(bad), Some(expected)),
            "{what}: {report}"
        );
    }

    // Truncate the tail and move the head row back: the chain itself is consistent; only
    // the checkpoint at 20 shows what is missing.
    let (tenant, kept) = intact_tenant(&f).await;
    let hash15 = rows(&f.db, tenant).await[14].current_hash.clone();
    sql(
        &f.db,
        "DELETE FROM audit_entries WHERE tenant_id = $1 AND sequence_number > 15",
        tenant,
    )
    .await;
    sqlx::query(
        "UPDATE audit_chain_heads SET sequence_number = 15, current_hash = $2 WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(&hash15)
    .execute(&f.db)
    .await
    .unwrap();
    let api = verify(&f, &f.cp, tenant).await;
    assert_eq!(problem(&api), (Some(16), Some("truncated")), "{api}");
    let truncated_export = export(&f, tenant, "jsonl").await;
    let (code, report) = offline_verify(
        &f.dir,
        &truncated_export,
        Some(&kept.checkpoints),
        &kept.public_keys,
        None,
    )
    .await;
    assert_eq!(
        (code, problem(&report["outcome"])),
        (1, (Some(16), Some("truncated"))),
        "{report}"
    );
    // The export lost its checkpoint with the tail: without the auditor's own copy the
    // truncation is invisible. That is why checkpoints are kept outside the database.
    let (code, report) = offline_verify(
        &f.dir,
        &truncated_export,
        None,
        &kept.public_keys,
        Some(&hmac),
    )
    .await;
    assert_eq!(code, 0, "{report}");

    // Rewrite the whole chain from entry 5 with recomputed hashes, drop every signature
    // (the attacker cannot forge them, and a partly signed chain would show), move the
    // head, and delete the checkpoints in the database.
    let (tenant, kept) = intact_tenant(&f).await;
    let mut chain = rows(&f.db, tenant).await;
    let mut previous = [0u8; 32];
    for row in &mut chain {
        if row.sequence_number == 5 {
            row.domain = "rewritten.example".into();
        }
        let current = link(row, &previous);
        if row.sequence_number >= 5 {
            assert_ne!(hex::encode(current), row.current_hash);
            sqlx::query(
                "UPDATE audit_entries SET domain = $3, previous_hash = $4, current_hash = $5,
                    signature_key_id = NULL, signature = NULL
                 WHERE tenant_id = $1 AND sequence_number = $2",
            )
            .bind(tenant)
            .bind(row.sequence_number)
            .bind(&row.domain)
            .bind(hex::encode(previous))
            .bind(hex::encode(current))
            .execute(&f.db)
            .await
            .unwrap();
        } else {
            assert_eq!(
                hex::encode(current),
                row.current_hash,
                "independent re-implementation"
            );
        }
        previous = current;
    }
    sqlx::query("UPDATE audit_chain_heads SET current_hash = $2 WHERE tenant_id = $1")
        .bind(tenant)
        .bind(hex::encode(previous))
        .execute(&f.db)
        .await
        .unwrap();
    sql(
        &f.db,
        "DELETE FROM audit_checkpoints WHERE tenant_id = $1",
        tenant,
    )
    .await;
    sql(
        &f.db,
        "UPDATE audit_entries SET signature_key_id = NULL, signature = NULL WHERE tenant_id = $1",
        tenant,
    )
    .await;
    let rewritten = export(&f, tenant, "jsonl").await;
    // The hash chain alone cannot see it...
    let (code, report) = offline_verify(
        &f.dir,
        &rewritten,
        Some(&json!([])),
        &kept.public_keys,
        None,
    )
    .await;
    assert_eq!(code, 0, "{report}");
    // ...the auditor's checkpoint does.
    let (code, report) = offline_verify(
        &f.dir,
        &rewritten,
        Some(&kept.checkpoints),
        &kept.public_keys,
        None,
    )
    .await;
    assert_eq!(
        (code, problem(&report["outcome"])),
        (1, (Some(20), Some("checkpoint_mismatch"))),
        "{report}"
    );
    // The control plane holds the HMAC keys: unsigned entries give it away as well.
    let api = verify(&f, &f.cp, tenant).await;
    assert_eq!(problem(&api), (Some(1), Some("missing_signature")), "{api}");

    // A forged checkpoint (head hash changed) does not verify.
    let mut forged = kept.checkpoints.clone();
    forged["checkpoints"][0]["head_hash"] = json!(hex::encode(previous));
    let (code, report) =
        offline_verify(&f.dir, &rewritten, Some(&forged), &kept.public_keys, None).await;
    assert_eq!(
        (code, problem(&report["outcome"])),
        (1, (Some(20), Some("bad_checkpoint_signature"))),
        "{report}"
    );
    // Retention: entries up to the checkpoint at 20 are dropped; verification resumes
    // from that checkpoint, in the API and offline, and still catches a change after it.
    let (tenant, _) = intact_tenant(&f).await;
    ingest(&f, tenant, 1, 10).await;
    sql(
        &f.db,
        "DELETE FROM audit_entries WHERE tenant_id = $1 AND sequence_number <= 20",
        tenant,
    )
    .await;
    let whole = verify(&f, &f.cp, tenant).await;
    assert_eq!(problem(&whole), (Some(1), Some("sequence_gap")), "{whole}");
    let path = format!("/api/v1/audit/verify?tenant_id={tenant}&from_sequence=21");
    let (status, resumed) = admin(&f, &f.cp, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(
        (resumed["ok"].as_bool(), resumed["entries_checked"].as_u64()),
        (Some(true), Some(10)),
        "{resumed}"
    );
    let path = format!("/api/v1/audit/verify?tenant_id={tenant}&from_sequence=15");
    let (status, body) = admin(&f, &f.cp, Method::GET, &path, None).await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no checkpoint at 14: {body}"
    );
    let (_, checkpoints) = admin(
        &f,
        &f.cp,
        Method::GET,
        &format!("/api/v1/audit/checkpoints?tenant_id={tenant}"),
        None,
    )
    .await;
    let (_, public_keys) = admin(&f, &f.cp, Method::GET, "/api/v1/audit/public-key", None).await;
    let retained = export(&f, tenant, "jsonl").await;
    let (code, report) = offline_verify(
        &f.dir,
        &retained,
        Some(&checkpoints),
        &public_keys,
        Some(&hmac),
    )
    .await;
    assert_eq!(
        (code, report["anchored_at_checkpoint"].as_i64()),
        (0, Some(20)),
        "{report}"
    );
    sql(
        &f.db,
        "UPDATE audit_entries SET path = '/x' WHERE tenant_id = $1 AND sequence_number = 25",
        tenant,
    )
    .await;
    let (_, tampered) = admin(
        &f,
        &f.cp,
        Method::GET,
        &format!("/api/v1/audit/verify?tenant_id={tenant}&from_sequence=21"),
        None,
    )
    .await;
    assert_eq!(
        problem(&tampered),
        (Some(25), Some("hash_mismatch")),
        "{tampered}"
    );
}

/// Two control planes on one database, ingesting in parallel into the same tenants: every
/// chain stays gapless and verifies; a batch retried against both is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_fork_or_gap() {
    let f = Fixture::start(AuditKeys::generate()).await;
    let b = f.replica(f.cp.audit_keys.clone(), "replica-b").await;
    let tenants = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    let (workers, batches, per_batch) = (8usize, 10usize, 25usize);
    let f = Arc::new(f);
    let b = Arc::new(b);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (f, b) = (f.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..batches {
                // Each batch spans all three tenants, so replicas contend on every head.
                let body = spanning(&tenants, per_batch, w + i);
                let cp = if (w + i) % 2 == 0 { &f.cp } else { &*b };
                let (status, reply) = post_batch(&f, cp, &body).await;
                assert_eq!(status, StatusCode::CREATED, "{reply}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = workers * batches * per_batch;
    println!(
        "{total} entries through two replicas in {:?}",
        started.elapsed()
    );

    let mut stored = 0;
    for tenant in tenants {
        let (count, min, max, distinct): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), min(sequence_number), max(sequence_number), count(DISTINCT current_hash)
             FROM audit_entries WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_one(&f.db)
        .await
        .unwrap();
        assert_eq!(
            (min, max, distinct),
            (1, count, count),
            "tenant {tenant}: gapless, no fork"
        );
        let head: i64 = sqlx::query_scalar(
            "SELECT sequence_number FROM audit_chain_heads WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_one(&f.db)
        .await
        .unwrap();
        assert_eq!(head, count);
        for cp in [&f.cp, &*b] {
            let out = verify(&f, cp, tenant).await;
            assert_eq!(out["ok"], true, "{out}");
            assert_eq!(out["entries_checked"].as_i64(), Some(count));
        }
        stored += count;
    }
    assert_eq!(stored as usize, total, "nothing lost");

    // The same batch to both replicas at once: exactly one stores it.
    let retried = batch(tenants[0], 5, &[]);
    let (one, two) = tokio::join!(
        post_batch(&f, &f.cp, &retried),
        post_batch(&f, &b, &retried)
    );
    let mut statuses = [one.0, two.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::CREATED],
        "{one:?} {two:?}"
    );
    let duplicate = if one.0 == StatusCode::OK {
        &one.1
    } else {
        &two.1
    };
    assert_eq!(duplicate["duplicate"], true);
    let out = verify(&f, &f.cp, tenants[0]).await;
    assert_eq!(out["ok"], true, "{out}");

    // A large batch spanning tenants is stored in parts (here one per tenant, 250 entries
    // each): the same one to both replicas at once stores each entry exactly once,
    // whichever replica stores which part.
    let counts = || async {
        let mut out = Vec::new();
        for tenant in tenants {
            out.push(
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM audit_entries WHERE tenant_id = $1",
                )
                .bind(tenant)
                .fetch_one(&f.db)
                .await
                .unwrap(),
            );
        }
        out
    };

    let before = counts().await;
    let twice = spanning(&tenants, 750, 0);
    let (one, two) = tokio::join!(post_batch(&f, &f.cp, &twice), post_batch(&f, &b, &twice));
    assert!(one.0.is_success() && two.0.is_success(), "{one:?} {two:?}");
    assert_eq!(
        one.1["stored"].as_u64().unwrap() + two.1["stored"].as_u64().unwrap(),
        750,
        "{one:?} {two:?}"
    );
    let after: Vec<i64> = counts().await;
    assert_eq!(
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
        [250, 250, 250]
    );
    // A retry after only some tenants' parts were stored stores just the rest: here the
    // part of the first tenant is claimed already (as a failed request would leave it).
    let partial = spanning(&tenants, 750, 0);
    let batch_id: Uuid = partial["batch_id"].as_str().unwrap().parse().unwrap();
    claim(
        &f.db,
        control_plane::audit::ingest::part_id(batch_id, tenants[0]),
    )
    .await;
    let (status, reply) = post_batch(&f, &f.cp, &partial).await;
    assert_eq!(
        (status, reply["stored"].as_u64()),
        (StatusCode::CREATED, Some(500)),
        "{reply}"
    );
    // Then nothing is left (the other replica) and a batch claimed whole (by a control
    // plane that stored batches whole) is not stored again by parts.
    let claimed = spanning(&tenants, 750, 0);
    claim(
        &f.db,
        claimed["batch_id"].as_str().unwrap().parse().unwrap(),
    )
    .await;
    for (cp, body) in [(&*b, &partial), (&f.cp, &claimed)] {
        let (status, reply) = post_batch(&f, cp, body).await;
        assert_eq!(
            (status, reply["duplicate"].as_bool()),
            (StatusCode::OK, Some(true)),
            "{reply}"
        );
    }
    let end: Vec<i64> = counts().await;
    assert_eq!(
        end.iter()
            .zip(&after)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
        [0, 250, 250]
    );
    for tenant in tenants {
        let out = verify(&f, &f.cp, tenant).await;
        assert_eq!(out["ok"], true, "{out}");
    }
}

/// The ingest contract: credentials, whole-batch validation, idempotency; auditor
/// endpoints need the admin token and reject bad queries as problem+json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_auth_validation_and_idempotency() {
    let f = Fixture::start(AuditKeys::generate()).await;
    let tenant = Uuid::new_v4();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_entries WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&f.db)
            .await
            .unwrap()
    };
    let body = batch(tenant, 5, &[Uuid::new_v4()]);
    for token in [None, Some("wrong"), Some(f.cp.admin_token.as_str())] {
        let (status, headers, text) = call(
            &f.http,
            &f.cp,
            Method::POST,
            "/api/v1/audit/batches",
            token,
            Some(&body),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {text}");
        assert_eq!(
            headers[reqwest::header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
    assert_eq!(count().await, 0);

    let mut bad = body.clone();
    bad["entries"][3]["decision"] = json!("maybe");
    let (status, problem_body) = post_batch(&f, &f.cp, &bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem_body}");
    assert!(
        problem_body["detail"].as_str().unwrap().contains("entry 3"),
        "{problem_body}"
    );
    let (status, _, text) = post_raw(&f, &f.cp, None).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{text}");
    assert_eq!(parse(&text)["status"], 415, "{text}");
    // Over the 16 MiB ingest limit: 413 problem JSON, nothing stored.
    let mut oversized = batch(tenant, 1, &[]);
    oversized["entries"][0]["path"] = json!(format!("/{}", "a".repeat(17 << 20)));
    // The control plane answers 413 from the Content-Length, before reading the body, and
    // may close the connection while the client is still sending it: the client then sees
    // a reset instead of the answer now and then. Retried until it reads the answer.
    let mut answer = None;
    for _ in 0..10 {
        let sent = f.cp.post_audit_batch(&f.http, &oversized).await;
        if let Ok(response) = sent {
            let (status, headers) = (response.status(), response.headers().clone());
            answer = Some((status, headers, response.text().await.unwrap_or_default()));
            break;
        }
    }
    let (status, headers, text) = answer.expect("an answer to the oversized batch");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert_eq!(
        headers[reqwest::header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert_eq!(count().await, 0, "nothing of a bad batch is stored");

    let (status, first) = post_batch(&f, &f.cp, &body).await;
    assert_eq!(
        (status, first["stored"].as_u64()),
        (StatusCode::CREATED, Some(5)),
        "{first}"
    );
    let (status, again) = post_batch(&f, &f.cp, &body).await;
    assert_eq!(
        (status, again["duplicate"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{again}"
    );
    assert_eq!(count().await, 5, "a retried batch is stored once");

    for path in [
        format!("/api/v1/audit/verify?tenant_id={tenant}"),
        format!("/api/v1/audit/entries?tenant_id={tenant}"),
        format!("/api/v1/audit/export?tenant_id={tenant}"),
        format!("/api/v1/audit/checkpoints?tenant_id={tenant}"),
        "/api/v1/audit/public-key".to_owned(),
    ] {
        let (status, _, _) = call(
            &f.http,
            &f.cp,
            Method::GET,
            &path,
            Some(&f.cp.ingest_token),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    for query in [
        "verify?tenant_id=nope".to_owned(),
        "entries".to_owned(),
        format!("entries?tenant_id={tenant}&decision=maybe"),
        format!("entries?tenant_id={tenant}&limit=0"),
        format!("entries?tenant_id={tenant}&cursor=abc"),
        format!("entries?tenant_id={tenant}&from=yesterday"),
        format!("export?tenant_id={tenant}&format=xml"),
    ] {
        let (status, headers, text) = call(
            &f.http,
            &f.cp,
            Method::GET,
            &format!("/api/v1/audit/{query}"),
            Some(&f.cp.admin_token),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {text}");
        assert_eq!(
            headers[reqwest::header::CONTENT_TYPE],
            "application/problem+json",
            "{query}"
        );
    }
    let (status, body) = admin(
        &f,
        &f.cp,
        Method::POST,
        "/api/v1/audit/checkpoints",
        Some(&json!({"tenant_id": Uuid::new_v4()})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "empty chain: {body}"
    );
}

/// Filters and cursor pagination return exactly what SQL says; exports carry every row,
/// the chain fields and the checkpoint references; checkpoints are taken periodically;
/// old HMAC keys keep verifying after a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_exports_periodic_checkpoints_and_key_rotation() {
    let mut keys = AuditKeys::generate();
    keys.checkpoint_interval_secs = 1;
    let f = Fixture::start(keys).await;
    let tenant = Uuid::new_v4();
    let agents = [Uuid::new_v4(), Uuid::new_v4()];
    for _ in 0..3 {
        let (status, body) = post_batch(&f, &f.cp, &batch(tenant, 10, &agents)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // Periodic checkpoint of the moved head.
    let checkpoints =
        integration_tests::wait_for("a periodic checkpoint", Duration::from_secs(10), || async {
            let (_, list) = admin(
                &f,
                &f.cp,
                Method::GET,
                &format!("/api/v1/audit/checkpoints?tenant_id={tenant}"),
                None,
            )
            .await;
            (list["checkpoints"].as_array()?.last()?["sequence_number"] == 30).then_some(list)
        })
        .await
        .unwrap();
    let (_, public_keys) = admin(&f, &f.cp, Method::GET, "/api/v1/audit/public-key", None).await;
    assert_eq!(
        public_keys["current"]["key_id"],
        json!(f.cp.audit_keys.checkpoint_key_id)
    );
    assert_eq!(
        public_keys["current"]["public_key"].as_str().map(str::len),
        Some(64)
    );

    // Filters + pagination against SQL.
    let filters = [
        (
            format!("agent_id={}", agents[1]),
            format!("agent_id = '{}'", agents[1]),
        ),
        (
            "domain=d2.example".to_owned(),
            "domain = 'd2.example'".to_owned(),
        ),
        ("decision=deny".to_owned(), "decision = 'deny'".to_owned()),
        ("policy_id=p-1".to_owned(), "policy_id = 'p-1'".to_owned()),
        (
            "from=2025-11-24T16:00:00.004Z&to=2025-11-24T16:00:00.007Z".to_owned(),
            "ts >= '2025-11-24T16:00:00.004Z' AND ts < '2025-11-24T16:00:00.007Z'".to_owned(),
        ),
        (
            "domain=d0.example&decision=allow".to_owned(),
            "domain = 'd0.example' AND decision = 'allow'".to_owned(),
        ),
    ];
    for (query, condition) in filters {
        let expected: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT sequence_number FROM audit_entries WHERE tenant_id = $1 AND {condition} ORDER BY 1"
        )))
        .bind(tenant)
        .fetch_all(&f.db)
        .await
        .unwrap();
        assert!(!expected.is_empty(), "{query} selects something");
        let mut got = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..20 {
            let page_query = match &cursor {
                Some(c) => format!("{query}&cursor={c}"),
                None => query.clone(),
            };
            let (status, page) = admin(
                &f,
                &f.cp,
                Method::GET,
                &format!("/api/v1/audit/entries?tenant_id={tenant}&limit=4&{page_query}"),
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{page}");
            let entries = page["entries"].as_array().unwrap();
            assert!(entries.len() <= 4);
            got.extend(
                entries
                    .iter()
                    .map(|e| e["sequence_number"].as_i64().unwrap()),
            );
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(got, expected, "{query}");
    }

    // Exports: every row, chain fields, the checkpoint at 30.
    let jsonl = export(&f, tenant, "jsonl").await;
    let lines: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    let stored = rows(&f.db, tenant).await;
    for (line, row) in lines.iter().zip(&stored) {
        assert_eq!(line["current_hash"], json!(row.current_hash));
        assert_eq!(
            line["signature_key_id"],
            json!(f.cp.audit_keys.hmac_active_key)
        );
    }
    assert_eq!(
        lines[29]["checkpoint"]["signature"],
        checkpoints["checkpoints"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["signature"]
    );
    assert!(lines[0]["checkpoint"].is_null());
    let csv = export(&f, tenant, "csv").await;
    assert!(csv.starts_with("tenant_id,sequence_number,entry_id,"));
    assert_eq!(
        csv.matches("\"CN=crawler, O=\"\"Acme, Inc\"\"\"").count(),
        30,
        "quoted subjects"
    );
    assert_eq!(csv.lines().count(), 31);
    let (code, report) = offline_verify(
        &f.dir,
        &jsonl,
        Some(&checkpoints),
        &public_keys,
        Some(&f.cp.audit_keys.hmac_keys),
    )
    .await;
    assert_eq!(code, 0, "{report}");

    // Rotation: a replica signs with a new key and still knows the old one.
    let mut rotated = f.cp.audit_keys.clone();
    let new_id = format!("{}-next", rotated.hmac_active_key);
    let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    rotated.hmac_keys = format!("{},{new_id}:{secret}", rotated.hmac_keys);
    rotated.hmac_active_key = new_id.clone();
    rotated.checkpoint_interval_secs = 0;
    let b = f.replica(rotated.clone(), "rotated").await;
    let (status, body) = post_batch(&f, &b, &batch(tenant, 5, &agents)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let out = verify(&f, &b, tenant).await;
    assert_eq!(
        (out["ok"].as_bool(), out["signatures_checked"].as_u64()),
        (Some(true), Some(35)),
        "{out}"
    );
    // The old replica does not know the new key id: it says so instead of passing.
    let out = verify(&f, &f.cp, tenant).await;
    assert_eq!(
        problem(&out),
        (Some(31), Some("unknown_signature_key")),
        "{out}"
    );
    let (code, report) = offline_verify(
        &f.dir,
        &export(&f, tenant, "jsonl").await,
        Some(&checkpoints),
        &public_keys,
        Some(&rotated.hmac_keys),
    )
    .await;
    assert_eq!(code, 0, "{report}");
}

/// A TCP proxy in front of PostgreSQL that the test can cut and restore.
struct Proxy {
    port: u16,
    target: u16,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: u16) -> Self {
        // Port 0: the kernel picks a free port, so no other test can take it between a
        // probe and the bind.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let proxy = Self {
            port: listener.local_addr().unwrap().port(),
            target,
            tasks: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    /// Accepts again on the same port (the control plane's database URL names it). An
    /// outgoing connection of another test may hold it for a moment as its local port:
    /// retried for up to 5 s.
    async fn open(&self) {
        let mut attempts = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(err) if attempts < 50 => {
                    attempts += 1;
                    eprintln!("proxy port {} not free yet: {err}", self.port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("proxy port {}: {err}", self.port),
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Refuses new connections and drops every open one.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// While the database is unreachable, ingest answers 503 with Retry-After (the filter keeps
/// the batch) and auditor reads answer 503; once it is back the same batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_503_with_retry_after() {
    let postgres = Postgres::shared().await.unwrap();
    let database_url = postgres.fresh_database().await.unwrap();
    let proxy = Proxy::start(postgres.port).await;
    let through_proxy = database_url.replace(
        &format!(":{}/", postgres.port),
        &format!(":{}/", proxy.port),
    );
    assert_ne!(through_proxy, database_url);
    let f = Fixture::start_on(postgres, database_url, through_proxy, AuditKeys::generate()).await;
    let tenant = Uuid::new_v4();
    let (status, body) = post_batch(&f, &f.cp, &batch(tenant, 3, &[])).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    proxy.cut();
    // Let the cut reach the control plane's pooled connections.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retried = batch(tenant, 4, &[]);
    let (status, headers, text) = post_raw(&f, &f.cp, Some(&retried)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(
        headers.contains_key(reqwest::header::RETRY_AFTER),
        "{headers:?}"
    );
    assert_eq!(
        headers[reqwest::header::CONTENT_TYPE],
        "application/problem+json"
    );
    for path in [
        format!("verify?tenant_id={tenant}"),
        format!("export?tenant_id={tenant}"),
        format!("entries?tenant_id={tenant}"),
    ] {
        let (status, headers, text) = call(
            &f.http,
            &f.cp,
            Method::GET,
            &format!("/api/v1/audit/{path}"),
            Some(&f.cp.admin_token),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {text}");
        assert!(headers.contains_key(reqwest::header::RETRY_AFTER), "{path}");
    }

    proxy.open().await;
    let (status, body) = integration_tests::wait_for(
        "ingest after the outage",
        Duration::from_secs(15),
        || async {
            let (status, body) = post_batch(&f, &f.cp, &retried).await;
            (status != StatusCode::SERVICE_UNAVAILABLE).then_some((status, body))
        },
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let out = verify(&f, &f.cp, tenant).await;
    assert_eq!(
        (out["ok"].as_bool(), out["entries_checked"].as_u64()),
        (Some(true), Some(7)),
        "{out}"
    );
    proxy.cut();
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (civil-from-days, proleptic Gregorian).
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Bucketed counts, top denied domains and the heatmap equal what the test computes from
/// the decisions it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_match_the_decisions_sent() {
    use std::collections::BTreeMap;
    let f = Fixture::start(AuditKeys::generate()).await;
    let tenant = Uuid::new_v4();
    let t0: i64 = 1_764_000_000; // Monday 2025-11-24 16:00:00 UTC
    assert_eq!(rfc3339(t0), "2025-11-24T16:00:00Z");
    let n = 60i64;
    let facts: Vec<(i64, String, bool)> = (0..n)
        .map(|i| (t0 + i * 37 * 60, format!("d{}.example", i % 4), i % 3 == 0))
        .collect();
    let mut body = batch(tenant, n as usize, &[Uuid::new_v4()]);
    for (entry, (ts, domain, deny)) in body["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .zip(&facts)
    {
        entry["timestamp_ns"] = json!(ts * 1_000_000_000);
        entry["domain"] = json!(domain);
        entry["decision"] = json!(if *deny { "deny" } else { "allow" });
    }
    let (status, reply) = post_batch(&f, &f.cp, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    let window = format!(
        "tenant_id={tenant}&from={}&to={}",
        rfc3339(t0 - 3600),
        rfc3339(t0 + 48 * 3600)
    );

    let mut expected: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    let mut denied_by_domain: BTreeMap<&str, i64> = BTreeMap::new();
    let mut heat: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for (ts, domain, deny) in &facts {
        let cell = expected.entry(ts - ts % 3600).or_default();
        let dow = (ts.div_euclid(86_400) + 3).rem_euclid(7) + 1;
        let hot = heat.entry((dow, ts.rem_euclid(86_400) / 3600)).or_default();
        if *deny {
            cell.1 += 1;
            hot.1 += 1;
            *denied_by_domain.entry(domain).or_default() += 1;
        } else {
            cell.0 += 1;
            hot.0 += 1;
        }
    }
    let (status, report) = admin(
        &f,
        &f.cp,
        Method::GET,
        &format!("/api/v1/analytics/decisions?{window}&bucket=1h"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let got: Vec<(String, i64, i64)> = report["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["bucket"].as_str().unwrap().to_owned(),
                b["allowed"].as_i64().unwrap(),
                b["denied"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, i64, i64)> = expected
        .iter()
        .map(|(b, (a, d))| (rfc3339(*b), *a, *d))
        .collect();
    assert_eq!(got, want);

    let (status, by_domain) = admin(
        &f,
        &f.cp,
        Method::GET,
        &format!("/api/v1/analytics/decisions?{window}&bucket=1d&group_by=domain"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{by_domain}");
    let mut denied: BTreeMap<String, i64> = BTreeMap::new();
    for b in by_domain["buckets"].as_array().unwrap() {
        *denied
            .entry(b["key"].as_str().unwrap().to_owned())
            .or_default() += b["denied"].as_i64().unwrap();
    }
    let want: BTreeMap<String, i64> = denied_by_domain
        .iter()
        .map(|(d, c)| ((*d).to_owned(), *c))
        .collect();
    assert_eq!(
        denied
            .into_iter()
            .filter(|(_, c)| *c > 0)
            .collect::<BTreeMap<_, _>>(),
        want
    );

    let (status, top) = admin(
        &f,
        &f.cp,
        Method::GET,
        &format!("/api/v1/analytics/top-denied-domains?{window}&limit=2"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{top}");
    let mut ranked: Vec<(&str, i64)> = denied_by_domain.iter().map(|(d, c)| (*d, *c)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let got: Vec<(String, i64)> = top["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["domain"].as_str().unwrap().to_owned(),
                d["denied"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, i64)> = ranked
        .iter()
        .take(2)
        .map(|(d, c)| ((*d).to_owned(), *c))
        .collect();
    assert_eq!(got, want);

    let (status, map) = admin(
        &f,
        &f.cp,
        Method::GET,
        &format!("/api/v1/analytics/heatmap?{window}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{map}");
    let got: BTreeMap<(i64, i64), (i64, i64)> = map["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                (
                    c["day_of_week"].as_i64().unwrap(),
                    c["hour"].as_i64().unwrap(),
                ),
                (
                    c["allowed"].as_i64().unwrap(),
                    c["denied"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, heat);

    // Auditors read their own tenant's analytics; another tenant's auditor gets 404.
    let url = f.cp.url(&format!("/api/v1/analytics/heatmap?{window}"));
    let secret = f.cp.jwt_secret();
    let own = integration_tests::jwt::mint(&secret, "auditor", Some(&tenant.to_string()), 600);
    let other = integration_tests::jwt::mint(
        &secret,
        "auditor",
        Some(&uuid::Uuid::new_v4().to_string()),
        600,
    );
    let http = integration_tests::client::plain_client().unwrap();
    let status = |token: String| {
        let request = http.get(&url).bearer_auth(token).send();
        async move { request.await.unwrap().status() }
    };
    assert_eq!(status(own).await, StatusCode::OK);
    assert_eq!(status(other).await, StatusCode::NOT_FOUND);

    for query in [
        format!("decisions?{window}&bucket=1w"),
        format!("decisions?{window}&bucket=1s"),
        format!("decisions?{window}&group_by=planet"),
        format!("top-denied-domains?{window}&limit=0"),
        format!(
            "heatmap?tenant_id={tenant}&from={}&to={}",
            rfc3339(t0),
            rfc3339(t0)
        ),
    ] {
        let (status, body) = admin(
            &f,
            &f.cp,
            Method::GET,
            &format!("/api/v1/analytics/{query}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
    }
}
