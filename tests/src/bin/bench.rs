//! `cargo xtask bench`: Envoy CPU per request and throughput, plain Envoy vs Envoy with
//! the ChronoGuard filter, measured in one run, plus start-to-ready and module size.
//!
//! Method (as in the project's perf anchors): Envoy with `--concurrency 1` pinned to CPU 0;
//! the load generator (this process, mTLS keep-alive connections), the upstream and the
//! control plane on CPU 1. CPU per request = Δ(utime + stime) of the Envoy process over the
//! measured window ÷ requests served. Results are printed as a Markdown table.

use filter_core::config::ConfigRead;
use integration_tests::client::H1Pool;
use integration_tests::{Stack, StackOptions};
use serde_json::json;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One measured run: variant, Envoy CPU µs per request, requests per second, start-to-ready.
/// A CPU window: variant, Envoy CPU µs per request, requests per second, start-to-ready,
/// round.
type Row = (String, f64, f64, Duration, usize);

/// A filter build to measure: its name and module. `CHRONOGUARD_BENCH_STAGES` (set by
/// `cargo xtask bench`) lists the stage builds as `name=path,...` in request-path order;
/// the real module comes last as `chronoguard`.
fn filter_variants() -> anyhow::Result<Vec<(String, std::path::PathBuf)>> {
    let mut out = Vec::new();
    for item in std::env::var("CHRONOGUARD_BENCH_STAGES")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (name, path) = item
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("CHRONOGUARD_BENCH_STAGES item {item:?}"))?;
        out.push((name.to_owned(), path.into()));
    }
    out.push(("chronoguard".to_owned(), integration_tests::envoy::wasm()));
    Ok(out)
}

struct Args {
    seconds: u64,
    connections: usize,
    agents: usize,
    policies: usize,
    rounds: usize,
    changes: usize,
    /// Length of each round's open-loop latency window at 1,000 req/s.
    latency_seconds: u64,
    /// Length of each push-stall window (without, then with a push every 250 ms).
    stall_seconds: u64,
    /// Requests per window of the instruction count ([`instructions`]); 0: the CPU
    /// rounds and the rest instead.
    instructions: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut out = Args {
        seconds: 8,
        connections: 16,
        agents: 1000,
        policies: 100,
        rounds: 2,
        changes: 100,
        latency_seconds: 3,
        stall_seconds: 5,
        instructions: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: usize = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?
            .parse()?;
        match flag.as_str() {
            "--seconds" => out.seconds = value as u64,
            "--connections" => out.connections = value,
            "--agents" => out.agents = value,
            "--policies" => out.policies = value,
            "--rounds" => out.rounds = value,
            "--changes" => out.changes = value,
            "--latency-seconds" => out.latency_seconds = value as u64,
            "--stall-seconds" => out.stall_seconds = value as u64,
            "--instructions" => out.instructions = value as u64,
            other => anyhow::bail!(
                "unknown flag {other} (--seconds --connections --agents --policies --rounds --changes --latency-seconds --stall-seconds --instructions)"
            ),
        }
    }
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    pin(std::process::id(), "1");
    let filters = filter_variants()?;
    // Envoy and the control plane load the module from this path; each variant's module is
    // copied over it before Envoy restarts.
    let module =
        std::env::temp_dir().join(format!("chronoguard-bench-{}.wasm", std::process::id()));
    std::fs::copy(integration_tests::envoy::wasm(), &module)?;
    let mut stack = Stack::start(StackOptions {
        concurrency: 1,
        wasm: Some(module.clone()),
        ..StackOptions::default()
    })
    .await?;
    let tenant = stack.create_tenant("bench").await?;
    let (agent, policy0) = seed(&stack, &tenant, &args).await?;
    let client = stack.agent_client(Some(&agent))?;
    let ready = integration_tests::wait_for("bench policy", Duration::from_secs(30), || async {
        let r = stack
            .request(&client, "allowed-0.example", "/")
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    ready?;
    if args.instructions > 0 {
        return instructions(&mut stack, &agent, &filters, &module, args.instructions).await;
    }
    if let Some(path) = std::env::var_os("CHRONOGUARD_BENCH_CONFIG_DUMP") {
        // The configuration Envoy received, for offline `on_configure` timing
        // (`CHRONOGUARD_PLUGIN_CONFIG` of `filter/core/tests/configure_timing.rs`).
        std::fs::write(path, plugin_configuration(&stack).await?)?;
    }
    let bundle_bytes: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&stack.db)
        .await?;

    let mut rows: Vec<Row> = Vec::new();
    // Variant, p50, p99, round.
    let mut latencies: Vec<(String, f64, f64, usize)> = Vec::new();
    // Variant, round, (p50, p99, max) of the gateway listener and of its twin without
    // the filter, measured interleaved in one window.
    type Percentiles = (f64, f64, f64);
    // [all requests, the allowed ones only] × [gateway, twin].
    let mut twins: Vec<(String, usize, [[Percentiles; 2]; 2])> = Vec::new();
    // Variant, CPU per request on the gateway listener minus on its twin, and the ratio
    // of their throughputs, same process.
    let mut same_process: Vec<(String, f64, f64)> = Vec::new();
    let variants: Vec<(String, Option<&std::path::Path>)> =
        std::iter::once(("plain".to_owned(), None))
            .chain(filters.iter().map(|(n, p)| (n.clone(), Some(p.as_path()))))
            .collect();
    // The variant the running Envoy has.
    let mut loaded = String::new();
    for round in 0..args.rounds {
        // Plain Envoy first, then the modules, in reverse order every other round: a drift
        // of the machine within a round then touches every module alike.
        let mut order: Vec<&(String, Option<&std::path::Path>)> = variants.iter().collect();
        if round % 2 == 1
            && let Some(modules) = order.get_mut(1..)
        {
            modules.reverse();
        }
        for (variant, path) in order {
            let variant = variant.as_str();
            loaded = variant.to_owned();
            if let Some(path) = path {
                std::fs::copy(path, &module)?;
            }
            let start_to_ready = restart(&mut stack, path.is_none()).await?;
            pin(stack.envoy.pid(), "0");
            // Everything else the run needs (control plane, PostgreSQL, Redis) shares CPU 1
            // with the load generator, so Envoy has CPU 0 to itself.
            for pid in backend_pids()? {
                pin(pid, "1");
            }
            let client = stack.agent_client(Some(&agent))?;
            // Warm up connections and caches.
            load(&stack, &client, args.connections, Duration::from_secs(1)).await;
            // Optional CPU profile of Envoy over the measured window (`perf record`, for
            // offline attribution: `CHRONOGUARD_BENCH_PERF=<dir>`).
            let perf = std::env::var_os("CHRONOGUARD_BENCH_PERF").map(|dir| {
                let out = std::path::Path::new(&dir).join(format!("{variant}-{round}.data"));
                Command::new("perf")
                    .args(["record", "-e", "cpu-clock", "-F", "4000", "-g", "-p"])
                    .arg(stack.envoy.pid().to_string())
                    .arg("-o")
                    .arg(out)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
            });
            // Asked for and not possible (no `perf`): say so rather than run without it.
            let perf = perf.transpose()?;
            let cpu0 = cpu_ticks(stack.envoy.pid())?;
            let (requests, errors, elapsed) = load(
                &stack,
                &client,
                args.connections,
                Duration::from_secs(args.seconds),
            )
            .await;
            let cpu1 = cpu_ticks(stack.envoy.pid())?;
            if let Some(perf) = perf {
                stop(perf);
            }
            let cpu_us = (cpu1 - cpu0) as f64 * 1e6 / ticks_per_second() / requests.max(1) as f64;
            let rps = requests as f64 / elapsed.as_secs_f64();
            println!(
                "round {round} {variant}: {requests} requests ({errors} errors), {rps:.0} req/s, {cpu_us:.1} µs Envoy CPU/request, start-to-ready {start_to_ready:?}"
            );
            rows.push((variant.to_owned(), cpu_us, rps, start_to_ready, round));
            let pool = pool(&stack, &agent, false).await?;
            let (p50, p99, _) = open_loop_dump(
                &stack,
                &pool,
                Duration::from_secs(args.latency_seconds),
                &format!("{variant}-{round}"),
            )
            .await?;
            println!(
                "round {round} {variant}: at 1,000 req/s (open loop) p50 {p50:.3} ms, p99 {p99:.3} ms"
            );
            latencies.push((variant.to_owned(), p50, p99, round));
            let measured =
                interleaved(&stack, &agent, Duration::from_secs(args.latency_seconds)).await?;
            let [[gateway, twin], [allowed, twin_allowed]] = measured;
            println!(
                "round {round} {variant}: interleaved with the twin listener without the filter, 1,000 req/s each: p50 {:.3} / {:.3} ms, p99 {:.3} / {:.3} ms, max {:.3} / {:.3} ms (gateway / twin); allowed requests only: p99 {:.3} / {:.3} ms",
                gateway.0, twin.0, gateway.1, twin.1, gateway.2, twin.2, allowed.1, twin_allowed.1
            );
            twins.push((variant.to_owned(), round, measured));
            let [(gateway, gateway_rps), (twin, twin_rps)] =
                cpu_against_twin(&stack, &client, args.connections, 3, 2).await?;
            println!(
                "round {round} {variant}: in the same Envoy, 3 × 2 s per listener in turns: {gateway:.1} µs Envoy CPU/request on the gateway listener, {twin:.1} on the twin without the filter ({:+.1}); {gateway_rps:.0} / {twin_rps:.0} req/s ({:.3}×)",
                gateway - twin,
                gateway_rps / twin_rps
            );
            same_process.push((variant.to_owned(), gateway - twin, gateway_rps / twin_rps));
            if variant == "chronoguard" && round == 0 {
                let stats = stack
                    .http
                    .get(stack.envoy.admin("/stats?filter=wasmcustom.chronoguard"))
                    .send()
                    .await?
                    .text()
                    .await?;
                for line in stats
                    .lines()
                    .filter(|l| !l.contains("P0(") || l.contains("evaluation_us"))
                {
                    println!("    {line}");
                }
            }
        }
    }
    let row_median =
        |variant: &str, f: &dyn Fn(&Row) -> f64| median_where(&rows, |r| r.0 == variant, f);
    let latency = |variant: &str, pick: fn(&(String, f64, f64, usize)) -> f64| {
        median_where(&latencies, |l| l.0 == variant, pick)
    };
    let (pc, pr) = (row_median("plain", &|r| r.1), row_median("plain", &|r| r.2));
    let (p50, p99) = (latency("plain", |l| l.1), latency("plain", |l| l.2));
    println!(
        "\n| variant | Envoy CPU µs/req | added | of which this stage | req/s (1 worker, {} conns) | vs plain | start-to-ready | p50 / p99 at 1,000 req/s |",
        args.connections
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut previous = pc;
    for (variant, _) in &variants {
        let (c, r) = (row_median(variant, &|r| r.1), row_median(variant, &|r| r.2));
        let s = row_median(variant, &|r| r.3.as_secs_f64());
        let (l50, l99) = (latency(variant, |l| l.1), latency(variant, |l| l.2));
        let added = if variant == "plain" {
            "—".to_owned()
        } else {
            format!("{:+.1}", c - pc)
        };
        let stage = if variant == "plain" {
            "—".to_owned()
        } else {
            format!("{:+.1}", c - previous)
        };
        println!(
            "| {variant} | {c:.1} | {added} | {stage} | {r:.0} | {:.2}× | {:.0} ms | {l50:.3} / {l99:.3} ms ({:+.3} / {:+.3}) |",
            r / pr,
            s * 1e3,
            l50 - p50,
            l99 - p99,
        );
        previous = c;
    }
    // The same comparison paired by round (each variant against plain Envoy measured
    // minutes apart in the same round): steadier than the difference of medians when the
    // machine's speed drifts between rounds.
    let paired = |variant: &str, value: &dyn Fn(&str, usize) -> Option<f64>| {
        let d: Vec<f64> = (0..args.rounds)
            .filter_map(|round| Some(value(variant, round)? - value("plain", round)?))
            .collect();
        median(&d)
    };
    for (variant, _) in variants.iter().filter(|(n, _)| n != "plain") {
        let cpu = paired(variant, &|v, round| {
            rows.iter().find(|r| r.0 == v && r.4 == round).map(|r| r.1)
        });
        let p99 = paired(variant, &|v, round| {
            latencies
                .iter()
                .find(|l| l.0 == v && l.3 == round)
                .map(|l| l.2)
        });
        println!(
            "{variant}, paired by round (median of the per-round differences to plain): {cpu:+.1} µs/request, p99 at 1,000 req/s {p99:+.3} ms"
        );
    }
    // The same latency, interleaved: the gateway listener against its twin without the
    // filter in the same window (for plain Envoy both are without it: the method's own
    // error).
    println!(
        "\nlatency at 1,000 req/s, interleaved with the twin listener without the filter (1,000 req/s each, {} s per round); the gateway listener minus the twin, per round, and the median:",
        args.latency_seconds
    );
    // The filter answers the denied tenth itself, without the upstream (which shares the
    // load generator's CPU): those requests are quick on the gateway listener and not on
    // the twin, which flatters the gateway's percentiles. The allowed requests take the
    // same path on both listeners.
    for (which, label) in [(0, "all requests"), (1, "allowed requests only")] {
        println!("  {label}:");
        for (variant, _) in &variants {
            let (mut p50, mut p99) = (Vec::new(), Vec::new());
            for (_, _, measured) in twins.iter().filter(|t| &t.0 == variant) {
                let [gateway, twin] = measured[which];
                p50.push(gateway.0 - twin.0);
                p99.push(gateway.1 - twin.1);
            }
            let rounds: Vec<String> = p99.iter().map(|d| format!("{d:+.3}")).collect();
            println!(
                "    {variant}: p99 added per round {} ms; median p50 added {:+.3} ms, p99 added {:+.3} ms",
                rounds.join(", "),
                median(&p50),
                median(&p99),
            );
        }
    }
    println!(
        "\nEnvoy CPU per request added, measured in one Envoy process against the twin listener without the filter (per round, and the median; plain Envoy: the method's own error):"
    );
    for (variant, _) in &variants {
        let rounds: Vec<String> = same_process
            .iter()
            .filter(|s| &s.0 == variant)
            .map(|s| format!("{:+.1}", s.1))
            .collect();
        println!(
            "  {variant}: {} µs; median {:+.1} µs; throughput against the twin, median {:.3}×",
            rounds.join(", "),
            median_where(&same_process, |s| &s.0 == variant, |s| s.1),
            median_where(&same_process, |s| &s.0 == variant, |s| s.2)
        );
    }
    let wasm = std::fs::metadata(integration_tests::envoy::wasm())?.len();
    println!(
        "\nagents in bundle: {bundle_bytes}; policies: {}; module after wasm-opt: {wasm} bytes; medians of {} rounds of {} s",
        args.policies, args.rounds, args.seconds
    );
    guest_times(&stack, &agent.fingerprint, &filters, args.rounds.max(3)).await?;
    // Push stalls of each module compared in this run (`--compare`), each in a fresh
    // Envoy, so that before and after are measured minutes apart on the same machine; the
    // current module last (the sections below run on it).
    let modules: Vec<&(String, std::path::PathBuf)> = filters
        .iter()
        .filter(|(name, _)| !STAGES.contains(&name.as_str()))
        .collect();
    for (name, path) in &modules {
        // Each module in a fresh Envoy when there are several; otherwise only if the
        // last round left another variant (a stage, or plain Envoy) in place.
        if modules.len() > 1 || loaded != *name {
            std::fs::copy(path, &module)?;
            restart(&mut stack, false).await?;
            let client = stack.agent_client(Some(&agent))?;
            integration_tests::wait_for(name, Duration::from_secs(30), || async {
                let r = stack
                    .request(&client, "allowed-0.example", "/")
                    .await
                    .ok()?;
                (r.status == 200).then_some(())
            })
            .await?;
        }
        let from = std::fs::metadata(&stack.envoy.log).map_or(0, |m| m.len() as usize);
        stall(&stack, &agent, policy0, name, args.stall_seconds).await?;
        let log = std::fs::read(&stack.envoy.log).unwrap_or_default();
        configure_summary(&String::from_utf8_lossy(
            log.get(from..).unwrap_or_default(),
        ));
    }
    memo_churn(&stack, &agent, policy0).await?;
    memo_across_pushes(&stack, &agent, policy0).await?;
    propagation(&stack, &agent, policy0, &args).await
}

/// The request-path stages `cargo xtask bench` builds modules for (`--stages`); the other
/// modules of a run are whole filters compared with this one (`--compare`).
const STAGES: [&str; 6] = ["noop", "facts", "decide", "limit", "audit", "header"];

/// Guest time per request of every module of the run, outside Envoy: Node's V8 with
/// TurboFan only (as Envoy runs it) under the minimal proxy-wasm host of
/// `tests/guest/host.cjs`, with the configuration Envoy received and the CPU rounds' load.
/// It includes that host's own share (the same for every module), so modules are compared
/// with each other in the same run, not read absolutely; at ±0.05 µs it resolves what a
/// round in Envoy (±5 µs) cannot.
async fn guest_times(
    stack: &Stack,
    fingerprint: &str,
    filters: &[(String, std::path::PathBuf)],
    rounds: usize,
) -> anyhow::Result<()> {
    let configuration = plugin_configuration(stack).await?;
    let config = std::env::temp_dir().join(format!(
        "chronoguard-bench-config-{}.json",
        std::process::id()
    ));
    std::fs::write(&config, configuration)?;
    let host = concat!(env!("CARGO_MANIFEST_DIR"), "/guest/host.cjs");
    // Per module: its name, then per round µs per request, compile ms, µs per memo miss.
    type Times = (String, Vec<f64>, Vec<f64>, Vec<f64>);
    let mut times: Vec<Times> = filters
        .iter()
        .map(|(name, _)| (name.clone(), Vec::new(), Vec::new(), Vec::new()))
        .collect();
    // Rounds interleave the modules, so a drift of the machine's speed touches all alike.
    for _ in 0..rounds {
        for ((_, path), (name, us, compile, miss)) in filters.iter().zip(times.iter_mut()) {
            // The bench's load (memo hits), then memo misses: one Rego evaluation each.
            for (misses, requests) in [(false, "300000"), (true, "1000")] {
                let out = Command::new("node")
                    .args(["--no-liftoff", "--no-wasm-lazy-compilation", host])
                    .arg(path)
                    .arg(&config)
                    .args([fingerprint, requests])
                    .env("CHRONOGUARD_GUEST_MISSES", if misses { "1" } else { "0" })
                    .output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "guest run of {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let number = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
                if misses {
                    miss.push(number("us_per_request"));
                } else {
                    us.push(number("us_per_request"));
                    compile.push(number("compile_ms"));
                }
            }
        }
    }
    let _ = std::fs::remove_file(&config);
    let Some((first, first_us)) = times
        .first()
        .map(|(name, us, _, _)| (name.clone(), median(us)))
    else {
        return Ok(());
    };
    println!(
        "\nguest time per request outside Envoy (Node's V8, TurboFan only, tests/guest/host.cjs; medians of {rounds} runs of 300,000 requests, and of 1,000 memo misses: a domain per request that no policy lists)"
    );
    println!(
        "| module | µs/request (guest + the host's share) | − {first} | ÷ {first} | compile (Node's V8) | µs per memo miss |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, us, compile, miss) in &times {
        let us = median(us);
        println!(
            "| {name} | {us:.3} | {:+.3} | {:.2}× | {:.0} ms | {:.0} |",
            us - first_us,
            us / first_us,
            median(compile),
            median(miss)
        );
    }
    Ok(())
}

/// The ChronoGuard filter's plugin configuration (its JSON text) as Envoy received it
/// over ECDS.
async fn plugin_configuration(stack: &Stack) -> anyhow::Result<String> {
    let dump: serde_json::Value = stack
        .http
        .get(stack.envoy.admin("/config_dump?resource=ecds_filters"))
        .send()
        .await?
        .json()
        .await?;
    find_plugin_configuration(&dump)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no ChronoGuard configuration in Envoy's ECDS dump"))
}

/// The first `configuration` value that carries a bundle in an Envoy config dump.
fn find_plugin_configuration(value: &serde_json::Value) -> Option<&str> {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(text) = map
                .get("configuration")
                .and_then(|c| c.get("value"))
                .and_then(|v| v.as_str())
                .filter(|t| t.contains("\"bundle\""))
            {
                return Some(text);
            }
            map.values().find_map(find_plugin_configuration)
        }
        serde_json::Value::Array(items) => items.iter().find_map(find_plugin_configuration),
        _ => None,
    }
}

/// Policy p1: `seed` puts agent 0 (the load's) on p0, p7 and p14, so p1 is another
/// agents' policy.
async fn other_agents_policy(stack: &Stack) -> anyhow::Result<uuid::Uuid> {
    Ok(
        sqlx::query_scalar("SELECT id FROM policies WHERE name = 'p1'")
            .fetch_one(&stack.db)
            .await?,
    )
}

/// Memo keys of the load's agent in `memo_churn` and `memo_across_pushes`: one domain each.
const KEYS: u64 = 400;

fn host(i: u64) -> String {
    format!("k{}.churn.example", i % KEYS)
}

/// Asks for every key once (500 req/s), so each has a memoised decision.
async fn warm_keys(stack: &Stack, client: &reqwest::Client) -> anyhow::Result<()> {
    let window = Duration::from_millis(KEYS * 2 + 200);
    open_loop_hosts(stack, client, 500, window, host).await?;
    Ok(())
}

/// Many memo keys across a UTC minute boundary: 1,000 req/s over `KEYS` distinct domains
/// (each a key of the decision memo), warmed first, run for 30 s before the 5 s measured
/// around the start of a minute. Twice: with a policy that reads the minute (every minute is then a boundary,
/// which is how every decision expired before memoised decisions lasted until the bundle's
/// next time boundary), and without it (the decisions then last until the next midnight
/// in New York, where the other policies' windows are).
async fn memo_churn(
    stack: &Stack,
    agent: &integration_tests::certs::AgentCert,
    policy0: uuid::Uuid,
) -> anyhow::Result<()> {
    let client = stack.agent_client(Some(agent))?;
    for (what, minute_rule) in [
        (
            "a policy reads the minute: every minute is a boundary",
            true,
        ),
        (
            "no minute condition: decisions last until the next boundary",
            false,
        ),
    ] {
        // A rule that never matches (no DELETE in the load); its `minute` condition
        // makes every minute a boundary of the bundle.
        let rules = if minute_rule {
            json!([{"id": "never", "priority": 1, "action": "deny", "conditions": [
                {"field": "method", "operator": "equals", "value": "DELETE"},
                {"field": "minute", "operator": "equals", "value": 0}]}])
        } else {
            json!([])
        };
        stack
            .admin(
                reqwest::Method::PUT,
                &format!("/api/v1/policies/{policy0}"),
                Some(json!({"name": "p0", "priority": 0, "allowed_domains": ["*.churn.example"], "rules": rules})),
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        warm_keys(stack, &client).await?;
        // The load runs from 32.5 s before the next minute, measured from 2.5 s before
        // it: as on a gateway in use, every key is asked for in the 30 s before the
        // boundary, when the filter decides the decisions in use ahead of their expiry.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let into_minute = now.as_millis() % 60_000;
        let wait = (60_000 - into_minute + 27_500) % 60_000;
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        open_loop_hosts(stack, &client, 1_000, Duration::from_secs(30), host).await?;
        let (p50, p99, max, misses, decided) =
            memo_misses(stack, Wire::Http1(&client), Duration::from_secs(5), host).await?;
        println!(
            "\nmemo churn ({what}; {KEYS} keys, 1,000 req/s open loop for 5 s across a minute boundary): p50 {p50:.3} / p99 {p99:.3} / max {max:.3} ms; {misses} of {decided} decisions not from the memo"
        );
    }
    Ok(())
}

/// The sum of Envoy counters `names` (0 for one not defined yet).
/// Decisions the memo answered, and all decisions (the filter's counters).
const HITS: &[&str] = &["wasmcustom.chronoguard.memo_hits"];
/// Client connections the gateway listener accepted: with HTTP/1.1, a load that queues
/// opens more, each one an mTLS handshake on the worker.
const CONNECTIONS: &str = "http.egress.downstream_cx_total";
const DECIDED: &[&str] = &[
    "wasmcustom.chronoguard.decisions_allow",
    "wasmcustom.chronoguard.decisions_deny",
];

/// Decisions memoised before a push, asked for again after it: `KEYS` keys of the load's
/// agent warmed, then a push that changes a policy the agent is not on, then one that adds
/// a domain none of the keys meets to the agent's own policy, then one that changes that
/// policy's rules (a rule no request meets, under a new id); after each, 1,000 req/s over the keys for 1 s, counting the
/// decisions not taken from the memo (`CompiledPolicy::inherit_memo`: only the agents a
/// push touched are decided again, and of a domain-list edit only the domains it meets).
async fn memo_across_pushes(
    stack: &Stack,
    agent: &integration_tests::certs::AgentCert,
    policy0: uuid::Uuid,
) -> anyhow::Result<()> {
    let client = stack.agent_client(Some(agent))?;
    let other = other_agents_policy(stack).await?;
    let put = |id: uuid::Uuid, body: serde_json::Value| async move {
        stack
            .admin(
                reqwest::Method::PUT,
                &format!("/api/v1/policies/{id}"),
                Some(body),
            )
            .await?;
        stack.wait_envoy_synced().await?;
        // Acknowledged by Envoy's main thread; the worker loads it right after.
        tokio::time::sleep(Duration::from_millis(300)).await;
        anyhow::Ok(())
    };
    let h2 = stack.agent_h2_connection(Some(agent)).await?;
    let pool = pool(stack, agent, false).await?;
    // Each series three times: HTTP/1.1 with a connection per request in flight (when
    // requests queue, the client opens more, each an mTLS handshake on the worker); then
    // HTTP/1.1 on connections opened before, and one HTTP/2 connection (no new
    // connections: what the filter itself costs).
    for (pass, wire) in [Wire::Http1(&client), Wire::Pool(&pool), Wire::Http2(&h2)]
        .into_iter()
        .enumerate()
    {
        put(
            policy0,
            json!({"name": "p0", "priority": 0, "allowed_domains": ["*.churn.example"]}),
        )
        .await?;
        warm_keys(stack, &client).await?;
        let changed = format!("changed-{pass}.example");
        // A rule no request meets, under a new id each time: a change to the policy that
        // re-decides every key. (A priority change would not when it keeps the order of
        // the agent's policies.) Its field, the domain, is one every decision reads, so
        // the memo's key stays as it was.
        let rule = |n: usize| {
            json!([{"id": format!("never-{pass}-{n}"), "priority": 1, "action": "deny", "conditions": [
                {"field": "domain", "operator": "equals", "value": "never.example"}]}])
        };
        // What, the policy, its new body, and how long after the push the load starts.
        for (what, id, body, after) in [
            (
                "a push that changes another agents' policy",
                other,
                json!({"name": "p1", "priority": 1, "allowed_domains": [changed]}),
                0,
            ),
            (
                "a push that adds a domain to this agent's policy",
                policy0,
                json!({"name": "p0", "priority": 0, "allowed_domains": ["*.churn.example", changed]}),
                0,
            ),
            (
                "a push that changes this agent's policy's rules",
                policy0,
                json!({"name": "p0", "priority": 0, "allowed_domains": ["*.churn.example", changed], "rules": rule(0)}),
                0,
            ),
            // The same again, the load 5 s later: whether the misses cost more right
            // after a push (Envoy's own work after an update) than later.
            (
                "the same, the load 5 s after the push",
                policy0,
                json!({"name": "p0", "priority": 0, "allowed_domains": ["*.churn.example", changed], "rules": rule(1)}),
                5,
            ),
        ] {
            put(id, body).await?;
            tokio::time::sleep(Duration::from_secs(after)).await;
            let cpu0 = thread_cpu(stack.envoy.pid());
            let cx0 = counters(stack, &[CONNECTIONS]).await?;
            let (p50, p99, max, misses, decided) =
                memo_misses(stack, wire, Duration::from_secs(1), host).await?;
            let cpu1 = thread_cpu(stack.envoy.pid());
            let connections = counters(stack, &[CONNECTIONS]).await?.saturating_sub(cx0);
            let ms = |ticks: u64| ticks as f64 * 1e3 / ticks_per_second();
            println!(
                "\nmemo across a push ({what}; {}; {KEYS} keys memoised before it, 1,000 req/s for 1 s after it): {misses} of {decided} decisions not from the memo; p50 {p50:.3} / p99 {p99:.3} / max {max:.3} ms; Envoy CPU over the load: worker {:.0} ms, other threads {:.0} ms; {connections} new client connections (mTLS handshakes)",
                wire.name(),
                ms(cpu1.0.saturating_sub(cpu0.0)),
                ms(cpu1.1.saturating_sub(cpu0.1)),
            );
        }
    }
    Ok(())
}

/// Open-loop load at 1,000 req/s over `host`'s domains for `duration`: p50, p99 and max
/// latency (ms), then how many decisions did not come from the memo, of how many.
async fn memo_misses(
    stack: &Stack,
    wire: Wire<'_>,
    duration: Duration,
    host: impl Fn(u64) -> String,
) -> anyhow::Result<(f64, f64, f64, u64, u64)> {
    let (h0, d0) = (
        counters(stack, HITS).await?,
        counters(stack, DECIDED).await?,
    );
    let (p50, p99, max) = open_loop_wire(stack, wire, 1_000, duration, host, None).await?;
    // The filter hands its stats to Envoy on its tick.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (h1, d1) = (
        counters(stack, HITS).await?,
        counters(stack, DECIDED).await?,
    );
    let decided = d1.saturating_sub(d0);
    Ok((
        p50,
        p99,
        max,
        decided.saturating_sub(h1.saturating_sub(h0)),
        decided,
    ))
}

async fn counters(stack: &Stack, names: &[&str]) -> anyhow::Result<u64> {
    let mut total = 0;
    for name in names {
        total += stack
            .envoy
            .stat(name)
            .await?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// A block of the push-stall windows ([`stall`]).
const BLOCK: Duration = Duration::from_secs(2);
/// Policy writes in each block with pushes: one every 250 ms (the control plane's pacing
/// makes them about two pushes a block, counted with [`RELOADS`]).
const PUSHES_PER_BLOCK: u32 = 8;
/// The first moments of each block, left out of its figures.
const SETTLE: Duration = Duration::from_millis(300);
/// Envoy's count of filter configurations it applied (one per push that reached it).
const RELOADS: &[&str] = &["extension_config_discovery.http_filter.chronoguard.config_reload"];
/// The path every load asks for.
const LOAD_PATH: &str = "/v1/objects/abc";

/// Whether a policy push stalls requests: open-loop load at 1,000 req/s for `seconds`
/// (`--stall-seconds`, default 5) without changes, then as long with a policy change every
/// 250 ms (each one a new bundle that Envoy's worker loads with `on_configure`).
async fn stall(
    stack: &Stack,
    agent: &integration_tests::certs::AgentCert,
    policy0: uuid::Uuid,
    module: &str,
    seconds: u64,
) -> anyhow::Result<()> {
    // Each window is `2 × seconds` in blocks, half of them with pushes.
    let blocks = (2 * seconds).div_ceil(BLOCK.as_secs()).max(2) as u32;
    let pushes_per_window = (blocks / 2 * PUSHES_PER_BLOCK) as usize;
    // Pushes change the load agent's own policy p0's domain list (a domain the load does
    // not ask for), or also its rules (the load's decisions are then taken again after
    // every push: the worst case), or another agents' policy p1; the first and the last
    // leave the load's memoised decisions alone.
    // A draft policy, which no bundle carries: changing it costs the control plane and
    // this process the same work as a push, and Envoy nothing (the bundle is unchanged,
    // so no update is sent). Its windows show what the pushes' p99 owes to the harness.
    let p1 = other_agents_policy(stack).await?;
    let draft: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM policies WHERE name = 'bench-trigger'")
            .fetch_one(&stack.db)
            .await?;
    let policy = |target: Target, i: usize| {
        let (name, n) = match target {
            Target::Own | Target::OwnRules => ("p0", 0),
            Target::Other => ("p1", 1),
            Target::Draft => {
                return json!({"name": "bench-trigger", "status": "draft", "allowed_domains": [format!("trigger-{i}.example")]});
            }
        };
        let mut allowed: Vec<String> = (0..5)
            .map(|d| format!("allowed-{}.example", d + n))
            .collect();
        allowed.push(format!("extra-{i}.example"));
        // A rule no request meets, on a field every decision reads, under a new id each
        // push.
        let rules = match target {
            Target::OwnRules => {
                json!([{"id": format!("never-{i}"), "priority": 1, "action": "deny", "conditions": [
                {"field": "domain", "operator": "equals", "value": "never.example"}]}])
            }
            _ => json!([]),
        };
        json!({"name": name, "priority": n, "allowed_domains": allowed, "blocked_domains": [format!("blocked-{n}.example")], "rules": rules})
    };
    let target = |target: Target| match target {
        Target::Own | Target::OwnRules => policy0,
        Target::Other => p1,
        Target::Draft => draft,
    };
    stack
        .admin(
            reqwest::Method::PUT,
            &format!("/api/v1/policies/{policy0}"),
            Some(policy(Target::Own, 0)),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // As in the CPU rounds (a run without rounds has not pinned it yet).
    pin(stack.envoy.pid(), "0");
    // The control plane compiles and publishes each push (≈ 20 ms of CPU) on the load
    // generator's CPU; on a gateway it runs elsewhere. At the lowest priority it cannot
    // delay the load generator's sends and reads, so what remains is Envoy's own stall.
    let backend = backend_pids()?;
    for &pid in &backend {
        renice(pid, 19);
    }
    // The load over HTTP/1.1 on connections opened before it: requests that queue behind
    // a push wait for a connection and open none (each an mTLS handshake on the worker,
    // a cascade that made earlier windows hundreds of milliseconds on a slow machine;
    // a single HTTP/2 connection's client was the bottleneck instead).
    let pool = pool(stack, agent, false).await?;
    let wire = Wire::Pool(&pool);
    // What a push costs the worker in all (Envoy's update of the filter configuration and
    // the filter's `on_configure`), with no requests to blur it: the worker threads' CPU
    // time over spans with a push every 1,050 ms, minus over as long without. The idle
    // worker's own CPU drifts by tens of percent between minutes on these machines, so
    // the spans come in pairs, quiet and pushing alternately first, and the figure is the
    // median over the pairs. The writes are 1,050 ms apart, past the control plane's
    // pacing of pushes (`gateway.push_min_interval_ms`, 1 s by default), so each is a
    // push of its own.
    let (pairs, per_span) = (5usize, 8usize);
    let idle_every = Duration::from_millis(1_050);
    let span = idle_every * per_span as u32 + SETTLE;
    let worker = || worker_ns(stack.envoy.pid());
    // With `CHRONOGUARD_BENCH_PERF`, each span's worker profile (`stall-<module>-idle-
    // {quiet,pushes}-<pair>.data`), to split a push's cost with `tests/perf/attribute.py`.
    let mut write = 0usize;
    let mut per_push = Vec::new();
    let (mut quiet_total, mut pushing_total, mut reached_total) = (0u64, 0u64, 0u64);
    for pair in 0..pairs {
        let mut quiet = 0;
        let mut pushing = 0;
        let mut reached = 0;
        for pushes in [pair % 2 == 1, pair % 2 == 0] {
            let what = if pushes { "pushes" } else { "quiet" };
            let recording = stall_perf(stack.envoy.pid(), &format!("{module}-idle-{what}-{pair}"))?;
            let reloads = counters(stack, RELOADS).await?;
            let (before, started) = (worker(), Instant::now());
            if pushes {
                for k in 0..per_span {
                    tokio::time::sleep_until((started + idle_every * k as u32).into()).await;
                    write += 1;
                    stack
                        .admin(
                            reqwest::Method::PUT,
                            &format!("/api/v1/policies/{policy0}"),
                            Some(policy(Target::Own, 1_000_000 + write)),
                        )
                        .await?;
                }
            }
            tokio::time::sleep_until((started + span).into()).await;
            let used = worker().saturating_sub(before);
            if let Some(recording) = recording {
                stop(recording);
            }
            if pushes {
                pushing = used;
                // Counted, not assumed: a write that found the pacing interval still
                // running would have joined the next push.
                reached = counters(stack, RELOADS)
                    .await?
                    .saturating_sub(reloads)
                    .max(1);
            } else {
                quiet = used;
            }
        }
        per_push.push((pushing as f64 - quiet as f64) / reached as f64 / 1e6);
        (quiet_total, pushing_total, reached_total) = (
            quiet_total + quiet,
            pushing_total + pushing,
            reached_total + reached,
        );
    }
    // The quiet spans' mean: the baseline of the idle check after the push windows.
    let quiet = quiet_total / pairs as u64;
    let pairs_ms: Vec<String> = per_push.iter().map(|ms| format!("{ms:+.3}")).collect();
    println!(
        "\nworker CPU per push without requests, module {module}: median {:.3} ms over {pairs} pairs of spans of {span:?} (per pair {} ms); in all {:.1} ms without pushes, {:.1} ms with {} writes that reached Envoy as {reached_total} pushes",
        median(&per_push),
        pairs_ms.join(", "),
        quiet_total as f64 / 1e6,
        pushing_total as f64 / 1e6,
        pairs * per_span,
    );
    let mut pushed = 0;
    // The median delay from a write to a worker's load and the median load, from the
    // windows with pushes, for the draft window's control.
    let timing = std::cell::Cell::new(None::<(f64, f64)>);
    let mut measure = |what: &'static str, which: Target| {
        let first = pushed + 1;
        pushed += pushes_per_window;
        let policy = &policy;
        let timing = &timing;
        let target = target(which);
        async move {
            let recording = stall_perf(stack.envoy.pid(), &format!("{module}-{first}"))?;
            // One load over `2 × seconds`, in blocks of [`BLOCK`]: pushes in one block of
            // each pair, none in the other, which one first alternating by pair. The
            // machine's slow moments (tens to hundreds of milliseconds on these VMs) then
            // fall on both kinds of block alike instead of on one window of each.
            let pushes_in = |block: u32| (block % 2 == 1) != ((block / 2) % 2 == 1);
            let reloads = counters(stack, RELOADS).await?;
            let log_from = std::fs::metadata(&stack.envoy.log).map_or(0, |m| m.len() as usize);
            let wall = std::time::SystemTime::now();
            let started = Instant::now();
            let load = open_loop_timed(stack, wire, LOAD_PATH, 1_000, BLOCK * blocks, |i| {
                mixed_host(i).to_owned()
            });
            let writes = write_times(blocks, pushes_in);
            let pushes = async {
                for (i, at) in (first..).zip(&writes) {
                    tokio::time::sleep_until((started + *at).into()).await;
                    stack
                        .admin(
                            reqwest::Method::PUT,
                            &format!("/api/v1/policies/{target}"),
                            Some(policy(which, i)),
                        )
                        .await?;
                }
                anyhow::Ok(())
            };
            let (samples, pushes) = tokio::join!(load, pushes);
            if let Some(recording) = recording {
                stop(recording);
            }
            pushes?;
            // The push the last writes were held for goes out up to the pacing interval
            // later: counted in this window, and kept out of the next one.
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            let reached = counters(stack, RELOADS).await?.saturating_sub(reloads);
            // Per block, leaving out the requests sent in its first [`SETTLE`]: a push
            // reaches the worker about 0.1 s after its REST write, so a block's first
            // moments still belong to the one before.
            let mut per_block = vec![Vec::new(); blocks as usize];
            for &(at, latency) in &samples {
                let block = (at.as_nanos() / BLOCK.as_nanos()) as usize;
                if let Some(b) = per_block.get_mut(block)
                    && at.saturating_sub(BLOCK * block as u32) >= SETTLE
                {
                    b.push(latency);
                }
            }
            let all = |with: bool| {
                percentiles(
                    (0..blocks)
                        .filter(|&b| pushes_in(b) == with)
                        .flat_map(|b| per_block[b as usize].clone())
                        .collect(),
                )
            };
            let ((q50, q99, qmax), (c50, c99, cmax)) = (all(false), all(true));
            // p99 with pushes minus p99 without, pair by pair.
            let added: Vec<f64> = (0..blocks / 2)
                .map(|pair| {
                    let p99 = |b: u32| percentiles(per_block[b as usize].clone()).1;
                    let (a, b) = (2 * pair, 2 * pair + 1);
                    if pushes_in(a) {
                        p99(a) - p99(b)
                    } else {
                        p99(b) - p99(a)
                    }
                })
                .collect();
            let rounds: Vec<String> = added.iter().map(|d| format!("{d:+.3}")).collect();
            // The requests near each worker's load of a push, against the same moments of
            // the paired quiet block. The draft window has no loads: its writes, shifted
            // by the delay from a write to a load in the windows before, give the moments
            // a push would have been loaded, and what the harness adds there.
            let log = std::fs::read(&stack.envoy.log).unwrap_or_default();
            let log = String::from_utf8_lossy(log.get(log_from..).unwrap_or_default());
            let loads = worker_loads(&log, stack.envoy.pid(), wall);
            let writes: Vec<f64> = writes.iter().map(|w| w.as_secs_f64() * 1e3).collect();
            let near = match (loads.is_empty(), timing.get()) {
                (false, _) => {
                    if let Some(measured) = write_to_load(&loads, &writes) {
                        timing.set(Some(measured));
                    }
                    format!(
                        "requests sent near a worker's load of a push ({} loads):{}",
                        loads.len(),
                        near_lines(&samples, &loads, blocks)
                    )
                }
                (true, Some((delay, width))) => {
                    let moments: Vec<(f64, f64)> = writes
                        .iter()
                        .map(|w| (w + delay, w + delay + width))
                        .collect();
                    format!(
                        "requests sent near the moments a push would have been loaded ({} writes, each {delay:.1} ms later, the median in the windows before):{}",
                        writes.len(),
                        near_lines(&samples, &moments, blocks)
                    )
                }
                (true, None) => "no worker loaded a push".to_owned(),
            };
            println!(
                "\npolicy pushes under load, module {module} ({what}; {}; 1,000 req/s open loop for {} s in blocks of {} s, {PUSHES_PER_BLOCK} writes in every other block, {reached} pushes reached Envoy): without pushes p50 {q50:.3} / p99 {q99:.3} / max {qmax:.3} ms; with pushes p50 {c50:.3} / p99 {c99:.3} / max {cmax:.3} ms; p99 added by the pushes per pair of blocks {} ms, median {:+.3} ms",
                wire.name(),
                BLOCK.as_secs() * u64::from(blocks),
                BLOCK.as_secs(),
                rounds.join(", "),
                median(&added),
            );
            println!("  {near}");
            anyhow::Ok(())
        }
    };
    measure("every Envoy thread on CPU 0", Target::Own).await?;
    // Per push Envoy also loads the bundle twice on its main thread (the configuration
    // canary, then the main thread's VM). On a gateway with a spare core that work does
    // not compete with the worker: the worker's own `on_configure` is what stalls its
    // requests. Measured with the worker alone on CPU 0, Envoy's other threads on CPU 1.
    let envoy = stack.envoy.pid();
    for (tid, name) in envoy_threads(envoy) {
        let cpu = if name.starts_with("wrk:") { "0" } else { "1" };
        let _ = Command::new("taskset")
            .args(["-pc", cpu, &tid.to_string()])
            .stdout(std::process::Stdio::null())
            .status();
    }
    measure(
        "the worker alone on CPU 0, Envoy's main thread on CPU 1",
        Target::Own,
    )
    .await?;
    measure(
        "the worker alone on CPU 0; the pushes change another agents' policy",
        Target::Other,
    )
    .await?;
    // Envoy's main thread shares CPU 1 with the load generator: the canary and the main
    // thread's own load (≈ 3 ms per push) can delay the load generator's sends and reads,
    // which a gateway's remote clients would not feel. At the lowest priority they run
    // when the load generator waits, and what remains is the worker's stall.
    let others: Vec<u32> = envoy_threads(envoy)
        .into_iter()
        .filter(|(_, name)| !name.starts_with("wrk:"))
        .map(|(tid, _)| tid)
        .collect();
    for &tid in &others {
        renice(tid, 19);
    }
    measure(
        "the worker alone on CPU 0, Envoy's other threads on CPU 1 at the lowest priority",
        Target::Own,
    )
    .await?;
    measure(
        "the same; each push also changes the load agent's policy's rules, so its decisions are taken again",
        Target::OwnRules,
    )
    .await?;
    measure(
        "the same; the changes go to a draft policy, no update reaches Envoy",
        Target::Draft,
    )
    .await?;
    for &tid in &others {
        renice(tid, 0);
    }
    pin(envoy, "0");
    // Envoy re-arms a deleted root context's tick timer for the rest of the process: had
    // each push left its root's timer running (`tick_only` in `filter/wasm/src/root.rs`),
    // the worker's CPU with nothing to do would grow with the pushes (by ≈ 1.2 ms per
    // second per 100 pushes before that fix). The same span as before the windows.
    let total = counters(stack, RELOADS).await?;
    let before = worker();
    tokio::time::sleep(span).await;
    let after = worker().saturating_sub(before);
    println!(
        "\nworker CPU without requests or pushes, module {module}: {:.1} ms over {span:?} after {total} pushes since Envoy started; {:.1} ms per such span before the push windows ({:.2}x)",
        after as f64 / 1e6,
        quiet as f64 / 1e6,
        after as f64 / quiet.max(1) as f64,
    );
    for pid in backend {
        renice(pid, 0);
    }
    Ok(())
}

/// How long before a worker's load of a push begins, and after it ends, a request counts
/// as sent near it: Envoy's work on the worker before the filter's `on_configure` (the
/// new filter configuration), the log's millisecond truncation, and the request's way to
/// the worker; and, wider, the whole way of a push from the control plane through
/// Envoy's main thread (its canary and its own VM's load) to the worker.
const NEAR_MS: [(f64, f64); 2] = [(3.0, 3.0), (40.0, 5.0)];

/// When each worker thread's load of a push ran, in milliseconds since `wall` (the
/// filter's log line, less the load's duration; the line's time is truncated to the
/// millisecond, so its end is taken at the end of that millisecond).
fn worker_loads(log: &str, envoy: u32, wall: std::time::SystemTime) -> Vec<(f64, f64)> {
    let workers: Vec<u32> = envoy_threads(envoy)
        .into_iter()
        .filter(|(_, name)| name.starts_with("wrk:"))
        .map(|(tid, _)| tid)
        .collect();
    let wall_ms = wall
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    configure_loads(log)
        .iter()
        .filter_map(|l| {
            let (at, thread) = l.logged?;
            let end = at - wall_ms + 1.0;
            (workers.contains(&thread) && end >= 0.0).then_some((end - l.ms, end))
        })
        .collect()
}

/// The moments of a push-stall window's writes since its start: [`PUSHES_PER_BLOCK`]
/// evenly spread over each block with pushes.
fn write_times(blocks: u32, pushes_in: impl Fn(u32) -> bool) -> Vec<Duration> {
    (0..blocks)
        .filter(|&b| pushes_in(b))
        .flat_map(|b| (0..PUSHES_PER_BLOCK).map(move |k| BLOCK * b + BLOCK * k / PUSHES_PER_BLOCK))
        .collect()
}

/// The median time from a write to the worker's load of the push it caused, and the
/// median load's duration.
fn write_to_load(loads: &[(f64, f64)], writes: &[f64]) -> Option<(f64, f64)> {
    let delays: Vec<f64> = loads
        .iter()
        .filter_map(|&(from, _)| {
            let write = writes.iter().rev().find(|&&w| w <= from)?;
            Some(from - write)
        })
        .collect();
    let widths: Vec<f64> = loads.iter().map(|(from, to)| to - from).collect();
    (!delays.is_empty()).then(|| (median(&delays), median(&widths)))
}

/// The requests a push can stall, against their controls: those sent from `before` ms
/// before a worker's load (`spans`, milliseconds since the window's start) to `after` ms
/// after it, and those sent at the same moments of the paired block without pushes. The
/// p99 of a block dilutes a push's few requests among 2,000; these are the ones it can
/// reach.
fn near_loads(
    samples: &[(Duration, Duration)],
    spans: &[(f64, f64)],
    blocks: u32,
    (before, after): (f64, f64),
) -> String {
    let block_ms = BLOCK.as_secs_f64() * 1e3;
    let loads: Vec<(f64, f64)> = spans
        .iter()
        .copied()
        .filter(|(from, _)| *from >= 0.0 && *from < block_ms * f64::from(blocks))
        .collect();
    let spans: Vec<(f64, f64)> = loads
        .iter()
        .map(|&(from, to)| (from - before, to + after))
        .collect();
    // The same moments in the other block of the load's pair (0 and 1, 2 and 3, …).
    let partner = |(&(load, _), &(from, to)): (&(f64, f64), &(f64, f64))| {
        let block = (load / block_ms).floor();
        let shift = if (block as u64).is_multiple_of(2) {
            block_ms
        } else {
            -block_ms
        };
        (from + shift, to + shift)
    };
    let within = |spans: &[(f64, f64)]| -> Vec<Duration> {
        samples
            .iter()
            .filter(|(at, _)| {
                let at = at.as_secs_f64() * 1e3;
                spans.iter().any(|&(from, to)| (from..=to).contains(&at))
            })
            .map(|&(_, latency)| latency)
            .collect()
    };
    let pushed = within(&spans);
    let quiet = within(&loads.iter().zip(&spans).map(partner).collect::<Vec<_>>());
    let (n, m) = (pushed.len(), quiet.len());
    let shape = |v: Vec<Duration>| quantiles(v, [0.5, 0.9, 0.99, 1.0]);
    let ([p50, p90, p99, pmax], [q50, q90, q99, qmax]) = (shape(pushed), shape(quiet));
    format!(
        "from {before} ms before to {after} ms after: {n} requests, p50 {p50:.3} / p90 {p90:.3} / p99 {p99:.3} / max {pmax:.3} ms; at the same moments of the paired blocks without pushes: {m}, p50 {q50:.3} / p90 {q90:.3} / p99 {q99:.3} / max {qmax:.3} ms; added p50 {:+.3} / p90 {:+.3} / p99 {:+.3} ms",
        p50 - q50,
        p90 - q90,
        p99 - q99,
    )
}

/// [`near_loads`] for each of [`NEAR_MS`], a line each.
fn near_lines(samples: &[(Duration, Duration)], spans: &[(f64, f64)], blocks: u32) -> String {
    NEAR_MS
        .iter()
        .map(|&margins| format!("\n    {}", near_loads(samples, spans, blocks, margins)))
        .collect()
}

/// The domain the propagation changes allow and block on p0, and nothing else names.
const PROPAGATION_DOMAIN: &str = "propagation.example";

/// REST write → first request decided by the new policy, `args.changes` times.
async fn propagation(
    stack: &Stack,
    agent: &integration_tests::certs::AgentCert,
    policy0: uuid::Uuid,
    args: &Args,
) -> anyhow::Result<()> {
    let client = stack.agent_client(Some(agent))?;
    let mut samples = Vec::new();
    for i in 0..args.changes {
        let block = i % 2 == 0;
        // A domain only p0 names: with few policies (`--policies` 10, 15–18) the load
        // agent's other policies also allow `allowed-0.example` at a higher priority, so
        // blocking that on p0 would never decide.
        let mut allowed: Vec<String> = (0..5).map(|d| format!("allowed-{d}.example")).collect();
        let mut blocked = vec!["blocked-0.example".to_owned()];
        if block {
            blocked.push(PROPAGATION_DOMAIN.into());
        } else {
            allowed.push(PROPAGATION_DOMAIN.into());
        }
        let want = if block { 403 } else { 200 };
        // The control plane pushes at most once per `gateway.push_min_interval_ms` (1 s by
        // default). Every other change comes after a quiet interval and goes out at once;
        // the others follow the previous change's push at once and wait out the interval.
        let isolated = i % 2 == 0;
        if isolated {
            tokio::time::sleep(Duration::from_millis(1_050)).await;
        }
        let started = Instant::now();
        stack
            .admin(
                reqwest::Method::PUT,
                &format!("/api/v1/policies/{policy0}"),
                Some(json!({"name": "p0", "priority": 0, "allowed_domains": allowed, "blocked_domains": blocked})),
            )
            .await?;
        let written = started.elapsed();
        loop {
            let reply = stack.request(&client, PROPAGATION_DOMAIN, "/").await?;
            if reply.status == want {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "change {i} not enforced after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push((started.elapsed(), written, isolated));
    }
    if samples.is_empty() {
        return Ok(());
    }
    let paced: Vec<Duration> = samples.iter().filter(|s| !s.2).map(|s| s.0).collect();
    samples.retain(|s| s.2);
    let pct = |mut v: Vec<Duration>, p: f64| {
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).copied().unwrap_or_default().as_secs_f64() * 1e3
    };
    let total: Vec<Duration> = samples.iter().map(|s| s.0).collect();
    let write: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    println!(
        "\npropagation over {} changes each after a quiet second ({} agents x {} policies): REST write -> first request decided by the new policy p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the REST write itself (compile + validate + publish) p50 {:.1} ms, p99 {:.1} ms",
        samples.len(),
        args.agents,
        args.policies,
        pct(total.clone(), 0.5),
        pct(total.clone(), 0.99),
        pct(total, 1.0),
        pct(write.clone(), 0.5),
        pct(write, 0.99),
    );
    if !paced.is_empty() {
        println!(
            "propagation over {} changes each right after the previous one was enforced (held by the control plane's pacing of pushes): p50 {:.1} ms, max {:.1} ms",
            paced.len(),
            pct(paced.clone(), 0.5),
            pct(paced, 1.0),
        );
    }
    configure_summary(&std::fs::read_to_string(&stack.envoy.log).unwrap_or_default());
    Ok(())
}

/// The filter logs every on_configure with the configuration size and its duration.
/// Per push Envoy runs it three times: in a throwaway clone of the VM on the main thread
/// (the configuration canary, which is what NACKs a bad bundle; a fresh VM, so its root
/// context is 1), then in the main thread's and the worker's long-lived VMs.
fn configure_summary(log: &str) {
    let loads = configure_loads(log);
    let summary = |what: &str, loads: Vec<&Load>| {
        let mut ms: Vec<f64> = loads.iter().map(|l| l.ms).collect();
        let mut agents: Vec<u64> = loads.iter().filter_map(|l| Some(l.validated?.0)).collect();
        let mut policies: Vec<u64> = loads.iter().filter_map(|l| Some(l.validated?.1)).collect();
        ms.sort_by(f64::total_cmp);
        agents.sort();
        policies.sort();
        let spread = |v: &[u64]| match (v.get(v.len() / 2), v.last()) {
            (Some(median), Some(max)) => format!("{median} / {max}"),
            _ => "not logged".to_owned(),
        };
        if let (Some(median), Some(max)) = (ms.get(ms.len() / 2), ms.last()) {
            let count = |read: ConfigRead| loads.iter().filter(|l| l.read == read).count();
            println!(
                "on_configure, {what}, over {} loads ({} parsed, {} read through an index, {} deltas compiled from what they list, {} merged with the VM's own entries, {} on the published base, {} checked against it): median {median:.3} ms, max {max:.3} ms; validated per load, median / max: agents {}, policies {}",
                ms.len(),
                count(ConfigRead::Parsed),
                count(ConfigRead::Indexed),
                count(ConfigRead::DeltaListed),
                count(ConfigRead::Delta),
                count(ConfigRead::DeltaShared),
                count(ConfigRead::DeltaChecked),
                spread(&agents),
                spread(&policies),
            );
        }
    };
    summary(
        "canary (fresh VM)",
        loads.iter().filter(|l| l.root == 1).collect(),
    );
    summary(
        "long-lived VMs",
        loads.iter().filter(|l| l.root != 1).collect(),
    );
    if let Some(l) = loads.iter().max_by_key(|l| l.bytes) {
        println!("configuration size {} bytes", l.bytes);
    }
    let mut deltas: Vec<u64> = loads
        .iter()
        .filter(|l| matches!(l.read, ConfigRead::DeltaShared | ConfigRead::DeltaChecked))
        .map(|l| l.bytes)
        .collect();
    deltas.sort_unstable();
    if let (Some(median), Some(max)) = (deltas.get(deltas.len() / 2), deltas.last()) {
        println!(
            "delta pushes: {} of {} bytes median, {max} max",
            deltas.len(),
            median
        );
    }
}

struct Load {
    /// When the line was logged (the load's end, to the millisecond, truncated), in
    /// milliseconds since the Unix epoch, and the logging thread's id.
    logged: Option<(f64, u32)>,
    root: u32,
    read: ConfigRead,
    bytes: u64,
    /// Agents and policies the VM validated itself (the others it reused or another VM
    /// validated).
    validated: Option<(u64, u64)>,
    /// Whole milliseconds before 562f562, then to the microsecond.
    ms: f64,
}

/// The filter's `root N: configuration V loaded (Enforce, B bytes, A agents, P policies
/// and S module sets validated here, M ms)` log lines.
fn configure_loads(log: &str) -> Vec<Load> {
    log.lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once("loaded (Enforce, ")?;
            let root = head
                .split("root ")
                .nth(1)?
                .split(':')
                .next()?
                .parse()
                .ok()?;
            let (bytes, rest) = tail.split_once(" bytes, ")?;
            let (read, rest) = ConfigRead::strip(rest);
            // Modules before 0f50487 do not say what they validated.
            let (validated, rest) = match rest.split_once(" module sets validated here, ") {
                Some((counts, after)) => {
                    let (agents, policies) = counts.split_once(" agents, ")?;
                    let policies = policies.split_once(" policies and ")?.0;
                    (Some((agents.parse().ok()?, policies.parse().ok()?)), after)
                }
                None => (None, rest),
            };
            let ms = rest.trim_end_matches(" ms)").parse().ok()?;
            Some(Load {
                logged: logged_at(l),
                root,
                read,
                bytes: bytes.parse().ok()?,
                validated,
                ms,
            })
        })
        .collect()
}

/// The time and thread of an Envoy log line (`[%Y-%m-%d %T.%e][%t]…`, local time):
/// milliseconds since the Unix epoch and the thread id.
fn logged_at(line: &str) -> Option<(f64, u32)> {
    use chrono::TimeZone;
    let rest = line.strip_prefix('[')?;
    let (stamp, rest) = rest.split_once("][")?;
    let thread = rest.split_once(']')?.0.parse().ok()?;
    let naive = chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.3f").ok()?;
    let at = chrono::Local.from_local_datetime(&naive).earliest()?;
    Some((at.timestamp_millis() as f64, thread))
}

/// Inserts `agents` agents and `policies` policies directly (a bench, not an API test),
/// then triggers one bundle rebuild through the REST API. Returns the agent the load uses.
async fn seed(
    stack: &Stack,
    tenant: &str,
    args: &Args,
) -> anyhow::Result<(integration_tests::certs::AgentCert, uuid::Uuid)> {
    let tenant: uuid::Uuid = tenant.parse()?;
    let mut policy_ids = Vec::new();
    for p in 0..args.policies {
        let id = uuid::Uuid::now_v7();
        let allowed: Vec<String> = (0..5)
            .map(|d| format!("allowed-{}.example", (p + d) % args.policies))
            .chain([format!("*.p{p}.example")])
            .collect();
        let blocked = vec![format!("blocked-{p}.example")];
        // Every feature on: a rate limit (high enough not to trigger), a time window in a
        // DST timezone covering the whole week, and a rule.
        let rate_limit = json!({"per_minute": 10_000_000, "burst": 10_000_000});
        let time = json!({"timezone": "America/New_York", "windows": [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "00:00", "end": "24:00"}]});
        let rules = json!([{"id": "no-delete", "priority": 1, "action": "deny", "conditions": [{"field": "method", "operator": "equals", "value": "DELETE"}]}]);
        sqlx::query("INSERT INTO policies (id, tenant_id, name, priority, status, mode, allowed_domains, blocked_domains, rate_limit, time_restrictions, rules) VALUES ($1, $2, $3, $4, 'active', 'enforce', $5, $6, $7, $8, $9)")
            .bind(id).bind(tenant).bind(format!("p{p}")).bind(p as i32).bind(&allowed).bind(&blocked).bind(&rate_limit).bind(&time).bind(&rules)
            .execute(&stack.db).await?;
        policy_ids.push(id);
    }
    let mut chosen = None;
    for a in 0..args.agents {
        let cert = if a == 0 {
            let cert = stack.pki.agent("bench-agent")?;
            chosen = Some(cert.clone());
            cert.fingerprint
        } else {
            format!("{:064x}", a)
        };
        let id = uuid::Uuid::now_v7();
        sqlx::query("INSERT INTO agents (id, tenant_id, name, fingerprint, subject, not_before, not_after, certificate_pem, status) VALUES ($1, $2, $3, $4, 'CN=bench', now(), now() + interval '1 day', '', 'active')")
            .bind(id).bind(tenant).bind(format!("agent-{a}")).bind(&cert)
            .execute(&stack.db).await?;
        for k in 0..3 {
            sqlx::query("INSERT INTO agent_policies (agent_id, policy_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(id).bind(policy_ids[(a + k * 7) % policy_ids.len()])
                .execute(&stack.db).await?;
        }
    }
    // One write through the API publishes the bundle.
    stack.admin(reqwest::Method::POST, "/api/v1/policies", Some(json!({
        "tenant_id": tenant, "name": "bench-trigger", "allowed_domains": ["trigger.example"], "status": "draft"
    }))).await?;
    let chosen = chosen.ok_or_else(|| anyhow::anyhow!("no agents"))?;
    Ok((chosen, policy_ids[0]))
}

/// Restarts Envoy, with or without the ChronoGuard filter.
async fn restart(stack: &mut Stack, plain: bool) -> anyhow::Result<Duration> {
    stack.set_plain_envoy(plain);
    stack.set_plain_twin(true);
    stack.set_audit_port(Some(stack.upstream.port));
    // Envoy inherits this process's CPU affinity. It starts with both CPUs, as a gateway
    // starts with all of its machine's (V8 compiles the module on its background
    // threads too); the rounds pin it to CPU 0 once it is ready.
    pin(std::process::id(), "0,1");
    let started = stack.restart_envoy().await;
    pin(std::process::id(), "1");
    started
}

/// The load's mix: every tenth request to a blocked domain, the others allowed.
fn mixed_host(i: u64) -> &'static str {
    if i.is_multiple_of(10) {
        "blocked-0.example"
    } else {
        "allowed-0.example"
    }
}

/// Open-loop load at 1,000 req/s over [`mixed_host`] on `pool`'s connections that also writes every request's send time and latency
/// (µs since the window began, µs) to `<dir>/latency-<name>.tsv` when
/// `CHRONOGUARD_BENCH_LATENCY=<dir>` is set: to see when the slow requests happen (e.g. in
/// step with the filter's tick).
async fn open_loop_dump(
    stack: &Stack,
    pool: &Arc<H1Pool>,
    duration: Duration,
    name: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let dump = std::env::var_os("CHRONOGUARD_BENCH_LATENCY")
        .map(|dir| std::path::Path::new(&dir).join(format!("latency-{name}.tsv")));
    let host = |i| mixed_host(i).to_owned();
    open_loop_wire(
        stack,
        Wire::Pool(pool),
        1_000,
        duration,
        host,
        dump.as_deref(),
    )
    .await
}

/// Open-loop load over HTTP/1.1: one request every `1 / rate` seconds for `duration`,
/// whatever the responses do, the i-th to `host(i)`; returns the p50, p99 and max latency
/// in milliseconds.
async fn open_loop_hosts(
    stack: &Stack,
    client: &reqwest::Client,
    rate: u64,
    duration: Duration,
    host: impl Fn(u64) -> String,
) -> anyhow::Result<(f64, f64, f64)> {
    open_loop_wire(stack, Wire::Http1(client), rate, duration, host, None).await
}

/// How a load reaches the gateway.
#[derive(Clone, Copy)]
enum Wire<'a> {
    /// HTTP/1.1 (reqwest), the domain in the Host header: a connection, and so an mTLS
    /// handshake, for each request in flight beyond the idle ones.
    Http1(&'a reqwest::Client),
    /// One HTTP/2 connection, each request's domain in its `:authority`.
    Http2(&'a integration_tests::client::H2Sender),
    /// HTTP/1.1 over [`POOL`] connections opened before the load, the domain in the Host
    /// header: a request waits for an idle connection, none is opened during the load.
    Pool(&'a Arc<H1Pool>),
}

/// [`POOL`] connections as `agent` to the gateway listener (or its twin), each used once:
/// ready for a [`Wire::Pool`] load.
async fn pool(
    stack: &Stack,
    agent: &integration_tests::certs::AgentCert,
    twin: bool,
) -> anyhow::Result<Arc<H1Pool>> {
    let pool = stack.agent_pool(Some(agent), twin, POOL).await?;
    pool.warm(mixed_host(1), LOAD_PATH).await?;
    Ok(Arc::new(pool))
}

/// The connections of a [`Wire::Pool`] (per listener). At 1,000 req/s and about 1 ms
/// per request one or two are busy; 32 absorb a stall of 30 ms without a request waiting
/// for a connection, and a longer stall shows as the queue it would be for such a client.
const POOL: usize = 32;

impl Wire<'_> {
    fn name(self) -> String {
        match self {
            Wire::Http1(_) => "HTTP/1.1, a connection per request in flight".to_owned(),
            Wire::Http2(_) => "HTTP/2, one connection".to_owned(),
            Wire::Pool(_) => format!("HTTP/1.1, {POOL} connections opened before the load"),
        }
    }
}

/// [`open_loop_hosts`] over `wire`, writing each request's send time and latency to
/// `dump` if given.
async fn open_loop_wire(
    stack: &Stack,
    wire: Wire<'_>,
    rate: u64,
    duration: Duration,
    host: impl Fn(u64) -> String,
    dump: Option<&std::path::Path>,
) -> anyhow::Result<(f64, f64, f64)> {
    let timed = open_loop_timed(stack, wire, LOAD_PATH, rate, duration, host).await;
    if let Some(path) = dump {
        let lines: String = timed
            .iter()
            .map(|(at, latency)| format!("{}\t{}\n", at.as_micros(), latency.as_micros()))
            .collect();
        std::fs::write(path, lines)?;
    }
    Ok(percentiles(
        timed.into_iter().map(|(_, latency)| latency).collect(),
    ))
}

/// One request for `path` every `1 / rate` seconds for `duration` over `wire`, the i-th
/// to the domain `host(i)`, whatever the responses do: each answered request's send time
/// (since the load began) and latency.
async fn open_loop_timed(
    stack: &Stack,
    wire: Wire<'_>,
    path: &str,
    rate: u64,
    duration: Duration,
    host: impl Fn(u64) -> String,
) -> Vec<(Duration, Duration)> {
    let url = stack.envoy.url(path);
    let mut interval = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while started.elapsed() < duration {
        interval.tick().await;
        i += 1;
        let request: std::pin::Pin<Box<dyn Future<Output = bool> + Send>> = match wire {
            Wire::Http1(client) => Box::pin(whole(client.get(&url).header("host", host(i)).send())),
            Wire::Http2(sender) => {
                let (sender, domain, path) = (sender.clone(), host(i), path.to_owned());
                Box::pin(async move {
                    integration_tests::client::h2_get(&sender, &domain, &path)
                        .await
                        .is_ok()
                })
            }
            Wire::Pool(pool) => {
                let (pool, domain, path) = (pool.clone(), host(i), path.to_owned());
                Box::pin(async move { pool.get(&domain, &path).await.is_ok() })
            }
        };
        tasks.push(tokio::spawn(async move {
            let (sent, latency) = timed(request).await?;
            Some((sent.duration_since(started), latency))
        }));
    }
    let mut timed = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(Some(sample)) = task.await {
            timed.push(sample);
        }
    }
    timed
}

/// The median of `values` (the upper one of an even count; NaN for none).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of `value` over the `items` that `keep` selects.
fn median_where<T>(items: &[T], keep: impl Fn(&T) -> bool, value: impl Fn(&T) -> f64) -> f64 {
    median(
        &items
            .iter()
            .filter(|i| keep(i))
            .map(value)
            .collect::<Vec<_>>(),
    )
}

/// How long `request` took until its whole body arrived (`None` if it failed), and when
/// it was sent.
async fn timed(request: impl Future<Output = bool>) -> Option<(Instant, Duration)> {
    let sent = Instant::now();
    request.await.then(|| (sent, sent.elapsed()))
}

/// Whether `response` arrives, with its whole body.
async fn whole(response: impl Future<Output = reqwest::Result<reqwest::Response>>) -> bool {
    match response.await {
        Ok(r) => r.bytes().await.is_ok(),
        Err(_) => false,
    }
}

/// p50, p99 and max of `samples`, in milliseconds.
fn percentiles(samples: Vec<Duration>) -> (f64, f64, f64) {
    let [p50, p99, max] = quantiles(samples, [0.5, 0.99, 1.0]);
    (p50, p99, max)
}

/// The quantiles `ps` of `samples`, in milliseconds (0 for none).
fn quantiles<const N: usize>(mut samples: Vec<Duration>, ps: [f64; N]) -> [f64; N] {
    samples.sort();
    ps.map(|p| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples.get(i).copied().unwrap_or_default().as_secs_f64() * 1e3
    })
}

/// The load's URL on the gateway listener and on its twin without the filter
/// (`EnvoyConfig::plain_twin`); an error if this Envoy has no twin.
fn listener_urls(stack: &Stack) -> anyhow::Result<[String; 2]> {
    let twin = stack
        .envoy
        .twin_url(LOAD_PATH)
        .ok_or_else(|| anyhow::anyhow!("Envoy has no twin listener"))?;
    Ok([stack.envoy.url(LOAD_PATH), twin])
}

/// Open-loop load at 1,000 req/s on the gateway listener and, half a period later each
/// time, at 1,000 req/s on its twin without the filter (`EnvoyConfig::plain_twin`, the
/// same TLS, route and upstream), for `duration`. Both streams meet the machine in the
/// same state: the difference of their percentiles is what the filter adds, free of the
/// machine's drift between windows measured minutes apart. Returns (p50, p99, max) in
/// milliseconds, the gateway listener's first, of all requests, then of the allowed ones.
async fn interleaved(
    stack: &Stack,
    agent: &integration_tests::certs::AgentCert,
    duration: Duration,
) -> anyhow::Result<[[(f64, f64, f64); 2]; 2]> {
    // Connections opened before the window, [`POOL`] per listener: a slow moment makes
    // requests wait for a connection, never open one (an mTLS handshake on the worker,
    // which at 2,000 req/s tipped HTTP/1.1 clients into opening hundreds).
    let pools = [
        pool(stack, agent, false).await?,
        pool(stack, agent, true).await?,
    ];
    // Tokio's timers tick in whole milliseconds: a 0.5 ms interval would send the two
    // requests as a pair, one queued behind the other. A thread paces them instead.
    let (pace, mut due) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let pacer = std::thread::spawn(move || {
        let started = Instant::now();
        for i in 0u64.. {
            let at = started + Duration::from_micros(500 * i);
            if at > started + duration {
                break;
            }
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if pace.send(i).is_err() {
                break;
            }
        }
    });
    let mut tasks = Vec::new();
    while let Some(i) = due.recv().await {
        let listener = (i % 2) as usize;
        let pool = pools[listener].clone();
        let request = async move { pool.get(mixed_host(i / 2), LOAD_PATH).await.is_ok() };
        tasks.push(tokio::spawn(async move {
            Some((listener, (i / 2, timed(request).await?.1)))
        }));
    }
    let _ = pacer.join();
    let mut samples = [Vec::new(), Vec::new()];
    for task in tasks {
        if let Ok(Some((listener, latency))) = task.await {
            samples[listener].push(latency);
        }
    }
    let allowed = |listener: &Vec<(u64, Duration)>| {
        listener
            .iter()
            .filter(|(i, _)| mixed_host(*i).starts_with("allowed"))
            .map(|(_, latency)| *latency)
            .collect::<Vec<_>>()
    };
    let all = |listener: &Vec<(u64, Duration)>| listener.iter().map(|(_, l)| *l).collect();
    let [gateway, twin] = &samples;
    Ok([
        [percentiles(all(gateway)), percentiles(all(twin))],
        [percentiles(allowed(gateway)), percentiles(allowed(twin))],
    ])
}

/// Closed-loop load over `connections` keep-alive connections for `duration`.
async fn load(
    stack: &Stack,
    client: &reqwest::Client,
    connections: usize,
    duration: Duration,
) -> (u64, u64, Duration) {
    load_url(&stack.envoy.url(LOAD_PATH), client, connections, duration).await
}

/// [`load`] on `url`.
async fn load_url(
    url: &str,
    client: &reqwest::Client,
    connections: usize,
    duration: Duration,
) -> (u64, u64, Duration) {
    let done = Arc::new(AtomicBool::new(false));
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let url = url.to_owned();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (done, ok, errors, url) = (done.clone(), ok.clone(), errors.clone(), url.clone());
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while !done.load(Ordering::Relaxed) {
                i += 1;
                match client
                    .get(&url)
                    .header("host", mixed_host(i as u64))
                    .send()
                    .await
                {
                    Ok(r) if r.status().as_u16() == 200 || r.status().as_u16() == 403 => {
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(duration).await;
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    (
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        started.elapsed(),
    )
}

/// Envoy CPU per request on the gateway listener and on its twin without the filter
/// (`EnvoyConfig::plain_twin`), in one Envoy process: `windows` pairs of closed-loop
/// windows of `seconds`, the two listeners in turns (the first alternating), summed per
/// listener. Against plain Envoy measured in its own process, this leaves out what
/// differs between Envoy starts (where V8 and the allocator place things) and the drift
/// of the machine between windows minutes apart.
async fn cpu_against_twin(
    stack: &Stack,
    client: &reqwest::Client,
    connections: usize,
    windows: usize,
    seconds: u64,
) -> anyhow::Result<[(f64, f64); 2]> {
    let urls = listener_urls(stack)?;
    // Warm the twin's connections as the rounds warm the gateway's.
    load_url(&urls[1], client, connections, Duration::from_secs(1)).await;
    let (mut ticks, mut requests, mut elapsed) = ([0u64; 2], [0u64; 2], [Duration::ZERO; 2]);
    for window in 0..windows * 2 {
        let listener = (window + window / 2) % 2;
        let before = cpu_ticks(stack.envoy.pid())?;
        let (served, _, took) = load_url(
            &urls[listener],
            client,
            connections,
            Duration::from_secs(seconds),
        )
        .await;
        ticks[listener] += cpu_ticks(stack.envoy.pid())? - before;
        requests[listener] += served;
        elapsed[listener] += took;
    }
    Ok([0, 1].map(|l| {
        (
            ticks[l] as f64 * 1e6 / ticks_per_second() / requests[l].max(1) as f64,
            requests[l] as f64 / elapsed[l].as_secs_f64().max(1e-9),
        )
    }))
}

/// Instructions Envoy executes per request, counted by callgrind (`valgrind`): unlike CPU
/// time, a count that repeats to within a fraction of a percent on a noisy machine, so it
/// resolves changes of a few hundred instructions per request that the CPU rounds cannot.
/// Instructions are not time (a cache miss costs more than an add), so the targets stay
/// with the CPU rounds; this compares modules. For each module, Envoy restarts under
/// callgrind with the twin listener; after a warm-up, four windows of `requests`
/// sequential requests on one keep-alive connection (10% denials, as in [`load`]) go to the
/// twin and the gateway listener in turns, each counted from a dump after zeroing the
/// counters; the table has the mean of each listener's two windows. Everything the Envoy
/// process runs in the window counts, its timers included.
async fn instructions(
    stack: &mut Stack,
    agent: &integration_tests::certs::AgentCert,
    modules: &[(String, std::path::PathBuf)],
    module: &std::path::Path,
    requests: u64,
) -> anyhow::Result<()> {
    let out = stack.dir.join("callgrind");
    stack.set_envoy_wrapper(
        [
            "valgrind",
            "--tool=callgrind",
            // V8 writes the code it compiles.
            "--smc-check=all-non-file",
            "--dump-instr=no",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([format!("--callgrind-out-file={}.%p", out.display())])
        .collect(),
    );
    let mut table = Vec::new();
    for (variant, path) in modules {
        std::fs::copy(path, module)?;
        let start_to_ready = restart(stack, false).await?;
        let pid = stack.envoy.pid();
        let client = stack.agent_client(Some(agent))?;
        let urls = listener_urls(stack)?;
        integration_tests::wait_for(
            "the bundle, under callgrind",
            Duration::from_secs(600),
            || {
                let request = client
                    .get(&urls[0])
                    .header("host", "allowed-0.example")
                    .send();
                async move { (request.await.ok()?.status().as_u16() == 200).then_some(()) }
            },
        )
        .await?;
        for url in &urls {
            sequential(&client, url, requests / 5).await?;
        }
        let mut counts = [Vec::new(), Vec::new()];
        for window in 0..4 {
            let listener = (window + window / 2 + 1) % 2;
            callgrind_control(pid, "--zero")?;
            sequential(&client, &urls[listener], requests).await?;
            callgrind_control(pid, "--dump")?;
            let dump = format!("{}.{pid}.{}", out.display(), window + 1);
            let total =
                integration_tests::wait_for("a callgrind dump", Duration::from_secs(60), || {
                    let dump = dump.clone();
                    async move {
                        let text = std::fs::read_to_string(dump).ok()?;
                        text.lines()
                            .find_map(|l| l.strip_prefix("totals: "))?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    }
                })
                .await?;
            counts[listener].push(total as f64 / requests as f64);
        }
        let [gateway, twin] = counts;
        println!(
            "instructions {variant} (Envoy ready under callgrind in {start_to_ready:?}): gateway listener {gateway:.0?}, twin {twin:.0?} per request"
        );
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        table.push((variant.clone(), mean(&gateway), mean(&twin)));
    }
    stack.set_envoy_wrapper(Vec::new());
    println!(
        "\n| module | instructions/request, gateway listener | twin without the filter | added by the filter | against `{}` |",
        table.first().map_or("", |t| t.0.as_str())
    );
    println!("|---|---|---|---|---|");
    let first = table.first().map_or(0.0, |t| t.1 - t.2);
    for (variant, gateway, twin) in &table {
        let added = gateway - twin;
        println!(
            "| {variant} | {gateway:.0} | {twin:.0} | {added:+.0} | {:+.0} ({:+.1}%) |",
            added - first,
            (added - first) * 100.0 / first.max(1.0)
        );
    }
    Ok(())
}

/// `count` requests one after another on `client`'s connection to `url`, in the load's mix
/// ([`mixed_host`]); an answer other than 200 or 403 is an error.
async fn sequential(client: &reqwest::Client, url: &str, count: u64) -> anyhow::Result<()> {
    for i in 0..count {
        let response = client.get(url).header("host", mixed_host(i)).send().await?;
        let status = response.status().as_u16();
        anyhow::ensure!(status == 200 || status == 403, "{url} answered {status}");
        response.bytes().await?;
    }
    Ok(())
}

/// `callgrind_control <action> <pid>`.
fn callgrind_control(pid: u32, action: &str) -> anyhow::Result<()> {
    let status = Command::new("callgrind_control")
        .arg(action)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "callgrind_control {action} {pid}: {status}"
    );
    Ok(())
}

/// The processes of the control plane, PostgreSQL and Redis.
fn backend_pids() -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for name in ["chronoguard-control-plane", "postgres", "redis-server"] {
        let pids = Command::new("pgrep").args(["-f", name]).output()?;
        out.extend(
            String::from_utf8_lossy(&pids.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse::<u32>().ok()),
        );
    }
    Ok(out)
}

/// The threads of process `pid`: id and name (`wrk:worker_0`, `envoy`, ...).
fn envoy_threads(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_string_lossy().parse().ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            Some((tid, name))
        })
        .collect()
}

/// Which policy the push-stall windows change.
#[derive(Clone, Copy)]
enum Target {
    /// The load agent's own policy's domain list: a domain the load does not ask for is
    /// added and another removed, so the load's memoised decisions stay.
    Own,
    /// The same, and the policy's rules change (a rule the load does not meet, under a
    /// new id): the load's decisions are taken again after every push (the worst case).
    OwnRules,
    /// Another agents' policy: the load's memoised decisions stay.
    Other,
    /// A draft policy: the bundle does not change, no update reaches Envoy.
    Draft,
}

/// A CPU profile of Envoy's worker threads over one push-stall window (`perf record`,
/// when `CHRONOGUARD_BENCH_PERF=<dir>`): `<dir>/stall-<name>.data`.
fn stall_perf(pid: u32, name: &str) -> anyhow::Result<Option<std::process::Child>> {
    let Some(dir) = std::env::var_os("CHRONOGUARD_BENCH_PERF") else {
        return Ok(None);
    };
    let workers: Vec<String> = envoy_threads(pid)
        .into_iter()
        .filter(|(_, name)| name.starts_with("wrk:"))
        .map(|(tid, _)| tid.to_string())
        .collect();
    let out = std::path::Path::new(&dir).join(format!("stall-{name}.data"));
    Ok(Some(
        Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "4000",
                "-t",
                &workers.join(","),
            ])
            .arg("-o")
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    ))
}

/// Sets the nice value of a process, or of one thread when given a thread id.
fn renice(pid: u32, nice: i32) {
    let _ = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status();
}

fn pin(pid: u32, cpu: &str) {
    let _ = Command::new("taskset")
        .args(["-a", "-pc", cpu, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status();
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// utime + stime from a `stat` file of procfs: a process's (`/proc/PID/stat`, all its
/// threads) or one thread's (`/proc/PID/task/TID/stat`).
fn stat_ticks(path: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(path)?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of /proc/PID/stat (utime, stime); `after` starts at field 3.
    let utime: u64 = fields.get(11).unwrap_or(&"0").parse()?;
    let stime: u64 = fields.get(12).unwrap_or(&"0").parse()?;
    Ok(utime + stime)
}

/// CPU ticks of Envoy's worker threads and of its other threads.
fn thread_cpu(pid: u32) -> (u64, u64) {
    let mut out = (0, 0);
    for (tid, name) in envoy_threads(pid) {
        // Not /proc/TID/stat: for the main thread (TID = PID) that is the process's.
        let ticks = stat_ticks(&format!("/proc/{pid}/task/{tid}/stat")).unwrap_or(0);
        if name.starts_with("wrk:") {
            out.0 += ticks;
        } else {
            out.1 += ticks;
        }
    }
    out
}

/// CPU time of `pid`'s worker threads in nanoseconds (`/proc/…/schedstat`: exact, where
/// `stat` counts clock ticks).
fn worker_ns(pid: u32) -> u64 {
    envoy_threads(pid)
        .into_iter()
        .filter(|(_, name)| name.starts_with("wrk:"))
        .filter_map(|(tid, _)| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Stops a `perf record` child with SIGINT (so it writes its file) and waits for it.
fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A worker's `on_configure` line in Envoy's default log format gives its local time,
    /// its thread, how the configuration was read and how long the load took.
    #[test]
    fn a_load_line_gives_its_time_thread_and_duration() {
        let line = "[2026-12-02 10:15:46.123][4242][info][wasm] [source/extensions/common/wasm/context.cc:1199] wasm log chronoguard chronoguard: root 3: configuration 12 loaded (Enforce, 954 bytes, a delta from what it lists, 0 agents, 0 policies and 0 module sets validated here, 0.113 ms)";
        let loads = configure_loads(line);
        let [load] = loads.as_slice() else {
            panic!("one load");
        };
        let at = chrono::Local
            .with_ymd_and_hms(2026, 12, 2, 10, 15, 46)
            .unwrap()
            .timestamp_millis()
            + 123;
        assert_eq!(load.logged, Some((at as f64, 4242)));
        assert_eq!(
            (load.root, load.read, load.ms),
            (3, ConfigRead::DeltaListed, 0.113)
        );
        assert_eq!(logged_at("root 3: configuration 12 loaded"), None);
    }

    /// Requests near a load are compared with those at the same moment of the other block
    /// of the pair; the delay from a write to its load is measured from the write before.
    #[test]
    fn requests_near_a_load_meet_their_controls_in_the_paired_block() {
        let ms = Duration::from_millis;
        // Block 1 has the writes (every 250 ms), block 0 is its quiet partner.
        let writes: Vec<f64> = write_times(2, |b| b == 1)
            .iter()
            .map(|w| w.as_secs_f64() * 1e3)
            .collect();
        assert_eq!(writes.len(), PUSHES_PER_BLOCK as usize);
        assert_eq!((writes[0], writes[1]), (2000.0, 2250.0));
        let loads = [(2100.0, 2100.5)];
        assert_eq!(write_to_load(&loads, &writes), Some((100.0, 0.5)));
        let samples = [
            (ms(2099), ms(5)),
            (ms(2102), ms(7)),
            (ms(99), ms(1)),
            (ms(103), ms(1)),
            (ms(500), ms(9)),
            (ms(2500), ms(9)),
        ];
        let near = near_loads(&samples, &loads, 2, (3.0, 3.0));
        assert!(
            near.starts_with("from 3 ms before to 3 ms after: 2 requests, p50 7.000 / p90 7.000 / p99 7.000 / max 7.000 ms; at the same moments of the paired blocks without pushes: 2, p50 1.000"),
            "{near}"
        );
        assert!(
            near.ends_with("added p50 +6.000 / p90 +6.000 / p99 +6.000 ms"),
            "{near}"
        );
        // Wider, from before the block's start: its controls are still the partner's.
        let wide = near_loads(&samples, &loads, 2, (101.0, 3.0));
        assert!(
            wide.contains(": 2 requests") && wide.contains("without pushes: 2, p50 1.000"),
            "{wide}"
        );
    }
}
