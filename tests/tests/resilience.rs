//! Fail-closed start, enforcement and audit delivery across control-plane and Envoy
//! restarts — with real Envoy, control plane and PostgreSQL.

use integration_tests::certs::Pki;
use integration_tests::envoy::{Envoy, EnvoyConfig};
use integration_tests::upstream::Upstream;
use integration_tests::{Stack, StackOptions};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Envoy whose control plane is unreachable applies the bootstrap's deny-all default once
/// the initial fetch times out: every request is denied, none reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_without_control_plane_fails_closed() {
    let dir = integration_tests::postgres::tempdir("chronoguard-failclosed").unwrap();
    let pki = Pki::new(dir.join("pki")).unwrap();
    let upstream = Upstream::start().await.unwrap();
    let wasm = integration_tests::envoy::wasm();
    // Ports nobody listens on: the ECDS fetch cannot succeed.
    let (grpc, http) = (
        integration_tests::free_port(),
        integration_tests::free_port(),
    );
    let envoy = Envoy::start(EnvoyConfig {
        node_id: "isolated",
        fleet: integration_tests::stack::FLEET,
        cp_grpc_port: grpc,
        cp_http_port: http,
        upstream_port: upstream.port,
        ca: &pki.ca_path,
        server_cert: &pki.server_cert_path,
        server_key: &pki.server_key_path,
        wasm: &wasm,
        initial_fetch_timeout: "1s",
        concurrency: 2,
        dir: &dir,
        without_filter: false,
        plain_twin: false,
        request_ids: true,
        peer_header: true,
        wrapper: &[],
    })
    .await
    .unwrap();
    let agent = pki.agent("anyone").unwrap();
    let client = integration_tests::client::agent_client(&pki.ca_pem, Some(&agent)).unwrap();
    for _ in 0..5 {
        let response = client
            .get(envoy.url("/"))
            .header("host", "allowed.example")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["reason"], "not_configured", "{body}");
    }
    assert_eq!(upstream.hits(), 0, "nothing reached the upstream");
    drop(envoy);
    let _ = std::fs::remove_dir_all(dir);
}

/// With the control plane down Envoy keeps enforcing the last policy and buffers audit
/// records; after the restart every record arrives, chained, and the chain verifies.
/// A restarted Envoy decides its first request with the current policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforcement_and_audit_survive_restarts() {
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    let setup = stack
        .tenant_with_agent(&["allowed.example"], &["blocked.example"])
        .await
        .unwrap();
    let (tenant, cert, agent) = (setup.tenant, setup.cert, setup.client);
    integration_tests::wait_for("policy enforced", Duration::from_secs(10), || async {
        let reply = stack.request(&agent, "allowed.example", "/").await.ok()?;
        (reply.status == 200).then_some(())
    })
    .await
    .unwrap();

    stack.control_plane.stop();
    let mut ids = Vec::new();
    for i in 0..20 {
        let domain = if i % 2 == 0 {
            "allowed.example"
        } else {
            "blocked.example"
        };
        let reply = stack.request(&agent, domain, "/").await.unwrap();
        assert_eq!(
            reply.status,
            if i % 2 == 0 { 200 } else { 403 },
            "enforcement never lapses"
        );
        ids.push(reply.decision_id.unwrap());
    }
    // The filter has tried and failed to deliver while the control plane was down.
    integration_tests::wait_for("audit retries", Duration::from_secs(10), || async {
        let retried = stack
            .envoy
            .stat("wasmcustom.chronoguard.audit_retried")
            .await
            .ok()??;
        (retried.parse::<u64>().ok()? > 0).then_some(())
    })
    .await
    .unwrap();

    stack.control_plane.restart().await.unwrap();
    stack
        .audit_entries_with(&tenant, &ids, Duration::from_secs(40))
        .await
        .unwrap();
    let duplicates: i64 =
        sqlx::query_scalar("SELECT count(*) - count(DISTINCT entry_id) FROM audit_entries")
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!(duplicates, 0, "a retried batch is stored once");
    let verdict = stack
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/audit/verify?tenant_id={tenant}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert_eq!(
        stack
            .envoy
            .stat("wasmcustom.chronoguard.audit_dropped")
            .await
            .unwrap()
            .as_deref()
            .unwrap_or("0"),
        "0"
    );

    // A new Envoy gets the current bundle before its listener takes traffic.
    stack.restart_envoy().await.unwrap();
    let agent = stack.agent_client(Some(&cert)).unwrap();
    let first = stack.request(&agent, "allowed.example", "/").await.unwrap();
    assert_eq!(first.status, 200, "first request after restart: {first:?}");
    let blocked = stack.request(&agent, "blocked.example", "/").await.unwrap();
    assert_eq!(blocked.body["reason"], "domain_blocked");
}

/// A batch the control plane refuses for its content (400, 413, 422) would be refused
/// forever: the filter splits it until the bad record is alone, drops and counts that one
/// record, and delivers the rest, in order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_costs_only_its_bad_record() {
    // An audit sink that refuses every batch holding a record for `/poison`, storing
    // nothing of it, and keeps the paths of the batches it accepts.
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = {
        let accepted = accepted.clone();
        axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let accepted = accepted.clone();
            async move {
                let batch: Value = serde_json::from_slice(&body).unwrap_or_default();
                let paths: Vec<String> = batch["entries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["path"].as_str().map(str::to_owned))
                    .collect();
                if paths.iter().any(|p| p == "/poison") {
                    return (axum::http::StatusCode::BAD_REQUEST, "poisoned batch");
                }
                accepted.lock().unwrap().extend(paths);
                (axum::http::StatusCode::CREATED, "stored")
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move { axum::serve(listener, sink).await });

    let mut stack = Stack::start(StackOptions {
        // One flush carries every request below: one batch, refused, then split.
        audit_flush_interval_ms: 1_000,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let setup = stack
        .tenant_with_agent(&["allowed.example"], &[])
        .await
        .unwrap();
    stack.set_audit_port(Some(port));
    stack.restart_envoy().await.unwrap();
    let agent = stack.agent_client(Some(&setup.cert)).unwrap();
    let mut sent = Vec::new();
    for i in 0..9 {
        let path = if i == 4 {
            "/poison".to_owned()
        } else {
            format!("/r{i}")
        };
        let reply = stack
            .request(&agent, "allowed.example", &path)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        if i != 4 {
            sent.push(path);
        }
    }
    integration_tests::wait_for(
        "every good record delivered",
        Duration::from_secs(20),
        || async {
            let got = accepted.lock().unwrap().clone();
            sent.iter().all(|p| got.contains(p)).then_some(())
        },
    )
    .await
    .unwrap();
    let dropped = integration_tests::wait_for(
        "the bad record dropped",
        Duration::from_secs(10),
        || async {
            let dropped = stack
                .envoy
                .stat("wasmcustom.chronoguard.audit_dropped")
                .await
                .ok()??;
            (dropped != "0").then_some(dropped)
        },
    )
    .await
    .unwrap();
    assert_eq!(dropped, "1", "only the bad record is lost");
    let got = accepted.lock().unwrap().clone();
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        got.len(),
        "each record delivered once: {got:?}"
    );
    assert!(!got.contains(&"/poison".to_owned()));
    server.abort();
}
