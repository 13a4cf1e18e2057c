//! Policy distribution over ECDS with real Envoy: bursts of changes, a NACKed bundle,
//! control-plane restarts under traffic.

use integration_tests::{Stack, StackOptions};
use reqwest::Method;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

async fn envoy_acked(stack: &Stack) -> Option<String> {
    let envoys = stack
        .admin(Method::GET, "/api/v1/envoys", None)
        .await
        .ok()?;
    envoys
        .as_array()?
        .iter()
        .find(|e| e["node_id"] == "gateway-1")?["acked_version"]
        .as_str()
        .map(str::to_owned)
}

async fn published(stack: &Stack) -> String {
    let ready = stack
        .admin(Method::GET, "/health/ready", None)
        .await
        .unwrap();
    ready["bundle_version"].as_i64().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_changes_converge_and_a_nacked_bundle_changes_nothing() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let policy = stack
        .create_policy(&tenant, "web", &["d0.example"], &[])
        .await
        .unwrap();
    let (_, cert) = stack
        .create_active_agent(&tenant, "bot", &[&policy])
        .await
        .unwrap();
    let agent = stack.agent_client(Some(&cert)).unwrap();

    // 20 writes back to back; Envoy must end on the last one, in a few pushes: the control
    // plane pushes at most once per `gateway.push_min_interval_ms` (1 s by default).
    let reloads = || async {
        stack
            .envoy
            .stat("extension_config_discovery.http_filter.chronoguard.config_reload")
            .await
            .unwrap()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let reloads_before = reloads().await;
    let writing = std::time::Instant::now();
    for i in 1..=20 {
        stack
            .admin(
                Method::PUT,
                &format!("/api/v1/policies/{policy}"),
                Some(json!({"name": "web", "allowed_domains": [format!("d{i}.example")]})),
            )
            .await
            .unwrap();
    }
    let written = writing.elapsed();
    let last = published(&stack).await;
    integration_tests::wait_for(
        "envoy acks the last version",
        Duration::from_secs(10),
        || async { (envoy_acked(&stack).await.as_deref() == Some(last.as_str())).then_some(()) },
    )
    .await
    .unwrap();
    // One push at the first write, one per second while writing, one after the last.
    let pushes = reloads().await - reloads_before;
    let most = written.as_secs() + 2;
    assert!(
        (1..=most).contains(&pushes),
        "20 writes in {written:?} reached Envoy as {pushes} pushes (at most {most})"
    );
    assert_eq!(
        stack
            .request(&agent, "d20.example", "/")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        stack
            .request(&agent, "d19.example", "/")
            .await
            .unwrap()
            .status,
        403
    );

    // A bundle that skips validation (test hook) is refused by every worker: Envoy NACKs
    // it and keeps enforcing the previous one.
    let broken = json!({
        "version": "broken",
        "mode": "enforce",
        "bundle": {"modules": [{"name": "chronoguard.rego", "source": "package chronoguard\ndecision := {"}], "data": {}}
    });
    let hooked = stack
        .admin(
            Method::POST,
            "/api/v1/testing/unvalidated-bundle",
            Some(json!({"plugin_config": broken.to_string()})),
        )
        .await
        .unwrap();
    let rejected = hooked["version"].as_i64().unwrap().to_string();
    let nack = integration_tests::wait_for("NACK recorded", Duration::from_secs(10), || async {
        let envoys = stack
            .admin(Method::GET, "/api/v1/envoys", None)
            .await
            .ok()?;
        let node = envoys
            .as_array()?
            .iter()
            .find(|e| e["node_id"] == "gateway-1")?
            .clone();
        (node["last_nack"]["rejected_version"] == rejected.as_str()).then_some(node)
    })
    .await
    .unwrap();
    assert_eq!(
        nack["acked_version"],
        last.as_str(),
        "Envoy still runs the last good version: {nack}"
    );
    assert!(!nack["last_nack"]["message"].as_str().unwrap().is_empty());
    assert_eq!(
        stack
            .request(&agent, "d20.example", "/")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        stack
            .request(&agent, "d19.example", "/")
            .await
            .unwrap()
            .status,
        403
    );
    let rejected_stat = stack
        .envoy
        .stat("extension_config_discovery.http_filter.chronoguard.update_rejected")
        .await
        .unwrap();
    assert!(rejected_stat.unwrap().parse::<u64>().unwrap() >= 1);

    // The next valid write supersedes the broken bundle.
    stack
        .admin(
            Method::PUT,
            &format!("/api/v1/policies/{policy}"),
            Some(json!({"name": "web", "allowed_domains": ["d21.example"]})),
        )
        .await
        .unwrap();
    let good = integration_tests::wait_for("recovery", Duration::from_secs(10), || async {
        let reply = stack.request(&agent, "d21.example", "/").await.ok()?;
        (reply.status == 200).then_some(reply)
    })
    .await
    .unwrap();
    assert_eq!(good.status, 200);
}

/// Waits until Envoy acknowledged the version published now; returns the node.
async fn synced(stack: &Stack) -> serde_json::Value {
    let version = published(stack).await;
    integration_tests::wait_for(
        "envoy acks the version",
        Duration::from_secs(10),
        || async {
            let node = node(stack, "gateway-1").await;
            (node["acked_version"] == version.as_str()).then_some(node)
        },
    )
    .await
    .unwrap()
}

/// After the first push of a stream, a push carries only what changed: a policy's new
/// domain, an agent suspended. Each is a few hundred bytes where a full configuration
/// holds the 8.8 KB Rego library alone, and each decides requests at once on every worker
/// as the full bundle would. A deletion goes in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_after_the_first_carry_only_what_changed() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let web = stack
        .create_policy(&tenant, "web", &["a.example"], &[])
        .await
        .unwrap();
    let spare = stack
        .create_policy(&tenant, "spare", &["s.example"], &[])
        .await
        .unwrap();
    let (_, cert) = stack
        .create_active_agent(&tenant, "bot", &[&web])
        .await
        .unwrap();
    let (other, other_cert) = stack
        .create_active_agent(&tenant, "other", &[&web])
        .await
        .unwrap();
    let agent = stack.agent_client(Some(&cert)).unwrap();
    let other_agent = stack.agent_client(Some(&other_cert)).unwrap();
    let first = synced(&stack).await;
    let library = include_str!("../../rego/policies/chronoguard.rego").len() as u64;

    let status = |client, domain| {
        let stack = &stack;
        async move { stack.request(client, domain, "/").await.unwrap().status }
    };
    let mut deltas = first["delta_pushes"].as_u64().unwrap();
    let mut pushed = |node: &serde_json::Value, what: &str| {
        let bytes = node["last_push_bytes"].as_u64().unwrap();
        assert!(
            node["delta_pushes"].as_u64().unwrap() > deltas,
            "{what}: not pushed as a delta: {node}"
        );
        assert!(
            bytes < library / 2,
            "{what}: {bytes} bytes pushed, the library alone has {library}"
        );
        deltas = node["delta_pushes"].as_u64().unwrap();
    };

    // A policy's domains change.
    stack
        .admin(
            Method::PUT,
            &format!("/api/v1/policies/{web}"),
            Some(json!({"name": "web", "allowed_domains": ["b.example"]})),
        )
        .await
        .unwrap();
    pushed(&synced(&stack).await, "a domain edit");
    for _ in 0..4 {
        assert_eq!(status(&agent, "b.example").await, 200);
        assert_eq!(status(&agent, "a.example").await, 403);
    }

    // An agent is suspended: its entry changes, the other agent's does not.
    stack
        .admin(
            Method::PATCH,
            &format!("/api/v1/agents/{other}"),
            Some(json!({"status": "suspended"})),
        )
        .await
        .unwrap();
    pushed(&synced(&stack).await, "a suspension");
    for _ in 0..4 {
        assert_eq!(status(&other_agent, "b.example").await, 403);
        assert_eq!(status(&agent, "b.example").await, 200);
    }

    let node = node(&stack, "gateway-1").await;
    assert!(node["last_nack"].is_null(), "{node}");
    assert_eq!(node["full_pushes"], first["full_pushes"], "{node}");

    // A policy no agent uses is deleted: that push goes in full, so the gateway is not
    // told the id of what it no longer has; the next edit is a delta again.
    let full_pushes = node["full_pushes"].as_u64().unwrap();
    stack
        .admin(Method::DELETE, &format!("/api/v1/policies/{spare}"), None)
        .await
        .unwrap();
    let node = synced(&stack).await;
    assert_eq!(
        node["full_pushes"].as_u64(),
        Some(full_pushes + 1),
        "{node}"
    );
    assert!(
        node["last_push_bytes"].as_u64().unwrap() > library,
        "{node}"
    );
    assert!(!config_dump(&stack.envoy).await.contains(&spare));
    stack
        .admin(
            Method::PUT,
            &format!("/api/v1/policies/{web}"),
            Some(json!({"name": "web", "allowed_domains": ["c.example"]})),
        )
        .await
        .unwrap();
    pushed(&synced(&stack).await, "an edit after a full push");
    assert_eq!(status(&agent, "c.example").await, 200);
    assert_eq!(status(&agent, "b.example").await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_under_traffic_never_lapses() {
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    let setup = stack
        .tenant_with_agent(&["ok.example"], &["no.example"])
        .await
        .unwrap();
    let agent = setup.client;
    let version_before = published(&stack).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (good, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, good, bad, agent) = (stop.clone(), good.clone(), bad.clone(), agent.clone());
        let url = stack.envoy.url("/");
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (domain, want) = if i.is_multiple_of(2) {
                    ("ok.example", 200)
                } else {
                    ("no.example", 403)
                };
                let status = agent
                    .get(&url)
                    .header("host", domain)
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                if status.ok() == Some(want) {
                    good.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.control_plane.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.control_plane.restart().await.unwrap();
    // The restarted control plane serves the same version (rebuilt from the database).
    assert_eq!(published(&stack).await, version_before);
    integration_tests::wait_for("envoy reconnects", Duration::from_secs(30), || async {
        (envoy_acked(&stack).await.as_deref() == Some(version_before.as_str())).then_some(())
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let (good, bad) = (good.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    println!("{good} requests decided correctly across the restart, {bad} not");
    assert!(good > 100);
    assert_eq!(bad, 0, "enforcement never lapsed");
}

/// `GET https://<domain>/` through `envoy` with `client`: status and deny reason.
async fn through(
    envoy: &integration_tests::envoy::Envoy,
    client: &reqwest::Client,
    domain: &str,
) -> (u16, String) {
    let response = client
        .get(envoy.url("/"))
        .header("host", domain)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Envoy's own view of the configuration it runs (the ECDS filter config included).
async fn config_dump(envoy: &integration_tests::envoy::Envoy) -> String {
    integration_tests::client::plain_client()
        .unwrap()
        .get(envoy.admin("/config_dump"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn node(stack: &Stack, node_id: &str) -> serde_json::Value {
    let envoys = stack
        .admin(Method::GET, "/api/v1/envoys", None)
        .await
        .unwrap();
    envoys
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node_id"] == node_id)
        .cloned()
        .unwrap_or_else(|| panic!("no node {node_id} in {envoys}"))
}

/// Two fleets serving one tenant each: every Envoy receives (and decides for) only the
/// tenants of its own fleet, moving a tenant between fleets takes effect, and a node of an
/// unregistered fleet gets the deny-all configuration and an error in the fleet view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fleet_receives_only_the_tenants_it_serves() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let fleet_a = integration_tests::stack::FLEET;
    let a = stack.create_tenant("tenant-a").await.unwrap();
    let b = stack.create_unserved_tenant("tenant-b").await.unwrap();
    let created = stack.set_fleet("fleet-b", &[&b]).await.unwrap();
    assert_eq!(created["tenant_ids"], json!([b]));
    let envoy_b = stack.start_envoy("gateway-b", "fleet-b").await.unwrap();
    let policy_a = stack
        .create_policy(&a, "web-a", &["a.example"], &[])
        .await
        .unwrap();
    let policy_b = stack
        .create_policy(&b, "web-b", &["b.example", "*.b.example"], &[])
        .await
        .unwrap();
    let (_, cert_a) = stack
        .create_active_agent(&a, "bot-a", &[&policy_a])
        .await
        .unwrap();
    let (_, cert_b) = stack
        .create_active_agent(&b, "bot-b", &[&policy_b])
        .await
        .unwrap();
    let client_a = stack.agent_client(Some(&cert_a)).unwrap();
    let client_b = stack.agent_client(Some(&cert_b)).unwrap();
    let envoy_a = &stack.envoy;

    // Decisions: each gateway knows only its fleet's agents.
    assert_eq!(
        through(envoy_a, &client_a, "a.example").await,
        (200, String::new())
    );
    assert_eq!(
        through(envoy_a, &client_b, "b.example").await,
        (403, "unknown_agent".into())
    );
    assert_eq!(
        through(&envoy_b, &client_b, "x.b.example").await,
        (200, String::new())
    );
    assert_eq!(
        through(&envoy_b, &client_a, "a.example").await,
        (403, "unknown_agent".into())
    );

    // Delivered configuration: the other tenant's data never reached the gateway.
    let (dump_a, dump_b) = (config_dump(envoy_a).await, config_dump(&envoy_b).await);
    assert!(dump_a.contains(&cert_a.fingerprint) && dump_a.contains(&policy_a));
    assert!(
        !dump_a.contains(&cert_b.fingerprint)
            && !dump_a.contains(&policy_b)
            && !dump_a.contains(&b)
    );
    assert!(dump_b.contains(&cert_b.fingerprint) && dump_b.contains(&policy_b));
    assert!(
        !dump_b.contains(&cert_a.fingerprint)
            && !dump_b.contains(&policy_a)
            && !dump_b.contains(&a)
    );

    // The control plane's view: fleets, versions, no errors.
    let (node_a, node_b) = (
        node(&stack, "gateway-1").await,
        node(&stack, "gateway-b").await,
    );
    assert_eq!(
        (node_a["fleet"].as_str(), node_b["fleet"].as_str()),
        (Some(fleet_a), Some("fleet-b"))
    );
    for n in [&node_a, &node_b] {
        assert!(n["error"].is_null(), "{n}");
        assert_eq!(n["acked_version"], n["expected_version"], "{n}");
    }
    assert_ne!(node_a["acked_version"], node_b["acked_version"]);
    let fleet_b = stack
        .admin(Method::GET, "/api/v1/gateways/fleet-b", None)
        .await
        .unwrap();
    assert_eq!(fleet_b["connected_envoys"], 1, "{fleet_b}");
    let version_b = fleet_b["bundle_version"].as_i64().unwrap();
    assert_eq!(node_b["acked_version"], version_b.to_string().as_str());

    // Admin API errors: problem JSON, nothing written.
    let put = |path: &str, body: serde_json::Value, if_match: Option<&str>| {
        let mut request = stack
            .http
            .put(stack.control_plane.url(path))
            .bearer_auth(&stack.control_plane.admin_token)
            .json(&body);
        if let Some(tag) = if_match {
            request = request.header("if-match", tag);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let kind = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert!(
                status < 300 || kind.starts_with("application/problem+json"),
                "{status} {kind}"
            );
            status
        }
    };
    let unknown_tenant = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        put("/api/v1/gateways/fleet-b", json!({"tenant_ids": []}), None).await,
        428
    );
    assert_eq!(
        put(
            "/api/v1/gateways/fleet-b",
            json!({"tenant_ids": []}),
            Some("\"99\"")
        )
        .await,
        412
    );
    assert_eq!(
        put(
            "/api/v1/gateways/fleet-b",
            json!({"tenant_ids": [unknown_tenant]}),
            Some("\"1\"")
        )
        .await,
        422
    );
    assert_eq!(
        put(
            "/api/v1/gateways/bad%20name",
            json!({"tenant_ids": []}),
            None
        )
        .await,
        400
    );
    assert_eq!(
        put("/api/v1/gateways/x", json!({"tenants": []}), None).await,
        400
    );
    assert_eq!(
        put(
            "/api/v1/gateways/ghost",
            json!({"tenant_ids": []}),
            Some("\"1\"")
        )
        .await,
        412
    );
    let unchanged = stack
        .admin(Method::GET, "/api/v1/gateways/fleet-b", None)
        .await
        .unwrap();
    assert_eq!(
        (unchanged["version"].as_i64(), &unchanged["tenant_ids"]),
        (Some(1), &json!([b]))
    );
    let missing = stack
        .admin_raw(Method::GET, "/api/v1/gateways/ghost", None)
        .await
        .unwrap();
    assert_eq!(missing.0, 404);
    let (conflict, _) = stack
        .admin_raw(Method::DELETE, "/api/v1/gateways/fleet-b", None)
        .await
        .unwrap();
    assert_eq!(
        conflict, 409,
        "a fleet with connected Envoys is not deleted by accident"
    );

    // Move tenant B to fleet A.
    stack.set_fleet(fleet_a, &[&a, &b]).await.unwrap();
    stack.set_fleet("fleet-b", &[]).await.unwrap();
    stack.wait_envoy_synced().await.unwrap();
    assert_eq!(
        through(envoy_a, &client_b, "b.example").await,
        (200, String::new())
    );
    assert_eq!(
        through(envoy_a, &client_a, "a.example").await,
        (200, String::new())
    );
    assert_eq!(
        through(&envoy_b, &client_b, "b.example").await,
        (403, "unknown_agent".into())
    );
    let dump_b = config_dump(&envoy_b).await;
    assert!(!dump_b.contains(&cert_b.fingerprint) && !dump_b.contains(&policy_b));
    assert!(config_dump(envoy_a).await.contains(&cert_b.fingerprint));
    let moved = node(&stack, "gateway-b").await;
    let moved_version: i64 = moved["acked_version"].as_str().unwrap().parse().unwrap();
    assert!(
        moved_version > version_b,
        "fleet versions only go up: {moved}"
    );

    // A gateway of an unregistered fleet: deny-all, no tenant data, a clear error.
    let stray = stack
        .start_envoy("gateway-stray", "no-such-fleet")
        .await
        .unwrap();
    assert_eq!(
        through(&stray, &client_a, "a.example").await,
        (403, "not_configured".into())
    );
    let dump = config_dump(&stray).await;
    assert!(!dump.contains(&cert_a.fingerprint) && !dump.contains(&cert_b.fingerprint));
    stack.wait_envoy_synced().await.unwrap();
    let stray_node = node(&stack, "gateway-stray").await;
    assert_eq!(stray_node["fleet"], "no-such-fleet");
    assert_eq!(stray_node["acked_version"], "deny-all");
    assert!(
        stray_node["error"]
            .as_str()
            .unwrap()
            .contains("not registered"),
        "{stray_node}"
    );
    // Registering its fleet takes effect without restarting it.
    stack.set_fleet("no-such-fleet", &[&a]).await.unwrap();
    stack.wait_envoy_synced().await.unwrap();
    assert_eq!(
        through(&stray, &client_a, "a.example").await,
        (200, String::new())
    );
    assert_eq!(
        through(&stray, &client_b, "b.example").await,
        (403, "unknown_agent".into())
    );
    assert!(node(&stack, "gateway-stray").await["error"].is_null());

    // Deleting a fleet (forced, its Envoy is connected) fails its gateways closed.
    let (deleted, _) = stack
        .admin_raw(Method::DELETE, "/api/v1/gateways/fleet-b?force=true", None)
        .await
        .unwrap();
    assert_eq!(deleted, 204);
    stack.wait_envoy_synced().await.unwrap();
    assert_eq!(
        through(&envoy_b, &client_b, "b.example").await,
        (403, "not_configured".into())
    );
    drop((envoy_b, stray));
}
