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

    // 20 writes back to back; Envoy must end on the last one.
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
    let last = published(&stack).await;
    integration_tests::wait_for(
        "envoy acks the last version",
        Duration::from_secs(10),
        || async { (envoy_acked(&stack).await.as_deref() == Some(last.as_str())).then_some(()) },
    )
    .await
    .unwrap();
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
