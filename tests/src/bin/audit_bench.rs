//! `cargo xtask bench --only audit`: the audit path's throughput, each figure next to a
//! baseline measured in the same run on the same PostgreSQL:
//!
//! - ingest: concurrent senders POST realistic batches to the real control plane over
//!   HTTP; entries/s against a bare binary `COPY` of rows of the same shape into a copy of
//!   `audit_entries` (same columns and indexes), same batch size and concurrency;
//! - export: a tenant of `--export-entries` entries streamed as JSONL; rows/s against
//!   PostgreSQL's own `COPY (SELECT …) TO STDOUT` of the same rows, and the control
//!   plane's resident memory while it streams;
//! - offline verification of that export (with HMAC keys and checkpoints) by
//!   `chronoguard-audit-verify`: entries/s with all threads against one thread.
//!
//! CPU time of the control plane, PostgreSQL and this load generator is read from `/proc`
//! per phase: everything shares the machine's cores. Prints a Markdown report.

use integration_tests::api_stack::{ApiStack, certificate};
use integration_tests::postgres::Postgres;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::Connection as _;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

struct Args {
    seconds: u64,
    senders: usize,
    batches: Vec<usize>,
    export_entries: usize,
    keep_export: bool,
    rounds: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut out = Args {
        seconds: 5,
        senders: 4,
        batches: vec![100, 1000],
        export_entries: 1_000_000,
        keep_export: false,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--keep-export" {
            out.keep_export = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => out.seconds = value.parse()?,
            "--senders" => out.senders = value.parse()?,
            "--batches" => {
                out.batches = value.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--export-entries" => out.export_entries = value.parse()?,
            "--rounds" => out.rounds = value.parse::<usize>()?.max(1),
            other => anyhow::bail!(
                "unknown flag {other} (--seconds --senders --batches 100,1000 --rounds --export-entries N --keep-export)"
            ),
        }
    }
    anyhow::ensure!(out.senders > 0 && !out.batches.is_empty(), "nothing to run");
    Ok(out)
}

/// The tenants of one sender each, with two agents.
struct Tenant {
    id: Uuid,
    agents: [Uuid; 2],
    policy: Uuid,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let stack = ApiStack::start().await?;
    let pg = Postgres::shared().await?;
    let procs = Procs {
        control_plane: stack.control_plane.pid(),
        postmaster: postmaster_pid(&pg.dir)?,
    };
    let mut report = String::new();
    writeln!(
        report,
        "load average at start: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    )?;
    let mut tenants = Vec::new();
    for i in 0..args.senders.max(2) {
        tenants.push(tenant(&stack, &format!("bench-{i}")).await?);
    }

    writeln!(
        report,
        "\n### Ingest ({} s per measurement, {} senders, HMAC on, medians of {} alternating rounds)\n",
        args.seconds, args.senders, args.rounds
    )?;
    writeln!(
        report,
        "| batch | tenants per batch | bare COPY rows/s | bare multi-row INSERT rows/s | ingest entries/s | ingest ÷ COPY | ingest ÷ INSERT | CPU µs/entry: control plane, PostgreSQL, load generator (bare INSERT: PostgreSQL) |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|")?;
    let window = Duration::from_secs(args.seconds);
    let mut configs: Vec<(usize, bool)> = args.batches.iter().map(|b| (*b, false)).collect();
    configs.push((args.batches[0], true));
    for (batch, mixed) in configs {
        // Alternating rounds, medians: the machine is shared and noisy.
        let url = &stack.database_url;
        let mut rounds = Vec::new();
        for _ in 0..args.rounds {
            let copy = copy_ceiling(url, &procs, args.senders, batch, window, false).await?;
            let insert = copy_ceiling(url, &procs, args.senders, batch, window, true).await?;
            let ingest =
                ingest(&stack, &procs, &tenants, args.senders, batch, mixed, window).await?;
            rounds.push([
                copy.rate,
                insert.rate,
                ingest.rate,
                ingest.rate / copy.rate,
                ingest.rate / insert.rate,
                ingest.cpu.control_plane,
                ingest.cpu.postgres,
                ingest.cpu.generator,
                insert.cpu.postgres,
            ]);
        }
        let m: Vec<f64> = (0..9)
            .map(|i| median(rounds.iter().map(|r| r[i]).collect()))
            .collect();
        writeln!(
            report,
            "| {batch} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1}, {:.1}, {:.1} ({:.1}) |",
            if mixed { tenants.len() } else { 1 },
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5],
            m[6],
            m[7],
            m[8],
        )?;
        eprintln!("{report}");
    }

    // Export: one tenant with `export_entries` entries, filled with the largest batches.
    let big = tenant(&stack, "bench-export").await?;
    let fill = fill(&stack, &procs, &big, args.export_entries).await?;
    writeln!(
        report,
        "\nfill of the export tenant ({} entries, batches of {}, 2 senders, one tenant): {:.0} entries/s; CPU µs/entry {:.1}, {:.1}, {:.1}",
        fill.entries,
        ingest_batch_max(),
        fill.rate,
        fill.cpu.control_plane,
        fill.cpu.postgres,
        fill.cpu.generator
    )?;
    let checkpoint = stack
        .expect(
            &stack.bootstrap(),
            Method::POST,
            "/api/v1/audit/checkpoints",
            Some(json!({"tenant_id": big.id})),
            201,
        )
        .await?;
    let dir = integration_tests::target_dir().join("tmp/audit-bench");
    std::fs::create_dir_all(&dir)?;
    let export_path = dir.join("export.jsonl");
    let baseline = copy_out(&stack.database_url, big.id).await?;
    let export = export(&stack, &procs, big.id, &export_path).await?;
    writeln!(report, "\n### Export ({} entries, JSONL)\n", export.rows)?;
    writeln!(
        report,
        "| what | rows/s | ratio | bytes | control plane RSS before → peak during (MiB) |"
    )?;
    writeln!(report, "|---|---|---|---|---|")?;
    writeln!(
        report,
        "| PostgreSQL `COPY (SELECT …) TO STDOUT` (text) | {:.0} | 1.00 | {} | — |",
        baseline.rate, baseline.bytes
    )?;
    writeln!(
        report,
        "| `GET /api/v1/audit/export` | {:.0} | {:.2} | {} | {:.1} → {:.1} (VmHWM {:.1}) |",
        export.rate,
        export.rate / baseline.rate,
        export.bytes,
        export.rss_before_kib as f64 / 1024.0,
        export.rss_peak_kib as f64 / 1024.0,
        export.hwm_kib as f64 / 1024.0,
    )?;
    eprintln!("{report}");

    // Offline verification of that export, all checkpoints and HMAC keys.
    let checkpoints = stack
        .expect(
            &stack.bootstrap(),
            Method::GET,
            &format!("/api/v1/audit/checkpoints?tenant_id={}", big.id),
            None,
            200,
        )
        .await?;
    let keys = stack
        .expect(
            &stack.bootstrap(),
            Method::GET,
            "/api/v1/audit/public-key",
            None,
            200,
        )
        .await?;
    std::fs::write(dir.join("checkpoints.json"), checkpoints.body.to_string())?;
    std::fs::write(dir.join("keys.json"), keys.body.to_string())?;
    anyhow::ensure!(
        checkpoint.body["sequence_number"].as_i64() == Some(export.rows as i64),
        "checkpoint {} is not at the export's end ({} rows)",
        checkpoint.body,
        export.rows
    );
    let read = read_rate(&export_path)?;
    writeln!(
        report,
        "\n### Offline verification ({} entries, {} MB, HMAC keys and checkpoints)\n",
        export.rows,
        export.bytes / 1_000_000
    )?;
    writeln!(
        report,
        "| what | entries/s (median of {}) | ratio | CPU µs/entry | peak RSS (MiB) |\n|---|---|---|---|---|",
        args.rounds
    )?;
    let hmac = stack.control_plane.audit_keys.hmac_keys.clone();
    let (mut ones, mut alls, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut one_cpu, mut all_cpu, mut one_rss, mut all_rss) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..args.rounds {
        let one = verify(&dir, &export_path, &hmac, Some(1)).await?;
        let all = verify(&dir, &export_path, &hmac, None).await?;
        ratios.push(all.rate / one.rate);
        ones.push(one.rate);
        alls.push(all.rate);
        one_cpu.push(one.cpu_us_per_entry);
        all_cpu.push(all.cpu_us_per_entry);
        one_rss = one_rss.max(one.hwm_kib);
        all_rss = all_rss.max(all.hwm_kib);
    }
    writeln!(
        report,
        "| reading the file only | {:.0} | — | — | — |",
        export.rows as f64 / read.as_secs_f64()
    )?;
    writeln!(
        report,
        "| `chronoguard-audit-verify --threads 1` | {:.0} | 1.00 | {:.2} | {:.1} |",
        median(ones),
        median(one_cpu),
        one_rss as f64 / 1024.0
    )?;
    writeln!(
        report,
        "| `chronoguard-audit-verify` ({} threads) | {:.0} | {:.2} | {:.2} | {:.1} |",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        median(alls),
        median(ratios),
        median(all_cpu),
        all_rss as f64 / 1024.0
    )?;
    writeln!(
        report,
        "\nload average at end: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    )?;
    println!("{report}");
    if !args.keep_export {
        let _ = std::fs::remove_file(&export_path);
    }
    Ok(())
}

/// Batches of the export fill: the most that fits the control plane's 2 MB request body
/// limit with these entries (its `MAX_BATCH` of 10,000 does not).
fn ingest_batch_max() -> usize {
    2_000
}

async fn tenant(stack: &ApiStack, name: &str) -> anyhow::Result<Tenant> {
    let id: Uuid = stack.create_tenant(name).await?.parse()?;
    let token = stack.bootstrap();
    let mut agents = [Uuid::nil(); 2];
    for (i, agent) in agents.iter_mut().enumerate() {
        let answer = stack
            .expect(
                &token,
                Method::POST,
                "/api/v1/agents",
                Some(json!({
                    "tenant_id": id,
                    "name": format!("{name}-agent-{i}"),
                    "certificate_pem": certificate(&format!("{name}-agent-{i}"), -60, 3600)?,
                })),
                201,
            )
            .await?;
        *agent = integration_tests::stack::str_field(&answer.body, "id")?.parse()?;
    }
    Ok(Tenant {
        id,
        agents,
        policy: Uuid::new_v4(),
    })
}

// === CPU accounting ===

struct Procs {
    control_plane: u32,
    postmaster: u32,
}

#[derive(Clone, Copy, Default)]
struct Ticks {
    control_plane: u64,
    postgres: u64,
    generator: u64,
}

/// CPU µs per entry of a phase.
#[derive(Clone, Copy, Default)]
struct CpuPerEntry {
    control_plane: f64,
    postgres: f64,
    generator: f64,
}

fn postmaster_pid(dir: &Path) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(dir.join("data/postmaster.pid"))?;
    Ok(text.lines().next().unwrap_or_default().trim().parse()?)
}

/// `(utime + stime, cutime + cstime, ppid)` of a process, in clock ticks.
fn stat(pid: u32) -> Option<(u64, u64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields after the command: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    Some((n(11) + n(12), n(13) + n(14), n(1) as u32))
}

impl Procs {
    /// The control plane's CPU, PostgreSQL's (the postmaster with its reaped children,
    /// plus every live backend) and this process's.
    fn ticks(&self) -> Ticks {
        let mut postgres = stat(self.postmaster).map_or(0, |(own, reaped, _)| own + reaped);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if let Some((own, _, parent)) = stat(pid)
                    && parent == self.postmaster
                {
                    postgres += own;
                }
            }
        }
        Ticks {
            control_plane: stat(self.control_plane).map_or(0, |s| s.0),
            postgres,
            generator: stat(std::process::id()).map_or(0, |s| s.0),
        }
    }
}

impl Ticks {
    fn per_entry(self, before: Ticks, entries: u64) -> CpuPerEntry {
        // 100 ticks per second (`getconf CLK_TCK` on Linux).
        let us = |a: u64, b: u64| (a.saturating_sub(b) as f64 * 10_000.0) / entries.max(1) as f64;
        CpuPerEntry {
            control_plane: us(self.control_plane, before.control_plane),
            postgres: us(self.postgres, before.postgres),
            generator: us(self.generator, before.generator),
        }
    }
}

struct Rate {
    rate: f64,
    entries: u64,
    cpu: CpuPerEntry,
}

// === realistic content ===

const DOMAINS: [&str; 8] = [
    "api.openai.com",
    "github.com",
    "pypi.org",
    "registry.npmjs.org",
    "s3.amazonaws.com",
    "www.googleapis.com",
    "blocked.example",
    "hooks.slack.com",
];

/// The request facts of entry `n`: domain, path, decision, reason (90% allowed).
fn facts(n: u64) -> (&'static str, String, &'static str, &'static str) {
    let domain = DOMAINS[(n % DOMAINS.len() as u64) as usize];
    let path = format!("/v1/items/{}", n % 977);
    if n % 10 == 9 {
        (domain, path, "deny", "domain_blocked")
    } else {
        (domain, path, "allow", "domain_allowed")
    }
}

const FINGERPRINT: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// An ingest body of `count` entries spread over `tenants` (the filter's format).
fn batch_body(tenants: &[&Tenant], count: usize, counter: &AtomicU64) -> String {
    let mut body = String::with_capacity(count * 520 + 64);
    let _ = write!(body, r#"{{"batch_id":"{}","entries":["#, Uuid::new_v4());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for i in 0..count {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let tenant = tenants[i % tenants.len()];
        let agent = tenant.agents[(n % 2) as usize];
        let (domain, path, decision, reason) = facts(n);
        if i > 0 {
            body.push(',');
        }
        let _ = write!(
            body,
            r#"{{"decision_id":"{}","timestamp_ns":{},"tenant_id":"{}","agent_id":"{agent}","agent_fingerprint":"{FINGERPRINT}","agent_subject":"CN=bench-agent-{},O=ChronoGuard Bench","domain":"{domain}","method":"GET","path":"{path}","user_agent":"python-requests/2.32.3","source_ip":"10.1.{}.{}","decision":"{decision}","reason":"{reason}","policy_id":"{}","config_version":"{}"}}"#,
            Uuid::new_v4(),
            now + i as u64,
            tenant.id,
            n % 2,
            (n / 256) % 256,
            n % 256,
            tenant.policy,
            7 + n / 100_000,
        );
    }
    body.push_str("]}");
    body
}

// === ingest over HTTP ===

async fn ingest(
    stack: &ApiStack,
    procs: &Procs,
    tenants: &[Tenant],
    senders: usize,
    batch: usize,
    mixed: bool,
    window: Duration,
) -> anyhow::Result<Rate> {
    let ids: Vec<Uuid> = tenants.iter().map(|t| t.id).collect();
    let count = || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_entries WHERE tenant_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&stack.db)
    };
    let rows_before = count().await?;
    let counter = Arc::new(AtomicU64::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let url = stack.control_plane.url("/api/v1/audit/batches");
    let token = stack.control_plane.ingest_token.clone();
    let before = procs.ticks();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let group: Vec<&Tenant> = if mixed {
            tenants.iter().collect()
        } else {
            vec![&tenants[s % tenants.len()]]
        };
        // Bodies are built here, before the task, for the first request; then in the loop.
        let owned: Vec<Tenant> = group
            .iter()
            .map(|t| Tenant {
                id: t.id,
                agents: t.agents,
                policy: t.policy,
            })
            .collect();
        let (counter, stored, stop) = (counter.clone(), stored.clone(), stop.clone());
        let (url, token, http) = (url.clone(), token.clone(), stack.http.clone());
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&Tenant> = owned.iter().collect();
            while !stop.load(Ordering::Relaxed) {
                let body = batch_body(&refs, batch, &counter);
                let n = post_batch(&http, &url, &token, body).await?;
                stored.fetch_add(n, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let entries = stored.load(Ordering::Relaxed);
    let cpu = procs.ticks().per_entry(before, entries);
    // Nothing lost or doubled: exactly the acknowledged entries are in the database.
    let rows_after = count().await?;
    anyhow::ensure!(
        (rows_after - rows_before) as u64 == entries,
        "{entries} entries acknowledged, {} stored",
        rows_after - rows_before
    );
    Ok(Rate {
        rate: entries as f64 / elapsed.as_secs_f64(),
        entries,
        cpu,
    })
}

/// Fills `tenant` with `entries` entries in the largest batches, two senders.
async fn fill(
    stack: &ApiStack,
    procs: &Procs,
    tenant: &Tenant,
    entries: usize,
) -> anyhow::Result<Rate> {
    let batch = ingest_batch_max();
    let batches = entries.div_ceil(batch);
    let counter = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let url = stack.control_plane.url("/api/v1/audit/batches");
    let token = stack.control_plane.ingest_token.clone();
    let before = procs.ticks();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let owned = Tenant {
            id: tenant.id,
            agents: tenant.agents,
            policy: tenant.policy,
        };
        let (counter, next) = (counter.clone(), next.clone());
        let (url, token, http) = (url.clone(), token.clone(), stack.http.clone());
        tasks.push(tokio::spawn(async move {
            let mut stored = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= batches {
                    return anyhow::Ok(stored);
                }
                let count = batch.min(entries - i * batch);
                let body = batch_body(&[&owned], count, &counter);
                stored += post_batch(&http, &url, &token, body).await?;
            }
        }));
    }
    let mut stored = 0;
    for task in tasks {
        stored += task.await??;
    }
    let elapsed = started.elapsed();
    Ok(Rate {
        rate: stored as f64 / elapsed.as_secs_f64(),
        entries: stored,
        cpu: procs.ticks().per_entry(before, stored),
    })
}

// === the bare COPY ceiling ===

/// `COPY` of `batch`-row batches of audit rows (binary format, one transaction each) from
/// `senders` connections into a fresh copy of `audit_entries` (same columns, indexes and
/// constraints): what PostgreSQL can take here, with no chaining, HTTP or JSON.
async fn copy_ceiling(
    database_url: &str,
    procs: &Procs,
    senders: usize,
    batch: usize,
    window: Duration,
    insert: bool,
) -> anyhow::Result<Rate> {
    let mut admin = sqlx::PgConnection::connect(database_url).await?;
    // Partitioned like `audit_entries` when it is (all rows land in one partition, as
    // they do in this week's), so the ceiling pays for tuple routing too.
    let partitioned: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table
                        WHERE partrelid = 'audit_entries'::regclass)",
    )
    .fetch_one(&mut admin)
    .await?;
    sqlx::raw_sql(if partitioned {
        "DROP TABLE IF EXISTS audit_copy_ceiling;
         CREATE TABLE audit_copy_ceiling (LIKE audit_entries INCLUDING ALL)
            PARTITION BY RANGE (ts);
         CREATE TABLE audit_copy_ceiling_default PARTITION OF audit_copy_ceiling DEFAULT;"
    } else {
        "DROP TABLE IF EXISTS audit_copy_ceiling;
         CREATE TABLE audit_copy_ceiling (LIKE audit_entries INCLUDING ALL)"
    })
    .execute(&mut admin)
    .await?;
    let mut conns = Vec::new();
    for _ in 0..senders {
        conns.push(sqlx::PgConnection::connect(database_url).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let before = procs.ticks();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (s, mut conn) in conns.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let tenant = Uuid::new_v4();
            let agents = [Uuid::new_v4(), Uuid::new_v4()];
            let mut seq = 0i64;
            while !stop.load(Ordering::Relaxed) {
                if insert {
                    insert_rows(&mut conn, tenant, &agents, &mut seq, batch, s as u64).await?;
                    continue;
                }
                let rows = copy_rows(tenant, &agents, &mut seq, batch, s as u64);
                let mut copy = conn
                    .copy_in_raw(
                        "COPY audit_copy_ceiling (tenant_id, sequence_number, entry_id,
                         timestamp_ns, ts, kind, agent_id, agent_fingerprint, agent_subject,
                         domain, method, path, user_agent, source_ip, decision, reason,
                         policy_id, config_version, previous_hash, current_hash,
                         signature_key_id, signature) FROM STDIN (FORMAT binary)",
                    )
                    .await?;
                copy.send(rows).await?;
                copy.finish().await?;
            }
            anyhow::Ok((seq as u64, conn))
        }));
    }
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    let mut rows = 0;
    let mut conns = Vec::new();
    for task in tasks {
        let (n, conn) = task.await??;
        rows += n;
        conns.push(conn);
    }
    let elapsed = started.elapsed();
    let cpu = procs.ticks().per_entry(before, rows);
    for conn in conns {
        conn.close().await?;
    }
    sqlx::raw_sql("DROP TABLE audit_copy_ceiling")
        .execute(&mut admin)
        .await?;
    Ok(Rate {
        rate: rows as f64 / elapsed.as_secs_f64(),
        entries: rows,
        cpu,
    })
}

/// `count` rows in PostgreSQL's binary COPY format, shaped like the control plane's.
fn copy_rows(tenant: Uuid, agents: &[Uuid; 2], seq: &mut i64, count: usize, salt: u64) -> Vec<u8> {
    fn len(b: &mut Vec<u8>, n: usize) {
        b.extend_from_slice(&(n as i32).to_be_bytes());
    }
    fn text(b: &mut Vec<u8>, s: &str) {
        len(b, s.len());
        b.extend_from_slice(s.as_bytes());
    }
    fn int8(b: &mut Vec<u8>, v: i64) {
        len(b, 8);
        b.extend_from_slice(&v.to_be_bytes());
    }
    fn uuid(b: &mut Vec<u8>, v: Uuid) {
        len(b, 16);
        b.extend_from_slice(v.as_bytes());
    }
    let mut b = Vec::with_capacity(19 + count * 640);
    b.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    b.extend_from_slice(&[0; 8]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let policy = Uuid::from_u128(7).to_string();
    for _ in 0..count {
        *seq += 1;
        let n = *seq as u64 * 31 + salt;
        let (domain, path, decision, reason) = facts(n);
        let hash = hex::encode(sha2::Sha256::digest(n.to_be_bytes()));
        b.extend_from_slice(&22i16.to_be_bytes());
        uuid(&mut b, tenant);
        int8(&mut b, *seq);
        uuid(&mut b, Uuid::new_v4());
        int8(&mut b, now);
        int8(&mut b, now / 1000 - 946_684_800_000_000);
        text(&mut b, "decision");
        uuid(&mut b, agents[(n % 2) as usize]);
        text(&mut b, FINGERPRINT);
        text(
            &mut b,
            &format!("CN=bench-agent-{},O=ChronoGuard Bench", n % 2),
        );
        text(&mut b, domain);
        text(&mut b, "GET");
        text(&mut b, &path);
        text(&mut b, "python-requests/2.32.3");
        text(&mut b, &format!("10.1.{}.{}", (n / 256) % 256, n % 256));
        text(&mut b, decision);
        text(&mut b, reason);
        text(&mut b, &policy);
        text(&mut b, "7");
        text(&mut b, &hash);
        text(&mut b, &hash);
        text(&mut b, "hmac-bench");
        text(&mut b, &hash);
    }
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b
}

use sha2::Digest as _;

/// The same rows as [`copy_rows`] as one multi-row `INSERT … SELECT FROM UNNEST(…)`, the
/// statement the control plane uses.
async fn insert_rows(
    conn: &mut sqlx::PgConnection,
    tenant: Uuid,
    agents: &[Uuid; 2],
    seq: &mut i64,
    count: usize,
    salt: u64,
) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let policy = Uuid::from_u128(7).to_string();
    let first = *seq + 1;
    *seq += count as i64;
    let ns: Vec<u64> = (first..=*seq).map(|q| q as u64 * 31 + salt).collect();
    let hashes: Vec<String> = ns
        .iter()
        .map(|n| hex::encode(sha2::Sha256::digest(n.to_be_bytes())))
        .collect();
    let texts = |f: &dyn Fn(u64) -> String| ns.iter().map(|n| f(*n)).collect::<Vec<String>>();
    sqlx::query(
        "INSERT INTO audit_copy_ceiling (tenant_id, sequence_number, entry_id, timestamp_ns, ts,
            kind, agent_id, agent_fingerprint, agent_subject, domain, method, path, user_agent,
            source_ip, decision, reason, policy_id, config_version, previous_hash, current_hash,
            signature_key_id, signature)
         SELECT $1, s, e, $4, to_timestamp($4 / 1e9), 'decision', a, fp, sub, d, 'GET', p, ua,
            ip, dec, r, $13, '7', ph, ch, 'hmac-bench', ch
         FROM UNNEST($2::bigint[], $3::uuid[], $5::uuid[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::text[], $11::text[], $12::text[], $14::text[], $15::text[],
            $16::text[])
            AS x(s, e, a, fp, sub, d, p, ip, dec, r, ph, ch, ua)",
    )
    .bind(tenant)
    .bind((first..=*seq).collect::<Vec<i64>>())
    .bind((0..count).map(|_| Uuid::new_v4()).collect::<Vec<_>>())
    .bind(now)
    .bind(
        ns.iter()
            .map(|n| agents[(n % 2) as usize])
            .collect::<Vec<_>>(),
    )
    .bind(texts(&|_| FINGERPRINT.to_owned()))
    .bind(texts(&|n| {
        format!("CN=bench-agent-{},O=ChronoGuard Bench", n % 2)
    }))
    .bind(texts(&|n| facts(n).0.to_owned()))
    .bind(texts(&|n| facts(n).1))
    .bind(texts(&|n| format!("10.1.{}.{}", (n / 256) % 256, n % 256)))
    .bind(texts(&|n| facts(n).2.to_owned()))
    .bind(texts(&|n| facts(n).3.to_owned()))
    .bind(&policy)
    .bind(&hashes)
    .bind(&hashes)
    .bind(texts(&|_| "python-requests/2.32.3".to_owned()))
    .execute(conn)
    .await?;
    Ok(())
}

// === export ===

struct Exported {
    rows: u64,
    bytes: u64,
    rate: f64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    hwm_kib: u64,
}

/// A field of `/proc/PID/status` in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn export(
    stack: &ApiStack,
    procs: &Procs,
    tenant: Uuid,
    path: &Path,
) -> anyhow::Result<Exported> {
    use tokio::io::AsyncWriteExt as _;
    let pid = procs.control_plane;
    // Resets the peak (VmHWM) so it covers the export only.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let rss_before_kib = status_kib(pid, "VmRSS:");
    let peak = Arc::new(AtomicU64::new(rss_before_kib));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let mut response = stack
        .http
        .get(stack.control_plane.url(&format!(
            "/api/v1/audit/export?tenant_id={tenant}&format=jsonl"
        )))
        .bearer_auth(stack.bootstrap())
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "export: {}",
        response.status()
    );
    let mut file =
        tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::create(path).await?);
    let (mut bytes, mut rows) = (0u64, 0u64);
    while let Some(chunk) = response.chunk().await? {
        bytes += chunk.len() as u64;
        rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.await?;
    Ok(Exported {
        rows,
        bytes,
        rate: rows as f64 / elapsed.as_secs_f64(),
        rss_before_kib,
        rss_peak_kib: peak.load(Ordering::Relaxed),
        hwm_kib: status_kib(pid, "VmHWM:"),
    })
}

struct CopiedOut {
    rate: f64,
    bytes: u64,
}

/// PostgreSQL's own export of the same rows and join, in sequence order.
async fn copy_out(database_url: &str, tenant: Uuid) -> anyhow::Result<CopiedOut> {
    use futures::StreamExt as _;
    let mut conn = sqlx::PgConnection::connect(database_url).await?;
    let started = Instant::now();
    let statement = format!(
        "COPY (SELECT e.*, c.head_hash, c.created_at_ns, c.key_id, c.signature
               FROM audit_entries e LEFT JOIN audit_checkpoints c
               ON c.tenant_id = e.tenant_id AND c.sequence_number = e.sequence_number
               WHERE e.tenant_id = '{tenant}' ORDER BY e.sequence_number) TO STDOUT"
    );
    let mut stream = conn.copy_out_raw(&statement).await?;
    let (mut bytes, mut rows) = (0u64, 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    drop(stream);
    Ok(CopiedOut {
        rate: rows as f64 / started.elapsed().as_secs_f64(),
        bytes,
    })
}

// === offline verification ===

struct Verified {
    rate: f64,
    cpu_us_per_entry: f64,
    hwm_kib: u64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn read_rate(path: &Path) -> anyhow::Result<Duration> {
    use std::io::Read as _;
    let started = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    while file.read(&mut buf)? > 0 {}
    Ok(started.elapsed())
}

fn verifier_binary() -> PathBuf {
    std::env::var_os("CHRONOGUARD_AUDIT_VERIFY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            integration_tests::control_plane::binary().with_file_name("chronoguard-audit-verify")
        })
}

async fn verify(
    dir: &Path,
    export: &Path,
    hmac_keys: &str,
    threads: Option<usize>,
) -> anyhow::Result<Verified> {
    let mut cmd = tokio::process::Command::new(verifier_binary());
    cmd.arg("--export")
        .arg(export)
        .arg("--checkpoints")
        .arg(dir.join("checkpoints.json"))
        .arg("--public-keys")
        .arg(dir.join("keys.json"))
        .env("CHRONOGUARD_AUDIT_HMAC_KEYS", hmac_keys)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(threads) = threads {
        cmd.arg("--threads").arg(threads.to_string());
    }
    let started = Instant::now();
    let child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let hwm = Arc::new(AtomicU64::new(0));
    let ticks = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Sampled until it exits (the last 10 ms of CPU may be missed).
    let sampler = {
        let (hwm, ticks, done) = (hwm.clone(), ticks.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                hwm.fetch_max(status_kib(pid, "VmHWM:"), Ordering::Relaxed);
                ticks.fetch_max(stat(pid).map_or(0, |s| s.0), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let out = child.wait_with_output().await?;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.await?;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    anyhow::ensure!(
        out.status.success() && report["outcome"]["ok"] == true,
        "verification failed ({}): {report} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let checked = report["outcome"]["entries_checked"].as_u64().unwrap_or(0);
    anyhow::ensure!(
        report["outcome"]["signatures_checked"].as_u64() == Some(checked),
        "not every signature was checked: {report}"
    );
    Ok(Verified {
        rate: checked as f64 / elapsed.as_secs_f64(),
        cpu_us_per_entry: ticks.load(Ordering::Relaxed) as f64 * 10_000.0 / checked.max(1) as f64,
        hwm_kib: hwm.load(Ordering::Relaxed),
    })
}

/// POSTs one ingest body; the entries stored (anything but 201 is an error).
async fn post_batch(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: String,
) -> anyhow::Result<u64> {
    let response = http
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    anyhow::ensure!(status.as_u16() == 201, "ingest answered {status}: {answer}");
    Ok(answer["stored"].as_u64().unwrap_or(0))
}
