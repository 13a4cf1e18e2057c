//! Audit storage layouts and retention (docs/audit-chain.md, "Storage and retention"):
//!
//! - plain PostgreSQL 15 (native range partitioning maintained by the control plane): the
//!   migration converts an existing table keeping its rows; the real control plane creates
//!   weekly partitions ahead at start-up, moves rows with old timestamps out of the default
//!   partition, drops the weeks past retention after anchoring every chain on a signed
//!   checkpoint; the verify API and the offline verifier start from that checkpoint, and
//!   still catch tampering; a chain that does not verify is not dropped;
//! - TimescaleDB (PGlite with TimescaleDB 2.23 through pglite-socket): the migrations make
//!   `audit_entries` a hypertable with 7-day chunks, compression and retention policies;
//!   entries stored, compressed, bucketed with `time_bucket`, retired chunk-wise by the
//!   maintenance, verified from the anchor checkpoint, tampering caught;
//! - the storage layer's transactions survive a cancelled `BEGIN` (a client going away
//!   mid-request) without leaving a pooled connection inside a transaction.

use chrono::{DateTime, Duration, Utc};
use control_plane::audit::AuditKeys as CpKeys;
use control_plane::audit::retention::{self, Policy};
use control_plane::storage::audit::analytics::{self, GroupBy, Window};
use control_plane::storage::audit::retention::MAINTENANCE_LOCK;
use integration_tests::control_plane::{AuditKeys, ControlPlane, ControlPlaneConfig};
use integration_tests::pglite::Pglite;
use integration_tests::postgres::Postgres;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use uuid::Uuid;

// ---------------------------------------------------------------- helpers

fn ns(at: DateTime<Utc>) -> i64 {
    at.timestamp_nanos_opt().unwrap()
}

/// A batch as the filter posts it: `n` decisions at `at` (1 ms apart), alternately
/// allowed and denied.
fn batch(tenant: Uuid, n: usize, at: DateTime<Utc>) -> Value {
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "decision_id": Uuid::new_v4().to_string(),
                "timestamp_ns": ns(at) + i as i64 * 1_000_000,
                "tenant_id": tenant.to_string(),
                "agent_id": null,
                "agent_fingerprint": "ab".repeat(32),
                "agent_subject": "CN=crawler",
                "domain": format!("d{}.example", i % 3),
                "method": "GET",
                "path": "/",
                "user_agent": "bot/1.0",
                "source_ip": "127.0.0.1",
                "decision": if i % 2 == 0 { "allow" } else { "deny" },
                "reason": if i % 2 == 0 { "domain_allowed" } else { "domain_blocked" },
                "policy_id": null,
                "config_version": "1",
            })
        })
        .collect();
    json!({"batch_id": Uuid::new_v4().to_string(), "entries": entries})
}

struct Plain {
    dir: PathBuf,
    db: sqlx::PgPool,
    cp: ControlPlane,
    http: reqwest::Client,
    _postgres: std::sync::Arc<Postgres>,
}

impl Drop for Plain {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("control plane logs kept in {}", self.dir.display());
        } else {
            self.cp.stop();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Plain {
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, String) {
        let token = if path.starts_with("/api/v1/audit/batches") {
            &self.cp.ingest_token
        } else {
            &self.cp.admin_token
        };
        let mut request = self
            .http
            .request(method, self.cp.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Value {
        let (status, text) = self.request(method, path, body).await;
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn ingest(&self, tenant: Uuid, n: usize, at: DateTime<Utc>) {
        let (status, text) = self
            .request(
                Method::POST,
                "/api/v1/audit/batches",
                Some(&batch(tenant, n, at)),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{text}");
    }

    async fn verify(&self, tenant: Uuid) -> Value {
        self.json(
            Method::GET,
            &format!("/api/v1/audit/verify?tenant_id={tenant}"),
            None,
        )
        .await
    }

    async fn export(&self, tenant: Uuid) -> String {
        let path = format!("/api/v1/audit/export?tenant_id={tenant}&format=jsonl");
        let (status, text) = self.request(Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        text
    }

    async fn metric(&self, name: &str) -> Option<u64> {
        let text = self
            .http
            .get(self.cp.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Restarts the control plane (one maintenance run at start-up) and waits for it.
    async fn restart_and_maintain(&mut self) {
        self.cp.restart().await.unwrap();
        integration_tests::wait_for(
            "maintenance at start-up",
            std::time::Duration::from_secs(60),
            || async {
                self.metric("chronoguard_audit_maintenance_runs_total")
                    .await
                    .filter(|runs| *runs >= 1)
            },
        )
        .await
        .unwrap();
    }

    async fn scalar_i64(&self, query: &str, tenant: Uuid) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
            .bind(tenant)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    async fn execute(&self, statement: &str, tenant: Uuid) {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .bind(tenant)
            .execute(&self.db)
            .await
            .unwrap();
    }
}

async fn partitions(db: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'audit_entries'::regclass ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

fn problem(outcome: &Value) -> (Option<i64>, Option<&str>) {
    (
        outcome["first_bad_sequence"].as_i64(),
        outcome["problem"].as_str(),
    )
}

/// Runs the offline verifier on an export with the auditor's checkpoints and keys.
async fn offline_verify(
    dir: &Path,
    export: &str,
    checkpoints: &Value,
    keys: &Value,
) -> (i32, Value) {
    let name = Uuid::new_v4().simple().to_string();
    let files = [
        (format!("{name}.jsonl"), export.to_owned()),
        (format!("{name}-cp.json"), checkpoints.to_string()),
        (format!("{name}-keys.json"), keys.to_string()),
    ];
    for (file, content) in &files {
        std::fs::write(dir.join(file), content).unwrap();
    }
    let binary = integration_tests::target_dir().join("debug/chronoguard-audit-verify");
    let out = tokio::process::Command::new(&binary)
        .arg("--export")
        .arg(dir.join(&files[0].0))
        .arg("--checkpoints")
        .arg(dir.join(&files[1].0))
        .arg("--public-keys")
        .arg(dir.join(&files[2].0))
        .env_remove("CHRONOGUARD_AUDIT_HMAC_KEYS")
        .output()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), report)
}

// ---------------------------------------------------------------- plain PostgreSQL

/// The migration converts an existing unpartitioned table with rows; a maintenance run
/// while another session holds the lock (a second replica) does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_migration_keeps_rows_and_maintenance_takes_turns() {
    let postgres = Postgres::shared().await.unwrap();
    let url = postgres.fresh_database().await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let all = &control_plane::storage::MIGRATOR;
    // Every migration before the partitioning one, then rows, then the rest.
    let before = all
        .iter()
        .map(|m| m.version)
        .filter(|v| *v < 20261125190000)
        .max()
        .unwrap();
    all.run_to(before, &pool).await.unwrap();
    let tenant = Uuid::new_v4();
    let old = Utc::now() - Duration::days(200);
    for (seq, at) in [(1i64, old), (2, old + Duration::days(1)), (3, Utc::now())] {
        sqlx::query(
            "INSERT INTO audit_entries (tenant_id, sequence_number, entry_id, timestamp_ns, ts,
                kind, agent_fingerprint, agent_subject, domain, method, path, user_agent,
                source_ip, decision, reason, config_version, previous_hash, current_hash)
             VALUES ($1, $2, $3, $4, $5, 'decision', '', '', 'a.example', 'GET', '/', '',
                '127.0.0.1', 'allow', 'domain_allowed', '1', $6, $6)",
        )
        .bind(tenant)
        .bind(seq)
        .bind(Uuid::new_v4())
        .bind(ns(at))
        .bind(at)
        .bind("00".repeat(32))
        .execute(&pool)
        .await
        .unwrap();
    }
    all.run(&pool).await.unwrap();

    let kind: String = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE oid = 'audit_entries'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kind, "p", "audit_entries is range-partitioned");
    let kept: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence_number FROM audit_entries WHERE tenant_id = $1 ORDER BY 1",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(kept, [1, 2, 3]);
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i
         JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n) ON true
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = 'audit_entries'::regclass AND i.indisprimary ORDER BY k.n",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(key, ["tenant_id", "sequence_number", "ts"]);
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'audit_entries' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for index in [
        "audit_entries_agent",
        "audit_entries_domain",
        "audit_entries_ts",
    ] {
        assert!(indexes.iter().any(|i| i == index), "{index} in {indexes:?}");
    }
    let parts = partitions(&pool).await;
    // The weeks of the three rows (two of them may share one) and the default.
    let weeks: std::collections::BTreeSet<String> = [old, old + Duration::days(1), Utc::now()]
        .into_iter()
        .map(|at| {
            control_plane::storage::audit::retention::partition_name(
                control_plane::storage::audit::retention::week_start(at),
            )
        })
        .collect();
    for week in &weeks {
        assert!(parts.contains(week), "{week} in {parts:?}");
    }
    assert!(parts.iter().any(|p| p == "audit_entries_default"));

    // Another replica holds the maintenance lock: this run skips.
    let keys = CpKeys::from_settings(&control_plane::config::Audit::default()).unwrap();
    let policy = Policy {
        retention: Some(Duration::days(30)),
        partitions_ahead: 2,
    };
    let mut other = pool.acquire().await.unwrap();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(MAINTENANCE_LOCK)
        .fetch_one(&mut *other)
        .await
        .unwrap();
    assert!(locked);
    let report = retention::maintain(&pool, &keys, policy, Utc::now())
        .await
        .unwrap();
    assert!(report.skipped, "{report:?}");
    assert_eq!(partitions(&pool).await, parts, "nothing changed");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MAINTENANCE_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    drop(other);
    // Without a checkpoint key the old weeks cannot be anchored: kept, and counted.
    let report = retention::maintain(&pool, &keys, policy, Utc::now())
        .await
        .unwrap();
    assert!(!report.skipped);
    assert_eq!(report.ranges_dropped, 0, "{report:?}");
    assert!(report.ranges_refused >= 1, "{report:?}");
    assert_eq!(report.partitions_created, 2, "two weeks ahead: {report:?}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_entries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 3);
}

/// A read of `audit_entries` that runs while maintenance moves rows out of the default
/// partition sees every row. PostgreSQL plans a query with the partitions it saw when it
/// locked the parent but reads with a snapshot taken after the locks it waited for: a
/// read that queued behind the move planned without the new partition and then found the
/// moved rows deleted from the default one, so verification reported the chain
/// `truncated` and an export missed rows. The reader is made to queue exactly there: a
/// session holding the default partition keeps the move waiting at its `ATTACH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_during_a_partition_move_sees_every_row() {
    let postgres = Postgres::shared().await.unwrap();
    let url = postgres.fresh_database().await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    control_plane::storage::MIGRATOR.run(&pool).await.unwrap();
    let tenant = Uuid::new_v4();
    let old = Utc::now() - Duration::days(200);
    let times: Vec<DateTime<Utc>> = (0..3).map(|i| old + Duration::seconds(i)).collect();
    insert_chain(&pool, tenant, 1, [0; 32], &times).await;
    let count = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_entries WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_entries_default")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(in_default, 3, "old rows land in the default partition");

    let mut holder = control_plane::storage::begin(&pool).await.unwrap();
    sqlx::query("SELECT count(*) FROM audit_entries_default")
        .execute(&mut *holder)
        .await
        .unwrap();
    let keys = CpKeys::from_settings(&control_plane::config::Audit::default()).unwrap();
    let policy = Policy {
        retention: None,
        partitions_ahead: 0,
    };
    let maintenance = tokio::spawn({
        let pool = pool.clone();
        async move { retention::maintain(&pool, &keys, policy, Utc::now()).await }
    });
    let pause = std::time::Duration::from_millis(400);
    tokio::time::sleep(pause).await;
    let reader = tokio::spawn(count(pool.clone()));
    tokio::time::sleep(pause).await;
    holder.commit().await.unwrap();
    let report = maintenance.await.unwrap().unwrap();
    assert_eq!(report.rows_moved, 3, "{report:?}");
    assert_eq!(reader.await.unwrap(), 3, "the read during the move");
    assert_eq!(count(pool.clone()).await, 3, "after the move");
}

/// The real control plane on plain PostgreSQL: partitions ahead, retention anchored on
/// signed checkpoints, verification from the anchor (API and offline), tampering after
/// the drop caught, a broken chain never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_partitions_retention_and_verification_from_the_anchor() {
    let postgres = Postgres::shared().await.unwrap();
    let database_url = postgres.fresh_database().await.unwrap();
    let dir = integration_tests::postgres::tempdir("chronoguard-audit-storage").unwrap();
    let mut keys = AuditKeys::generate();
    keys.retention_days = 30;
    let cp = ControlPlane::start_with_keys(
        ControlPlaneConfig {
            database_url: database_url.clone(),
            redis_url: String::new(),
            wasm: integration_tests::envoy::wasm(),
            log: dir.join("control-plane.log"),
            audit_flush_interval_ms: 100,
        },
        keys,
    )
    .await
    .unwrap();
    let mut f = Plain {
        dir,
        db: sqlx::PgPool::connect(&database_url).await.unwrap(),
        cp,
        http: integration_tests::client::plain_client().unwrap(),
        _postgres: postgres,
    };

    // Start-up maintenance: this week and four ahead (base.yaml's partitions_ahead).
    let now = Utc::now();
    let expected: Vec<String> = (0..=4)
        .map(|i| {
            control_plane::storage::audit::retention::partition_name(
                control_plane::storage::audit::retention::week_start(now) + Duration::days(7 * i),
            )
        })
        .collect();
    integration_tests::wait_for(
        "partitions ahead",
        std::time::Duration::from_secs(30),
        || async {
            let parts = partitions(&f.db).await;
            expected.iter().all(|p| parts.contains(p)).then_some(())
        },
    )
    .await
    .unwrap();

    // T: 10 entries 100 days old, then 10 current ones. U: only 5 old ones. The old ones
    // have no partition of their week: they land in the default partition.
    let (t, u) = (Uuid::new_v4(), Uuid::new_v4());
    let old = now - Duration::days(100);
    f.ingest(t, 10, old).await;
    f.ingest(u, 5, old).await;
    f.ingest(t, 10, now).await;
    assert_eq!(
        f.scalar_i64(
            "SELECT count(*) FROM audit_entries_default WHERE tenant_id = $1",
            t
        )
        .await,
        10
    );
    assert_eq!(f.verify(t).await["ok"], true);

    f.restart_and_maintain().await;
    // The old week got its partition, was anchored and dropped.
    let old_week = control_plane::storage::audit::retention::partition_name(
        control_plane::storage::audit::retention::week_start(old),
    );
    assert!(!partitions(&f.db).await.contains(&old_week));
    assert_eq!(
        f.metric("chronoguard_audit_rows_moved_total").await,
        Some(15)
    );
    assert_eq!(
        f.metric("chronoguard_audit_ranges_dropped_total").await,
        Some(1)
    );
    assert_eq!(
        f.metric("chronoguard_audit_retention_anchors_signed_total")
            .await,
        Some(2)
    );
    assert_eq!(
        f.metric("chronoguard_audit_retention_refused_total").await,
        Some(0)
    );
    assert_eq!(
        f.scalar_i64(
            "SELECT min(sequence_number) FROM audit_entries WHERE tenant_id = $1",
            t
        )
        .await,
        11
    );
    assert_eq!(
        f.scalar_i64("SELECT count(*) FROM audit_entries WHERE tenant_id = $1", u)
            .await,
        0
    );
    assert_eq!(
        f.scalar_i64(
            "SELECT sequence_number FROM audit_retention_anchors WHERE tenant_id = $1",
            t
        )
        .await,
        10
    );

    // The API verifies from the signed checkpoint at the anchor.
    let report = f.verify(t).await;
    assert_eq!(
        (
            report["ok"].as_bool(),
            report["anchored_at_checkpoint"].as_i64(),
            report["from_sequence"].as_i64(),
            report["entries_checked"].as_u64(),
            report["signatures_checked"].as_u64(),
        ),
        (Some(true), Some(10), Some(11), Some(10), Some(10)),
        "{report}"
    );
    let report = f.verify(u).await;
    assert_eq!(
        (
            report["ok"].as_bool(),
            report["anchored_at_checkpoint"].as_i64()
        ),
        (Some(true), Some(5)),
        "{report}"
    );

    // Offline, on an export that starts after the drop, with the auditor's checkpoints.
    let checkpoints = f
        .json(
            Method::GET,
            &format!("/api/v1/audit/checkpoints?tenant_id={t}"),
            None,
        )
        .await;
    let public_keys = f.json(Method::GET, "/api/v1/audit/public-key", None).await;
    let retained = f.export(t).await;
    let (code, offline) = offline_verify(&f.dir, &retained, &checkpoints, &public_keys).await;
    assert_eq!(
        (
            code,
            offline["anchored_at_checkpoint"].as_i64(),
            offline["outcome"]["entries_checked"].as_u64()
        ),
        (0, Some(10), Some(10)),
        "{offline}"
    );

    // Tampering after the drop is still caught, by both.
    f.execute(
        "UPDATE audit_entries SET path = '/x' WHERE tenant_id = $1 AND sequence_number = 15",
        t,
    )
    .await;
    assert_eq!(
        problem(&f.verify(t).await),
        (Some(15), Some("hash_mismatch"))
    );
    let (code, offline) =
        offline_verify(&f.dir, &f.export(t).await, &checkpoints, &public_keys).await;
    assert_eq!(
        (code, problem(&offline["outcome"])),
        (1, (Some(15), Some("hash_mismatch"))),
        "{offline}"
    );
    // So is deleting the first retained entry (the anchor does not excuse it).
    f.execute(
        "DELETE FROM audit_entries WHERE tenant_id = $1 AND sequence_number = 11",
        t,
    )
    .await;
    assert_eq!(
        problem(&f.verify(t).await),
        (Some(11), Some("sequence_gap"))
    );
    // And removing the anchor makes the dropped entries count as missing: the signed
    // checkpoint at 5 covers entries the chain no longer has.
    f.execute(
        "DELETE FROM audit_retention_anchors WHERE tenant_id = $1",
        u,
    )
    .await;
    assert_eq!(problem(&f.verify(u).await), (Some(1), Some("truncated")));

    // A chain that does not verify is never dropped: V's old week stays, counted.
    let v = Uuid::new_v4();
    let older = now - Duration::days(200);
    f.ingest(v, 6, older).await;
    f.execute(
        "UPDATE audit_entries SET domain = 'evil.example' WHERE tenant_id = $1 AND sequence_number = 3",
        v,
    )
    .await;
    f.restart_and_maintain().await;
    let older_week = control_plane::storage::audit::retention::partition_name(
        control_plane::storage::audit::retention::week_start(older),
    );
    assert!(
        partitions(&f.db).await.contains(&older_week),
        "moved into its week, kept"
    );
    assert_eq!(
        f.metric("chronoguard_audit_retention_refused_total").await,
        Some(1)
    );
    assert_eq!(
        f.metric("chronoguard_audit_ranges_dropped_total").await,
        Some(0)
    );
    assert_eq!(
        f.scalar_i64("SELECT count(*) FROM audit_entries WHERE tenant_id = $1", v)
            .await,
        6
    );
    assert_eq!(
        problem(&f.verify(v).await),
        (Some(3), Some("hash_mismatch"))
    );
}

// ---------------------------------------------------------------- TimescaleDB

/// Chained, unsigned entries inserted the way the earlier multi-row insert did (PGlite
/// has no `COPY`), hashed by the tests' independent implementation; moves the head.
async fn insert_chain(
    pool: &sqlx::PgPool,
    tenant: Uuid,
    first: i64,
    previous: [u8; 32],
    times: &[DateTime<Utc>],
) -> [u8; 32] {
    let mut previous = previous;
    let mut tx = control_plane::storage::begin(pool).await.unwrap();
    for (i, at) in times.iter().enumerate() {
        let seq = first + i as i64;
        let entry = Uuid::new_v4();
        let decision = if i % 2 == 0 { "allow" } else { "deny" };
        let (tenant_s, seq_s, entry_s, ns_s) = (
            tenant.to_string(),
            seq.to_string(),
            entry.to_string(),
            ns(*at).to_string(),
        );
        let current = integration_tests::chain::link(
            [
                Some(&tenant_s),
                Some(&seq_s),
                Some(&entry_s),
                Some(&ns_s),
                Some("decision"),
                None,
                Some(""),
                Some(""),
                Some("a.example"),
                Some("GET"),
                Some("/"),
                Some(""),
                Some("127.0.0.1"),
                Some(decision),
                Some("r"),
                None,
                Some("1"),
            ],
            &previous,
        );
        sqlx::query(
            "INSERT INTO audit_entries (tenant_id, sequence_number, entry_id, timestamp_ns, ts,
                kind, agent_fingerprint, agent_subject, domain, method, path, user_agent,
                source_ip, decision, reason, config_version, previous_hash, current_hash)
             VALUES ($1, $2, $3, $4, $5, 'decision', '', '', 'a.example', 'GET', '/', '',
                '127.0.0.1', $6, 'r', '1', $7, $8)",
        )
        .bind(tenant)
        .bind(seq)
        .bind(entry)
        .bind(ns(*at))
        .bind(*at)
        .bind(decision)
        .bind(hex::encode(previous))
        .bind(hex::encode(current))
        .execute(&mut *tx)
        .await
        .unwrap();
        previous = current;
    }
    sqlx::query(
        "INSERT INTO audit_chain_heads (tenant_id, sequence_number, current_hash) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id) DO UPDATE SET sequence_number = $2, current_hash = $3",
    )
    .bind(tenant)
    .bind(first + times.len() as i64 - 1)
    .bind(hex::encode(previous))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    previous
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_hypertable_compression_retention_and_verification() {
    let mut pg = Pglite::start().await.unwrap();
    let pool = pg.pool().await.unwrap();
    control_plane::storage::MIGRATOR.run(&pool).await.unwrap();

    // A hypertable with 7-day chunks, compression after 30 days, retention of a year
    // (registered, run by the control plane after anchoring).
    let interval: String = sqlx::query_scalar(
        "SELECT time_interval::text FROM timescaledb_information.dimensions
         WHERE hypertable_name = 'audit_entries' AND column_name = 'ts'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(interval, "7 days");
    let jobs: Vec<(i32, String, bool, Value)> = sqlx::query_as(
        "SELECT job_id, proc_name::text, scheduled, config FROM timescaledb_information.jobs
         WHERE hypertable_name = 'audit_entries' ORDER BY proc_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let names: Vec<(&str, bool)> = jobs.iter().map(|j| (j.1.as_str(), j.2)).collect();
    assert_eq!(
        names,
        [("policy_compression", true), ("policy_retention", false)]
    );
    assert_eq!(jobs[0].3["compress_after"], "30 days", "{:?}", jobs[0].3);
    assert_eq!(jobs[1].3["drop_after"], "365 days", "{:?}", jobs[1].3);
    assert_eq!(
        analytics::bucket_function(&pool).await.unwrap(),
        "time_bucket"
    );

    // A chain: 10 entries 100 days ago, 10 in the last hour.
    let tenant = Uuid::new_v4();
    let now = Utc::now();
    let old = now - Duration::days(100);
    let old_times: Vec<_> = (0..10).map(|i| old + Duration::milliseconds(i)).collect();
    let new_times: Vec<_> = (0..10)
        .map(|i| now - Duration::minutes(30) + Duration::milliseconds(i))
        .collect();
    let head = insert_chain(&pool, tenant, 1, [0; 32], &old_times).await;
    insert_chain(&pool, tenant, 11, head, &new_times).await;

    // The compression job compresses the old chunk (no scheduler here: run it).
    sqlx::query("CALL run_job($1)")
        .bind(jobs[0].0)
        .execute(&pool)
        .await
        .unwrap();
    let compressed: Vec<bool> = sqlx::query_scalar(
        "SELECT is_compressed FROM timescaledb_information.chunks
         WHERE hypertable_name = 'audit_entries' ORDER BY range_start",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(compressed.first(), Some(&true), "{compressed:?}");
    assert_eq!(compressed.last(), Some(&false), "{compressed:?}");

    // Analytics: time_bucket, right counts, also over the compressed chunk.
    for (from, to) in [
        (now - Duration::hours(2), now + Duration::hours(1)),
        (old - Duration::hours(1), old + Duration::hours(1)),
    ] {
        let window = Window {
            tenant_id: tenant,
            from,
            to,
        };
        let buckets = analytics::decisions(&pool, window, 3600, GroupBy::Outcome)
            .await
            .unwrap();
        let (allowed, denied) = buckets
            .iter()
            .fold((0, 0), |(a, d), b| (a + b.allowed, d + b.denied));
        assert_eq!((allowed, denied), (5, 5), "{buckets:?}");
        assert!(buckets.iter().all(|b| b.bucket.timestamp() % 3600 == 0));
    }

    let seed = "42".repeat(32);
    let keys = CpKeys::from_settings(&control_plane::config::Audit {
        checkpoint_signing_key: control_plane::config::Secret::new(seed),
        checkpoint_key_id: "cp-test".into(),
        ..control_plane::config::Audit::default()
    })
    .unwrap();
    let verified = retention::verify_tenant(&pool, &keys, tenant, None)
        .await
        .unwrap()
        .unwrap();
    assert!(verified.outcome.ok, "{verified:?}");
    assert_eq!(verified.outcome.entries_checked, 20);

    // Retention of 30 days: the old chunk is verified, anchored and dropped.
    let policy = Policy {
        retention: Some(Duration::days(30)),
        partitions_ahead: 4,
    };
    let report = retention::maintain(&pool, &keys, policy, Utc::now())
        .await
        .unwrap();
    assert_eq!(
        (
            report.ranges_dropped,
            report.anchors_signed,
            report.ranges_refused
        ),
        (1, 1, 0),
        "{report:?}"
    );
    let remaining: (i64, i64) = sqlx::query_as(
        "SELECT count(*), min(sequence_number) FROM audit_entries WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(remaining, (10, 11));
    let verified = retention::verify_tenant(&pool, &keys, tenant, None)
        .await
        .unwrap()
        .unwrap();
    assert!(verified.outcome.ok, "{verified:?}");
    assert_eq!(
        (
            verified.anchored_at_checkpoint,
            verified.from_sequence,
            verified.outcome.entries_checked
        ),
        (Some(10), 11, 10)
    );
    // Nothing else is past retention: a second run does nothing.
    let again = retention::maintain(&pool, &keys, policy, Utc::now())
        .await
        .unwrap();
    assert_eq!(again, retention::Report::default());

    // Tampering after the drop is caught.
    sqlx::query(
        "UPDATE audit_entries SET domain = 'evil.example' WHERE tenant_id = $1 AND sequence_number = 15",
    )
    .bind(tenant)
    .execute(&pool)
    .await
    .unwrap();
    let tampered = retention::verify_tenant(&pool, &keys, tenant, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            tampered.outcome.first_bad_sequence,
            tampered.outcome.problem
        ),
        (
            Some(15),
            Some(control_plane::audit::chain::Problem::HashMismatch)
        )
    );
    assert!(pg.running(), "pglite still up; see {}", pg.log().display());
}

/// sqlx 0.9.0 leaves a pooled connection inside a server-side transaction when a `begin`
/// future is dropped during the `BEGIN` round trip (`control_plane::storage::begin`): the
/// next statements on that connection are invisible to everyone else and lost. The first
/// half shows the hazard with sqlx's own `Pool::begin` (when it stops failing, sqlx has
/// fixed it and the workaround can go); the second half shows the storage layer's `begin`
/// leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_begin_leaves_no_transaction_open() {
    use sqlx::postgres::PgPoolOptions;
    let postgres = Postgres::shared().await.unwrap();
    let url = postgres.fresh_database().await.unwrap();
    let observer = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE writes (n int)")
        .execute(&observer)
        .await
        .unwrap();
    // One connection, handed out without a test query: the cancelled BEGIN and the next
    // statement share it.
    let one = || {
        PgPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect(&url)
    };
    let seen = |n: i32| {
        let observer = observer.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM writes WHERE n = $1")
                .bind(n)
                .fetch_one(&observer)
                .await
                .unwrap()
        }
    };

    // A BEGIN whose answer takes 300 ms, cancelled after 50 ms: the window a client that
    // goes away hits.
    const SLOW_BEGIN: &str = "BEGIN; SELECT pg_sleep(0.3)";
    let window = std::time::Duration::from_millis(50);

    let pool = one().await.unwrap();
    #[allow(clippy::disallowed_methods)] // the hazard itself
    let cancelled = tokio::time::timeout(window, pool.begin_with(SLOW_BEGIN)).await;
    assert!(
        cancelled.is_err(),
        "the BEGIN was meant to be in flight: {cancelled:?}"
    );
    sqlx::query("INSERT INTO writes VALUES (1)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        seen(1).await,
        0,
        "sqlx's own begin no longer leaks the transaction: sqlx fixed issue #4393, \
         control_plane::storage::begin can go back to Pool::begin"
    );
    pool.close().await;

    let pool = one().await.unwrap();
    let cancelled = tokio::time::timeout(
        window,
        control_plane::storage::begin_with(&pool, SLOW_BEGIN),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the BEGIN was meant to be in flight: {cancelled:?}"
    );
    sqlx::query("INSERT INTO writes VALUES (2)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        seen(2).await,
        1,
        "the write ran inside a leaked transaction"
    );
    // And the pool goes on working normally.
    let mut tx = control_plane::storage::begin(&pool).await.unwrap();
    sqlx::query("INSERT INTO writes VALUES (3)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(seen(3).await, 1);
}
