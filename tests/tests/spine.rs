//! The spine, end to end: real Envoy loading the built filter, policy over ECDS from the
//! control plane, audit entries chained in real PostgreSQL.

use integration_tests::{Stack, StackOptions};
use reqwest::Method;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_deny_policy_flip_and_verified_audit_chain() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let policy = stack
        .create_policy(
            &tenant,
            "web",
            &["allowed.example", "*.docs.example"],
            &["blocked.example"],
        )
        .await
        .unwrap();
    let (agent_id, cert) = stack
        .create_active_agent(&tenant, "crawler-1", &[&policy])
        .await
        .unwrap();
    let agent = stack.agent_client(Some(&cert)).unwrap();

    // 1. Allowed domain reaches the upstream; blocked domain gets a JSON 403.
    let hits_before = stack.upstream.hits();
    let allowed = wait_for_status(&stack, &agent, "allowed.example", 200).await;
    assert_eq!(allowed.body["upstream"], "chronoguard-demo-upstream");
    assert_eq!(allowed.body["host"], "allowed.example");
    assert!(
        !allowed.body["decision_id"].as_str().unwrap().is_empty(),
        "the upstream sees the decision id header"
    );
    assert_eq!(
        allowed.body["decision_id"].as_str(),
        allowed.decision_id.as_deref(),
        "the upstream and the client see the same decision id"
    );
    assert!(stack.upstream.hits() > hits_before);
    let sub = stack
        .request(&agent, "api.docs.example", "/v1/x?token=secret")
        .await
        .unwrap();
    assert_eq!(sub.status, 200, "{sub:?}");

    let blocked = stack.request(&agent, "blocked.example", "/").await.unwrap();
    assert_eq!(blocked.status, 403, "{blocked:?}");
    assert_eq!(blocked.body["decision"], "deny");
    assert_eq!(blocked.body["reason"], "domain_blocked");
    assert_eq!(blocked.body["policy_id"], policy.as_str());
    assert_eq!(
        blocked.body["request_id"],
        blocked.decision_id.clone().unwrap().as_str()
    );

    let unlisted = stack.request(&agent, "other.example", "/").await.unwrap();
    assert_eq!(
        (unlisted.status, unlisted.body["reason"].as_str()),
        (403, Some("no_matching_policy"))
    );

    // A client without a certificate does not get through the TLS handshake.
    let anonymous = stack.agent_client(None).unwrap();
    assert!(
        stack
            .request(&anonymous, "allowed.example", "/")
            .await
            .is_err()
    );
    // A certificate from the tenant CA that is not registered is denied as unknown.
    let stranger = stack.pki.agent("stranger").unwrap();
    let stranger = stack.agent_client(Some(&stranger)).unwrap();
    let unknown = stack
        .request(&stranger, "allowed.example", "/")
        .await
        .unwrap();
    assert_eq!(
        (unknown.status, unknown.body["reason"].as_str()),
        (403, Some("unknown_agent"))
    );

    // 2. The policy came over ECDS: Envoy's ECDS version equals the published bundle.
    let ready = stack
        .admin(Method::GET, "/health/ready", None)
        .await
        .unwrap();
    let version = ready["bundle_version"].as_i64().unwrap().to_string();
    let ecds_version = stack
        .envoy
        .stat("extension_config_discovery.http_filter.chronoguard.version_text")
        .await
        .unwrap();
    assert_eq!(
        ecds_version.as_deref(),
        Some(format!("\"{version}\"").as_str())
    );

    // Flip the policy through the REST API: allowed.example becomes blocked, no restart.
    let envoy_pid = stack.envoy.pid();
    let started = Instant::now();
    stack
        .admin(
            Method::PUT,
            &format!("/api/v1/policies/{policy}"),
            Some(json!({"name": "web", "allowed_domains": ["*.docs.example"], "blocked_domains": ["allowed.example", "blocked.example"]})),
        )
        .await
        .unwrap();
    let flipped = wait_for_status(&stack, &agent, "allowed.example", 403).await;
    let elapsed = started.elapsed();
    println!("policy flip enforced by Envoy {elapsed:?} after the REST write");
    assert_eq!(flipped.body["reason"], "domain_blocked");
    assert!(elapsed < Duration::from_secs(5), "flip took {elapsed:?}");
    assert_eq!(stack.envoy.pid(), envoy_pid, "envoy was not restarted");
    let envoys = stack
        .admin(Method::GET, "/api/v1/envoys", None)
        .await
        .unwrap();
    assert_eq!(envoys[0]["node_id"], "gateway-1");

    // 3. Every decision is a chained audit entry in PostgreSQL.
    let decision_ids = [&allowed, &sub, &blocked, &unlisted, &flipped]
        .map(|r| r.decision_id.clone().expect("decision id header"));
    let stored = stack
        .audit_entries_with(&tenant, &decision_ids, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(stored.len() >= decision_ids.len());
    let rows = chain_rows(&stack, &tenant).await;
    recompute_chain(&rows);
    let sub_row = rows.iter().find(|r| r.entry_id == decision_ids[1]).unwrap();
    assert_eq!(sub_row.path, "/v1/x", "query strings are not audited");
    assert_eq!(sub_row.agent_id.as_deref(), Some(agent_id.as_str()));
    // Each worker VM flushes its own buffer: wait for the one holding the unknown agent's.
    integration_tests::wait_for("gateway chain entry", Duration::from_secs(20), || async {
        let unknown_rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_entries WHERE tenant_id = '00000000-0000-0000-0000-000000000000' AND reason = 'unknown_agent'",
        )
        .fetch_one(&stack.db)
        .await
        .ok()?;
        (unknown_rows >= 1).then_some(())
    })
    .await
    .expect("unattributed decisions land in the gateway chain");

    // Admin changes are chained in the same tenant chain (who, what, before/after version).
    let admin: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT method, path, reason, agent_subject FROM audit_entries
         WHERE tenant_id = $1::uuid AND kind = 'admin' ORDER BY sequence_number",
    )
    .bind(&tenant)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    let update = admin
        .iter()
        .find(|(action, ..)| action == "policy.updated")
        .unwrap_or_else(|| panic!("no policy.updated admin entry in {admin:?}"));
    assert_eq!(update.1, format!("policy/{policy}"));
    assert_eq!(update.2, "version 1 -> 2");
    assert!(!update.3.is_empty(), "the actor is recorded");
    assert!(admin.iter().any(|(action, ..)| action == "agent.created"));
    assert!(admin.iter().any(|(action, ..)| action == "tenant.created"));

    // Every API response carries a request id; /metrics counts pushes and NACKs.
    let live = stack
        .http
        .get(stack.control_plane.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert!(live.headers().contains_key("x-request-id"));
    let metrics = stack
        .http
        .get(stack.control_plane.url("/metrics"))
        .bearer_auth(&stack.control_plane.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let publishes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chronoguard_bundle_publishes_total "))
        .expect("publish counter")
        .parse()
        .unwrap();
    assert!(publishes >= 2, "{metrics}");
    assert!(
        metrics.contains("chronoguard_ecds_nacks_total 0"),
        "{metrics}"
    );

    let verify_path = format!("/api/v1/audit/verify?tenant_id={tenant}");
    let verdict = stack.admin(Method::GET, &verify_path, None).await.unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");

    // Tamper with one stored row: verify names that entry.
    let target = rows[1].sequence_number;
    sqlx::query("UPDATE audit_entries SET domain = 'tampered.example' WHERE tenant_id = $1::uuid AND sequence_number = $2")
        .bind(&tenant)
        .bind(target)
        .execute(&stack.db)
        .await
        .unwrap();
    let verdict = stack.admin(Method::GET, &verify_path, None).await.unwrap();
    assert_eq!(verdict["ok"], false, "{verdict}");
    assert_eq!(verdict["first_bad_sequence"], target, "{verdict}");
    assert_eq!(verdict["problem"], "hash_mismatch", "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_ingest_requires_the_filter_credential_and_stores_a_retry_once() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let url = stack.control_plane.url("/api/v1/audit/batches");
    let batch = json!({
        "batch_id": uuid::Uuid::new_v4(),
        "entries": [{
            "decision_id": uuid::Uuid::new_v4(), "timestamp_ns": 1_764_000_000_000_000_000u64,
            "tenant_id": null, "agent_id": null, "agent_fingerprint": "", "agent_subject": "",
            "domain": "x.example", "method": "GET", "path": "/", "user_agent": "t",
            "source_ip": "127.0.0.1", "decision": "deny", "reason": "no_certificate",
            "policy_id": null, "config_version": "1"
        }]
    });
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM audit_entries WHERE domain = 'x.example'",
        )
        .fetch_one(&stack.db)
        .await
        .unwrap()
    };
    for token in [
        None,
        Some(stack.control_plane.admin_token.as_str()),
        Some("wrong"),
    ] {
        let mut request = stack.http.post(&url).json(&batch);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(count().await, 0);

    let send = || {
        stack
            .http
            .post(&url)
            .bearer_auth(&stack.control_plane.ingest_token)
            .json(&batch)
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 201);
    let retry = send().await.unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(
        retry.json::<serde_json::Value>().await.unwrap()["duplicate"],
        true
    );
    assert_eq!(count().await, 1);

    let mut bad = batch.clone();
    bad["batch_id"] = json!(uuid::Uuid::new_v4());
    bad["entries"][0]["decision"] = json!("maybe");
    let response = stack
        .http
        .post(&url)
        .bearer_auth(&stack.control_plane.ingest_token)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(count().await, 1);
}

async fn wait_for_status(
    stack: &Stack,
    client: &reqwest::Client,
    domain: &str,
    status: u16,
) -> integration_tests::stack::Reply {
    integration_tests::wait_for(
        &format!("{domain} → {status}"),
        Duration::from_secs(10),
        || async {
            stack
                .request(client, domain, "/")
                .await
                .ok()
                .filter(|r| r.status == status)
        },
    )
    .await
    .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    tenant_id: String,
    sequence_number: i64,
    entry_id: String,
    timestamp_ns: i64,
    kind: String,
    agent_id: Option<String>,
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
    previous_hash: String,
    current_hash: String,
}

async fn chain_rows(stack: &Stack, tenant: &str) -> Vec<Row> {
    sqlx::query_as(
        "SELECT tenant_id::text, sequence_number, entry_id::text, timestamp_ns, kind, agent_id::text,
                agent_fingerprint, agent_subject, domain, method, path, user_agent, source_ip,
                decision, reason, policy_id, config_version, previous_hash, current_hash
         FROM audit_entries WHERE tenant_id = $1::uuid ORDER BY sequence_number",
    )
    .bind(tenant)
    .fetch_all(&stack.db)
    .await
    .unwrap()
}

/// Recomputes the chain from the stored rows, independently of the control plane's code,
/// following docs/audit-chain.md.
fn recompute_chain(rows: &[Row]) {
    let mut previous = [0u8; 32];
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.sequence_number, i as i64 + 1, "gapless sequence");
        assert_eq!(
            row.previous_hash,
            hex::encode(previous),
            "link at {}",
            row.sequence_number
        );
        let seq = row.sequence_number.to_string();
        let ts = row.timestamp_ns.to_string();
        let fields: [Option<&str>; 17] = [
            Some(&row.tenant_id),
            Some(&seq),
            Some(&row.entry_id),
            Some(&ts),
            Some(&row.kind),
            row.agent_id.as_deref(),
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
        ];
        let current = integration_tests::chain::link(fields, &previous);
        assert_eq!(
            row.current_hash,
            hex::encode(current),
            "hash at {}",
            row.sequence_number
        );
        previous = current;
    }
}
