//! The filter's decision classes through real Envoy (2 workers) with policies made through
//! the REST API: rule conditions, custom Rego, dry-run, time windows relative to now, rate
//! limits shared across workers, stats.

use filter_core::config::ConfigRead;
use integration_tests::{Stack, StackOptions};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

async fn policy(stack: &Stack, body: Value) -> String {
    let created = stack
        .admin(Method::POST, "/api/v1/policies", Some(body))
        .await
        .unwrap();
    created["id"].as_str().unwrap().to_owned()
}

async fn send(
    stack: &Stack,
    client: &reqwest::Client,
    method: Method,
    domain: &str,
    path: &str,
) -> (u16, Value, Option<String>) {
    let response = client
        .request(method, stack.envoy.url(path))
        .header("host", domain)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        retry_after,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_custom_rego_and_dry_run() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let enforce = policy(&stack, json!({
        "tenant_id": tenant, "name": "api", "priority": 10,
        "allowed_domains": ["api.example"],
        "rules": [
            {"id": "no-delete", "priority": 10, "action": "deny",
             "conditions": [{"field": "method", "operator": "equals", "value": "DELETE"}]},
            {"id": "loopback-internal", "priority": 5, "action": "allow",
             "conditions": [{"field": "source_ip", "operator": "cidr", "value": "127.0.0.0/8"},
                            {"field": "domain", "operator": "equals", "value": "internal.example"}]}
        ],
        "custom_rego": "package mine\nimport rego.v1\ndeny contains \"no_tokens_in_path\" if contains(input.request.path, \"token\")\n"
    })).await;
    let dry = policy(
        &stack,
        json!({
            "tenant_id": tenant, "name": "candidate", "priority": 100, "mode": "dry_run",
            "blocked_domains": ["api.example"]
        }),
    )
    .await;
    let (_, cert) = stack
        .create_active_agent(&tenant, "bot", &[&enforce, &dry])
        .await
        .unwrap();
    let agent = stack.agent_client(Some(&cert)).unwrap();

    let (status, _, _) = send(&stack, &agent, Method::GET, "api.example", "/items").await;
    assert_eq!(status, 200, "dry-run policies never block");
    // A header value that is not UTF-8 (obs-text, which Envoy passes on) is read lossily,
    // never a panic of the worker's VM: this request and the next are decided.
    for _ in 0..2 {
        let response = agent
            .get(stack.envoy.url("/items"))
            .header("host", "api.example")
            .header(
                "user-agent",
                reqwest::header::HeaderValue::from_bytes(b"bot\xff/1").unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert!(response.headers().contains_key("x-chronoguard-decision-id"));
    }
    let (status, _, _) = send(&stack, &agent, Method::DELETE, "api.example", "/x").await;
    assert_eq!(status, 403, "the worker still decides after such a header");
    let (status, body, _) = send(&stack, &agent, Method::DELETE, "api.example", "/items/1").await;
    assert_eq!(
        (status, body["reason"].as_str(), body["rule_id"].as_str()),
        (403, Some("rule_denied"), Some("no-delete")),
        "{body}"
    );
    let (status, _, _) = send(&stack, &agent, Method::GET, "internal.example", "/").await;
    assert_eq!(status, 200, "cidr + equals rule allows");
    let (status, body, _) = send(&stack, &agent, Method::GET, "api.example", "/v1/token/abc").await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("custom:no_tokens_in_path")),
        "{body}"
    );

    // The dry-run verdict is in the audit log.
    let dry_run_reason = integration_tests::wait_for("dry-run audit record", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, String>(
            "SELECT reason FROM audit_entries WHERE tenant_id = $1::uuid AND reason LIKE 'dry_run_deny:%' LIMIT 1",
        )
        .bind(&tenant)
        .fetch_optional(&stack.db)
        .await
        .ok()
        .flatten()
    })
    .await
    .unwrap();
    assert_eq!(dry_run_reason, "dry_run_deny:domain_blocked");

    // A broken custom module is refused before it reaches Envoy.
    let (status, problem) = stack
        .admin_raw(
            Method::POST,
            "/api/v1/policies",
            Some(json!({
                "tenant_id": tenant, "name": "broken", "allowed_domains": ["x.example"],
                "custom_rego": "package p\ndeny contains x if {\n"
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{problem}");
    // Reason stats are exported by Envoy (handed over on the filter's next tick).
    integration_tests::wait_for("reason stat", Duration::from_secs(5), || async {
        let denied = stack
            .envoy
            .stat("wasmcustom.chronoguard.reason.deny.rule_denied")
            .await
            .ok()??;
        // The two DELETEs above.
        (denied == "2").then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_windows_relative_to_now() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    // Asia/Kolkata is UTC+05:30 all year: local minute = UTC minute + 330.
    let now = chrono_minute() + 330;
    let hhmm = |m: i64| format!("{:02}:{:02}", m.rem_euclid(1440) / 60, m.rem_euclid(60));
    let all_days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let window = |start: i64, end: i64| json!({"timezone": "Asia/Kolkata", "windows": [{"days": all_days, "start": hhmm(start), "end": hhmm(end)}]});
    let id = policy(
        &stack,
        json!({
            "tenant_id": tenant, "name": "office", "allowed_domains": ["work.example"],
            "time_restrictions": window(now - 60, now + 60)
        }),
    )
    .await;
    let (_, cert) = stack
        .create_active_agent(&tenant, "bot", &[&id])
        .await
        .unwrap();
    let agent = stack.agent_client(Some(&cert)).unwrap();
    let (status, body, _) = send(&stack, &agent, Method::GET, "work.example", "/").await;
    assert_eq!(status, 200, "inside the window: {body}");

    let update = json!({
        "name": "office", "allowed_domains": ["work.example"],
        "time_restrictions": window(now + 120, now + 180)
    });
    stack
        .admin(Method::PUT, &format!("/api/v1/policies/{id}"), Some(update))
        .await
        .unwrap();
    let body =
        integration_tests::wait_for("outside the window", Duration::from_secs(10), || async {
            let (status, body, _) = send(&stack, &agent, Method::GET, "work.example", "/").await;
            (status == 403).then_some(body)
        })
        .await
        .unwrap();
    assert_eq!(body["reason"], "outside_time_window");

    let (status, problem) = stack
        .admin_raw(
            Method::POST,
            "/api/v1/policies",
            Some(json!({
                "tenant_id": tenant, "name": "bad-tz", "allowed_domains": ["x.example"],
                "time_restrictions": {"timezone": "Mars/Olympus", "windows": []}
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_across_workers() {
    let stack = Stack::start(StackOptions {
        concurrency: 2,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let id = policy(
        &stack,
        json!({
            "tenant_id": tenant, "name": "limited", "allowed_domains": ["api.example"],
            "rate_limit": {"per_minute": 5, "burst": 5}
        }),
    )
    .await;
    let (_, cert) = stack
        .create_active_agent(&tenant, "bot", &[&id])
        .await
        .unwrap();
    // Separate connections spread over both worker threads.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = stack.agent_client(Some(&cert)).unwrap();
        let url = stack.envoy.url("/");
        tasks.push(tokio::spawn(async move {
            let response = client
                .get(url)
                .header("host", "api.example")
                .send()
                .await
                .unwrap();
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, retry, body)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let allowed = results.iter().filter(|r| r.0 == 200).count();
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(allowed, 5, "one bucket for all workers: {results:?}");
    assert_eq!(limited.len(), 15);
    for (_, retry, body) in limited {
        let retry: u64 = retry.as_deref().unwrap().parse().unwrap();
        assert!((1..=12).contains(&retry), "retry-after {retry}");
        assert_eq!(body["reason"], "rate_limited");
        assert_eq!(body["retry_after_seconds"], retry);
    }
}

/// A push keeps the memoised decisions of the agents it left alone (agent, policies,
/// modules and timezones unchanged), and of the agents it changed only in domain lists
/// those decisions' domains do not meet or in priorities that keep the agent's policies
/// in their order, and decides again for the others
/// (`CompiledPolicy::inherit_memo`): counted by the filter's `memo_hits`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_keeps_the_decisions_it_did_not_change() {
    // One worker, so every request meets the same VM and its memo.
    let (stack, tenant) = stack_with_workers(1).await;
    let kept = stack
        .create_policy(&tenant, "kept", &["a.example"], &[])
        .await
        .unwrap();
    let changed = stack
        .create_policy(&tenant, "changed", &["b.example"], &[])
        .await
        .unwrap();
    let one = agent(&stack, &tenant, "one", &kept).await;
    let two = agent(&stack, &tenant, "two", &changed).await;
    for (client, domain) in [(&one, "a.example"), (&two, "b.example")] {
        let (status, _, _) = send(&stack, client, Method::GET, domain, "/").await;
        assert_eq!(status, 200);
    }
    // Pushes that change agent two's policy; each waits until c.example's decision on the
    // worker shows it.
    let push = |policy: serde_json::Value, c_status: u16| {
        let (stack, two, changed) = (&stack, &two, &changed);
        async move {
            stack
                .admin(
                    Method::PUT,
                    &format!("/api/v1/policies/{changed}"),
                    Some(policy),
                )
                .await
                .unwrap();
            integration_tests::wait_for(
                "the push on the worker",
                Duration::from_secs(15),
                || async {
                    let (status, _, _) = send(stack, two, Method::GET, "c.example", "/").await;
                    (status == c_status).then_some(())
                },
            )
            .await
            .unwrap();
        }
    };
    let hits = || stat_after_tick(&stack, "wasmcustom.chronoguard.memo_hits");
    let expect_hits = |client, domain, more: u64, why: &'static str| {
        let hits = &hits;
        let stack = &stack;
        async move {
            let before = hits().await;
            let (status, _, _) = send(stack, client, Method::GET, domain, "/").await;
            assert_eq!(status, 200);
            assert_eq!(hits().await, before + more, "{domain}: {why}");
        }
    };
    // `changed` also allows c.example now: only its domain list changes.
    push(
        json!({"name": "changed", "priority": 100, "allowed_domains": ["b.example", "c.example"]}),
        200,
    )
    .await;
    expect_hits(
        &one,
        "a.example",
        1,
        "agent one's decision survives the push",
    )
    .await;
    expect_hits(
        &two,
        "b.example",
        1,
        "agent two's policy changed only in a domain b.example does not meet: its decision survives",
    )
    .await;
    // It gains a rule (one that no request here meets, on a field every decision reads
    // already, so the memo's key stays), and c.example goes: agent two's decisions are
    // taken again.
    let rules = json!([{"id": "not-here", "priority": 1, "action": "deny", "conditions": [
        {"field": "domain", "operator": "equals", "value": "d.example"}]}]);
    push(
        json!({"name": "changed", "priority": 100, "allowed_domains": ["b.example"], "rules": rules}),
        403,
    )
    .await;
    expect_hits(
        &two,
        "b.example",
        0,
        "the policy's rules changed: decided again",
    )
    .await;
    expect_hits(&two, "b.example", 1, "and memoised again").await;
    // Its priority changes (and c.example comes back): agent two has no other policy for
    // the priority to be ordered against, so its decisions survive.
    push(
        json!({"name": "changed", "priority": 50, "allowed_domains": ["b.example", "c.example"], "rules": rules}),
        200,
    )
    .await;
    expect_hits(
        &two,
        "b.example",
        1,
        "a priority that keeps the agent's policies in their order: the decision survives",
    )
    .await;
    expect_hits(
        &one,
        "a.example",
        1,
        "agent one's decision survives every push",
    )
    .await;
}

/// The tick decides ahead of time the memoised decisions in use that a time boundary is
/// about to change (`CompiledPolicy::warm`): the first request after a window opens finds
/// its new decision memoised. Counted by `memo_warmed` and `memo_hits`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_taken_ahead_of_a_time_boundary() {
    // One worker, so every request meets the same VM and its memo.
    let (stack, tenant) = stack_with_workers(1).await;
    let unix_s = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    // A window opening at the start of the minute after next, in Asia/Kolkata (UTC+05:30
    // all year).
    let opens_at = (unix_s() / 60 + 2) * 60;
    let start = (opens_at / 60 % 1440 + 330) % 1440;
    let hhmm = |m: u64| format!("{:02}:{:02}", m % 1440 / 60, m % 60);
    let all_days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let id = policy(
        &stack,
        json!({
            "tenant_id": tenant, "name": "opens-soon", "allowed_domains": ["soon.example"],
            "time_restrictions": {"timezone": "Asia/Kolkata",
                "windows": [{"days": all_days, "start": hhmm(start), "end": hhmm(start + 60)}]}
        }),
    )
    .await;
    let bot = agent(&stack, &tenant, "bot", &id).await;
    // Decided, then asked for again: a decision in use.
    for _ in 0..2 {
        let (status, body, _) = send(&stack, &bot, Method::GET, "soon.example", "/").await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["reason"], "outside_time_window");
    }
    integration_tests::wait_for(
        "the decision taken ahead of the window",
        Duration::from_secs(150),
        || async {
            let warmed = stack.envoy.stat("wasmcustom.chronoguard.memo_warmed").await;
            let warmed: u64 = warmed.ok()??.parse().ok()?;
            (warmed >= 1).then_some(())
        },
    )
    .await
    .unwrap();
    assert!(
        unix_s() < opens_at,
        "decided ahead, before the window opens"
    );
    tokio::time::sleep(Duration::from_secs(opens_at + 1 - unix_s())).await;
    let hits = || stat_after_tick(&stack, "wasmcustom.chronoguard.memo_hits");
    let before = hits().await;
    let (status, body, _) = send(&stack, &bot, Method::GET, "soon.example", "/").await;
    assert_eq!(status, 200, "inside the window: {body}");
    assert_eq!(
        hits().await,
        before + 1,
        "the new decision was memoised ahead"
    );
}

/// The filter reads a connection's peer (certificate digest, subject, address) from Envoy
/// once and keeps it by connection id (`connection_id`): at most one read per connection,
/// none for further requests on a kept-alive one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_reads_its_peer_once() {
    // One worker, so every request meets the same VM and its cache.
    let (stack, tenant) = stack_with_workers(1).await;
    let policy = stack
        .create_policy(&tenant, "p", &["a.example"], &[])
        .await
        .unwrap();
    let one = agent(&stack, &tenant, "one", &policy).await;
    let two = agent(&stack, &tenant, "two", &policy).await;
    // Peers read by the filter, and connections the gateway listener accepted.
    let [reads, connections] = peer_reads_and_connections(&stack).await;
    let requests = 21;
    for client in std::iter::repeat_n(&one, requests - 1).chain([&two]) {
        let (status, _, _) = send(&stack, client, Method::GET, "a.example", "/").await;
        assert_eq!(status, 200);
    }
    let [reads_after, connections_after] = peer_reads_and_connections(&stack).await;
    let opened = connections_after - connections;
    assert!(
        (2..requests as u64).contains(&opened),
        "the clients kept their connections alive: {opened} connections for {requests} requests"
    );
    // Each client's first request reads its peer; the rest read none. (The client may open
    // a connection it never sends a request on: hence at most, not exactly, one per
    // connection.)
    let read = reads_after - reads;
    assert!(
        (2..=opened).contains(&read),
        "{read} peer reads for {requests} requests on {opened} connections"
    );
}

/// The gateway offers HTTP/2 by ALPN: an agent that takes it sends its requests as
/// streams of one connection. Each stream is decided for the agent whose certificate that
/// connection verified (the peer header names the connection, not the stream), the filter
/// reads that peer once, and a burst of concurrent requests opens no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_are_decided_for_their_connections_agent() {
    // One worker, so every request meets the same VM and its connection cache.
    let (stack, tenant) = stack_with_workers(1).await;
    let (allowed, blocked) = allowed_and_blocked(&stack, &tenant).await;
    let mut certs = Vec::new();
    for (name, policy) in [("one", &allowed), ("two", &blocked)] {
        let (_, cert) = stack
            .create_active_agent(&tenant, name, &[policy])
            .await
            .unwrap();
        certs.push(cert);
    }
    let [reads, connections] = peer_reads_and_connections(&stack).await;
    // One HTTP/2 connection per agent (ALPN `h2`, checked when it is opened).
    let mut senders = Vec::new();
    for cert in &certs {
        senders.push(stack.agent_h2_connection(Some(cert)).await.unwrap());
    }
    // 2 × 50 requests in flight together, interleaved between the two agents.
    let burst = (0..50).flat_map(|_| senders.iter().zip([200u16, 403]));
    let answers = futures::future::join_all(burst.map(|(sender, want)| async move {
        let response = integration_tests::client::h2_get(sender, "a.example", "/")
            .await
            .unwrap();
        (response.version(), response.status().as_u16(), want)
    }))
    .await;
    for (version, status, want) in &answers {
        assert_eq!(*version, hyper::Version::HTTP_2);
        assert_eq!(
            status, want,
            "a stream decided for the other connection's agent"
        );
    }
    let [reads_after, connections_after] = peer_reads_and_connections(&stack).await;
    assert_eq!(
        connections_after - connections,
        2,
        "one connection per agent for {} requests",
        answers.len()
    );
    assert_eq!(reads_after - reads, 2, "one peer read per connection");
}

/// The listener names each request's connection in `x-chronoguard-peer` with a token from
/// Envoy's environment, over whatever a client sent, and the filter believes the header
/// only with that token (`envoy-config/README.md`, "Identity"). An agent cannot borrow
/// another agent's connection: with the listener's mutation its header is overwritten,
/// token or not; without the mutation (a bootstrap that lacks it) a header without the
/// token is ignored and counted, and the filter reads the connection itself. The token is
/// the secret: shown last, with it and no mutation a header does name another connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_envoy_names_a_requests_connection() {
    // One worker, so every request meets the same VM and its connection cache.
    let (mut stack, tenant) = stack_with_workers(1).await;
    let (allowed, blocked) = allowed_and_blocked(&stack, &tenant).await;
    let one = agent(&stack, &tenant, "one", &allowed).await;
    let two = agent(&stack, &tenant, "two", &blocked).await;
    const IGNORED: &str = "wasmcustom.chronoguard.peer_header_ignored";
    let wrong = "0123456789abcdef0123456789abcdef".to_owned();
    for token in [wrong.clone(), stack.envoy.peer_token.clone()] {
        let statuses = borrow(&stack, &one, &two, &token).await;
        assert!(statuses.iter().all(|s| *s == 403), "{statuses:?}");
    }
    assert_eq!(stat_after_tick(&stack, IGNORED).await, 0, "Envoy's headers");

    // A bootstrap without the listener's mutation: clients' headers reach the filter.
    stack.set_envoy_peer_header(false);
    stack.restart_envoy().await.unwrap();
    let statuses = borrow(&stack, &one, &two, &wrong).await;
    assert!(statuses.iter().all(|s| *s == 403), "{statuses:?}");
    assert_eq!(stat_after_tick(&stack, IGNORED).await, 64);
    let (status, _, _) = send(&stack, &two, Method::GET, "a.example", "/").await;
    assert_eq!(status, 403, "two's own request");
    let statuses = borrow(&stack, &one, &two, &stack.envoy.peer_token).await;
    assert!(
        statuses.contains(&200),
        "with the token a header names a connection: {statuses:?}"
    );
    assert_eq!(stat_after_tick(&stack, IGNORED).await, 64);
}

/// `two` names each of the first connection ids with `token`, after `one` (kept alive,
/// known to the filter) was allowed on one of them; returns the statuses `two` got.
async fn borrow(
    stack: &Stack,
    one: &reqwest::Client,
    two: &reqwest::Client,
    token: &str,
) -> Vec<u16> {
    let (status, _, _) = send(stack, one, Method::GET, "a.example", "/").await;
    assert_eq!(status, 200, "one's own request");
    let mut statuses = Vec::new();
    for id in 0..64 {
        let response = two
            .get(stack.envoy.url("/"))
            .header("host", "a.example")
            .header("x-chronoguard-peer", format!("{token}:{id}"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses
}

/// The decision id is the request id Envoy writes (`use_remote_address: true`): a client
/// cannot choose it, even with a well-formed `x-request-id` of its own. Allowed requests
/// carry it upstream as both headers, the client sees it on every answer, and the audit
/// entry has it. The site learns neither the agent's address (`x-forwarded-for`) nor
/// Envoy's `x-envoy-*` headers, which `use_remote_address` would otherwise add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_id_is_envoys_request_id_and_no_client_chooses_it() {
    let (stack, tenant) = stack_with_workers(1).await;
    let chosen = "11111111-2222-4333-8444-555555555555";
    let ids = decision_ids(&stack, &tenant, &[Some(chosen), Some("not-a-uuid"), None]).await;
    assert!(!ids.iter().any(|id| id == chosen), "{ids:?}");
}

/// With `generate_request_id: false` Envoy writes no request id: the filter makes the
/// decision id and writes it into `x-request-id`, which the route copies as it copies
/// Envoy's. A client's id that is not a UUID gets the same treatment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_envoys_request_id_the_filter_makes_the_decision_id() {
    let (mut stack, tenant) = stack_with_workers(1).await;
    stack.set_envoy_request_ids(false);
    stack.restart_envoy().await.unwrap();
    let ids = decision_ids(&stack, &tenant, &[Some("not-a-uuid"), None]).await;
    assert!(!ids.iter().any(|id| id == "not-a-uuid"), "{ids:?}");
}

/// For each of `own` (a client's `x-request-id`, or none), one allowed and one denied
/// request of a new agent of `tenant`; checks that each answer has exactly one decision
/// id, a lower-case hyphenated UUID, that the upstream saw it in both headers and no
/// forwarding headers, that a denial's body names it, that no two are alike and that all
/// are audit entries. Returns them.
async fn decision_ids(stack: &Stack, tenant: &str, own: &[Option<&str>]) -> Vec<String> {
    let policy = stack
        .create_policy(tenant, "p", &["a.example"], &["b.example"])
        .await
        .unwrap();
    let client = agent(stack, tenant, "one", &policy).await;
    let mut ids = Vec::new();
    for (domain, status) in [("a.example", 200), ("b.example", 403)] {
        for own in own {
            let mut request = client.get(stack.envoy.url("/")).header("host", domain);
            if let Some(own) = own {
                request = request.header("x-request-id", *own);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{domain} {own:?}");
            let all: Vec<_> = response
                .headers()
                .get_all("x-chronoguard-decision-id")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            let [id] = all.as_slice() else {
                panic!("one decision id per answer: {all:?}");
            };
            let id = id.clone();
            let body: Value = response.json().await.unwrap();
            let uuid = uuid::Uuid::parse_str(&id).unwrap();
            assert_eq!(uuid.hyphenated().to_string(), id, "lower-case, hyphenated");
            if status == 200 {
                assert_eq!(body["decision_id"], id.as_str(), "upstream's decision id");
                assert_eq!(body["request_id"], id.as_str(), "upstream's x-request-id");
                // The agent's address and Envoy's headers stay inside the gateway.
                assert_eq!(body["forwarding_headers"], json!([]), "{body}");
            } else {
                assert_eq!(body["request_id"], id.as_str(), "{body}");
            }
            ids.push(id);
        }
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    stack
        .audit_entries_with(tenant, &ids, Duration::from_secs(20))
        .await
        .unwrap();
    ids
}

/// Envoy loads each configuration first in a fresh VM on its main thread (the canary),
/// then in its long-lived VMs. The canary validates only the agents and policies no VM
/// validated before and publishes them; the workers then validate none and prepare
/// entries on first use: a new agent's requests are still decided by its own entry and a
/// changed policy's by the new one. Pushes after the first are deltas: the canary checks
/// them against the entries the previous canary published without preparing those they
/// leave alone, the long-lived VMs compile them from what they list on their own entries;
/// a full push is read through the canary's index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_trust_the_agents_the_canary_validated() {
    let (stack, tenant) = stack_with_workers(2).await;
    let policy = stack
        .create_policy(&tenant, "p", &["a.example"], &[])
        .await
        .unwrap();
    let spare = stack
        .create_policy(&tenant, "spare", &["s.example"], &[])
        .await
        .unwrap();
    let one = agent(&stack, &tenant, "one", &policy).await;
    let (status, _, _) = send(&stack, &one, Method::GET, "a.example", "/").await;
    assert_eq!(status, 200);
    let two = agent(&stack, &tenant, "two", &policy).await;
    integration_tests::wait_for("agent two decided", Duration::from_secs(15), || async {
        let (status, _, _) = send(&stack, &two, Method::GET, "a.example", "/").await;
        (status == 200).then_some(())
    })
    .await
    .unwrap();
    let (status, body, _) = send(&stack, &two, Method::GET, "b.example", "/").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "no_matching_policy", "{body}");

    // The canary (root context 1 of a fresh VM) validated agent two's new entry only;
    // the main thread's and both workers' long-lived VMs validated nothing.
    let (canary, long_lived) = validated_by_the_last_loads(&stack);
    assert_eq!(canary, [(1, 0, 0, ConfigRead::DeltaChecked)]);
    assert_eq!(long_lived, [(0, 0, 0, ConfigRead::DeltaListed); 3]);

    // Policy p now also allows c.example: the canary validates that policy only.
    stack
        .admin(
            Method::PUT,
            &format!("/api/v1/policies/{policy}"),
            Some(json!({"name": "p", "allowed_domains": ["a.example", "c.example"]})),
        )
        .await
        .unwrap();
    integration_tests::wait_for("the changed policy", Duration::from_secs(15), || async {
        let (status, _, _) = send(&stack, &one, Method::GET, "c.example", "/").await;
        (status == 200).then_some(())
    })
    .await
    .unwrap();
    let (status, _, _) = send(&stack, &two, Method::GET, "c.example", "/").await;
    assert_eq!(status, 200);
    let (canary, long_lived) = validated_by_the_last_loads(&stack);
    assert_eq!(canary, [(0, 1, 0, ConfigRead::DeltaChecked)]);
    assert_eq!(long_lived, [(0, 0, 0, ConfigRead::DeltaListed); 3]);

    // A deletion goes in full: the canary parses it (every entry validated before), the
    // long-lived VMs read it through its index.
    stack
        .admin(Method::DELETE, &format!("/api/v1/policies/{spare}"), None)
        .await
        .unwrap();
    stack.wait_envoy_synced().await.unwrap();
    let (status, _, _) = send(&stack, &two, Method::GET, "c.example", "/").await;
    assert_eq!(status, 200);
    let (canary, long_lived) = validated_by_the_last_loads(&stack);
    assert_eq!(canary, [(0, 0, 0, ConfigRead::Parsed)]);
    assert_eq!(long_lived, [(0, 0, 0, ConfigRead::Indexed); 3]);
}

/// Agents, policies and module sets validated by one load, and how it read the
/// configuration: parsed, through another VM's index, as a delta on its own entries, or
/// as a delta on the full configuration the previous canary published.
type Counts = (u64, u64, u64, ConfigRead);

/// The agents and policies each VM validated itself when loading the latest
/// configuration, from the filter's `root R: configuration V loaded (Enforce, B bytes, A
/// agents, P policies and S module sets validated here, M ms)` lines: the canary's (root
/// context 1 of a fresh VM), and the long-lived VMs'.
fn validated_by_the_last_loads(stack: &Stack) -> (Vec<Counts>, Vec<Counts>) {
    let log = std::fs::read_to_string(&stack.envoy.log).unwrap();
    let loads: Vec<(u32, u64, Counts)> = log
        .lines()
        .filter_map(|l| {
            let (root, tail) = l.split_once("root ")?.1.split_once(": configuration ")?;
            let (version, tail) = tail.split_once(" loaded (Enforce, ")?;
            let tail = tail.split_once(" bytes, ")?.1;
            let (read, tail) = ConfigRead::strip(tail);
            let (agents, tail) = tail.split_once(" agents, ")?;
            let (policies, tail) = tail.split_once(" policies and ")?;
            let modules = tail.split_once(" module sets validated here")?.0;
            let validated = (
                agents.parse().ok()?,
                policies.parse().ok()?,
                modules.parse().ok()?,
                read,
            );
            Some((root.parse().ok()?, version.parse().ok()?, validated))
        })
        .collect();
    let last = loads.iter().map(|(_, v, _)| *v).max().unwrap();
    let of_last = loads.iter().filter(|(_, v, _)| *v == last);
    let (canary, long_lived): (Vec<_>, Vec<_>) = of_last.partition(|(root, _, _)| *root == 1);
    let validated = |loads: Vec<&(u32, u64, Counts)>| loads.iter().map(|l| l.2).collect();
    (validated(canary), validated(long_lived))
}

/// Peers the filter read, and connections the gateway listener accepted.
async fn peer_reads_and_connections(stack: &Stack) -> [u64; 2] {
    [
        stat_after_tick(stack, "wasmcustom.chronoguard.peer_reads").await,
        stat_after_tick(stack, "http.egress.downstream_cx_total").await,
    ]
}

/// Two policies of `tenant`: one allows a.example, the other blocks it.
async fn allowed_and_blocked(stack: &Stack, tenant: &str) -> (String, String) {
    let allowed = stack
        .create_policy(tenant, "allowed", &["a.example"], &[])
        .await
        .unwrap();
    let blocked = stack
        .create_policy(tenant, "blocked", &[], &["a.example"])
        .await
        .unwrap();
    (allowed, blocked)
}

/// A counter of Envoy's (0 until defined), read after the filter's next tick: the filter
/// hands its stats to Envoy on its tick (every 100 ms here).
async fn stat_after_tick(stack: &Stack, name: &str) -> u64 {
    tokio::time::sleep(Duration::from_millis(600)).await;
    let value = stack.envoy.stat(name).await.unwrap();
    value.unwrap_or_default().parse().unwrap_or(0)
}

/// A stack whose Envoy runs `concurrency` workers, and a tenant on it.
async fn stack_with_workers(concurrency: u32) -> (Stack, String) {
    let stack = Stack::start(StackOptions {
        concurrency,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    (stack, tenant)
}

/// An active agent on `policy`, and a client presenting its certificate.
async fn agent(stack: &Stack, tenant: &str, name: &str, policy: &str) -> reqwest::Client {
    let (_, cert) = stack
        .create_active_agent(tenant, name, &[policy])
        .await
        .unwrap();
    stack.agent_client(Some(&cert)).unwrap()
}

fn chrono_minute() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    secs.rem_euclid(86_400) / 60
}
