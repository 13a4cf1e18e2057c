//! The admin API against real PostgreSQL and Redis (the control plane binary, no Envoy
//! except where decisions are compared with it): JWT roles and tenant isolation,
//! optimistic locking, certificate checks, uniqueness, the agent limit, lifecycle,
//! listings, policy deletion, dry-run evaluation, OpenAPI, and bad bodies.

use integration_tests::api_stack::{Answer, ApiStack, Call, certificate};
use integration_tests::{Stack, StackOptions};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeSet;

fn id(answer: &Answer) -> String {
    answer.body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {}", answer.body))
        .to_owned()
}

fn assert_problem(answer: &Answer, status: u16) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.body);
    assert_eq!(
        answer.content_type, "application/problem+json",
        "{}",
        answer.body
    );
    for key in ["type", "title", "detail"] {
        assert!(answer.body[key].is_string(), "{key} in {}", answer.body);
    }
    assert_eq!(answer.body["status"], status, "{}", answer.body);
}

async fn create_agent(stack: &ApiStack, token: &str, body: Value) -> Answer {
    stack
        .expect(token, Method::POST, "/api/v1/agents", Some(body), 201)
        .await
        .unwrap()
}

async fn patch_agent(
    stack: &ApiStack,
    token: &str,
    agent: &str,
    version: &str,
    body: Value,
) -> Answer {
    stack
        .call(Call {
            token,
            method: Method::PATCH,
            path: &format!("/api/v1/agents/{agent}"),
            body: Some(body),
            if_match: Some(version),
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation_matrix_and_roles() {
    let stack = ApiStack::start().await.unwrap();
    let a = stack.create_tenant("tenant-a").await.unwrap();
    let b = stack.create_tenant("tenant-b").await.unwrap();
    let admin_a = stack.token("admin", Some(&a));
    let admin_b = stack.token("admin", Some(&b));
    let auditor_a = stack.token("auditor", Some(&a));

    // A tenant admin creates in its own tenant without naming it.
    let agent = create_agent(
        &stack,
        &admin_a,
        json!({"name": "crawler", "certificate_pem": certificate("crawler", -60, 86_400).unwrap()}),
    )
    .await;
    assert_eq!(agent.body["tenant_id"], a.as_str());
    let agent_id = id(&agent);
    let policy = stack
        .expect(
            &admin_a,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "web", "allowed_domains": ["a.example"]})),
            201,
        )
        .await
        .unwrap();
    let policy_id = id(&policy);
    // Naming another tenant is the same as naming none that exists.
    let foreign = stack
        .send(
            &admin_a,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"tenant_id": b, "name": "sneaky"})),
        )
        .await
        .unwrap();
    assert_problem(&foreign, 422);

    // Tenant A reads them first, so they are also in the cache.
    for path in [
        format!("/api/v1/agents/{agent_id}"),
        format!("/api/v1/policies/{policy_id}"),
    ] {
        stack
            .expect(&admin_a, Method::GET, &path, None, 200)
            .await
            .unwrap();
    }

    // Tenant B's admin can neither read nor change anything of tenant A: 404 everywhere.
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/api/v1/agents/{agent_id}"), None),
        (
            Method::PATCH,
            format!("/api/v1/agents/{agent_id}"),
            Some(json!({"status": "active"})),
        ),
        (
            Method::PUT,
            format!("/api/v1/agents/{agent_id}/certificate"),
            Some(json!({"certificate_pem": certificate("x", -60, 3_600).unwrap()})),
        ),
        (
            Method::POST,
            format!("/api/v1/agents/{agent_id}/evaluate"),
            Some(json!({"domain": "a.example"})),
        ),
        (Method::GET, format!("/api/v1/policies/{policy_id}"), None),
        (
            Method::PUT,
            format!("/api/v1/policies/{policy_id}"),
            Some(json!({"name": "taken-over"})),
        ),
        (
            Method::DELETE,
            format!("/api/v1/policies/{policy_id}"),
            None,
        ),
        (
            Method::POST,
            format!("/api/v1/policies/{policy_id}/evaluate"),
            Some(json!({"domain": "a.example"})),
        ),
        (Method::GET, format!("/api/v1/agents?tenant_id={a}"), None),
        (Method::GET, format!("/api/v1/policies?tenant_id={a}"), None),
        (Method::GET, format!("/api/v1/tenants/{a}"), None),
    ];
    for (method, path, body) in &cases {
        let answer = stack
            .call(Call {
                token: &admin_b,
                method: method.clone(),
                path,
                body: body.clone(),
                if_match: Some("\"1\""),
            })
            .await
            .unwrap();
        assert_problem(&answer, 404);
        assert_eq!(
            answer.body["detail"], "resource not found",
            "{method} {path}"
        );
    }
    // B's own listings do not show A's resources.
    for path in ["/api/v1/agents", "/api/v1/policies"] {
        let list = stack
            .expect(&admin_b, Method::GET, path, None, 200)
            .await
            .unwrap();
        assert_eq!(list.body["items"], json!([]), "{path}");
    }
    // Nothing changed.
    let still = stack
        .expect(
            &admin_a,
            Method::GET,
            &format!("/api/v1/agents/{agent_id}"),
            None,
            200,
        )
        .await
        .unwrap();
    assert_eq!(
        (
            still.body["version"].as_i64(),
            still.body["status"].as_str()
        ),
        (Some(1), Some("pending"))
    );
    stack
        .expect(
            &admin_a,
            Method::GET,
            &format!("/api/v1/policies/{policy_id}"),
            None,
            200,
        )
        .await
        .unwrap();
    stack
        .expect(
            &admin_a,
            Method::GET,
            &format!("/api/v1/tenants/{a}"),
            None,
            200,
        )
        .await
        .unwrap();

    // Roles: auditors may not touch agents or policies; tenant roles may not manage tenants.
    for (token, method, path, status) in [
        (&auditor_a, Method::GET, "/api/v1/agents".to_owned(), 403),
        (
            &auditor_a,
            Method::GET,
            format!("/api/v1/policies/{policy_id}"),
            403,
        ),
        (&auditor_a, Method::POST, "/api/v1/policies".to_owned(), 403),
        (&admin_a, Method::POST, "/api/v1/tenants".to_owned(), 403),
        (&admin_a, Method::GET, "/api/v1/tenants".to_owned(), 403),
        (&admin_a, Method::GET, "/api/v1/envoys".to_owned(), 403),
    ] {
        let answer = stack
            .send(token, method.clone(), &path, Some(json!({"name": "x"})))
            .await
            .unwrap();
        assert_problem(&answer, status);
    }
    // A platform-admin JWT sees every tenant.
    let platform = stack.token("platform-admin", None);
    let all = stack
        .expect(&platform, Method::GET, "/api/v1/agents", None, 200)
        .await
        .unwrap();
    assert_eq!(all.body["items"].as_array().unwrap().len(), 1);
    // Creating as a platform admin needs a tenant id.
    let no_tenant = stack
        .send(
            &platform,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "orphan"})),
        )
        .await
        .unwrap();
    assert_problem(&no_tenant, 422);
    assert_eq!(no_tenant.body["errors"][0]["field"], "tenant_id");

    // Bad credentials: 401 with WWW-Authenticate semantics, never 403 or 404.
    let secret = stack.control_plane.jwt_secret();
    let bad_tokens = [
        integration_tests::jwt::mint(&secret, "admin", Some(&a), -120),
        integration_tests::jwt::mint(
            "some-other-secret-some-other-secret",
            "admin",
            Some(&a),
            600,
        ),
        integration_tests::jwt::mint(&secret, "admin", None, 600),
        integration_tests::jwt::mint(&secret, "superuser", Some(&a), 600),
        integration_tests::jwt::sign(&secret, &json!({"role": "admin", "tenant_id": a})),
        stack.control_plane.ingest_token.clone(),
        String::new(),
    ];
    for token in &bad_tokens {
        let answer = stack
            .send(token, Method::GET, "/api/v1/agents", None)
            .await
            .unwrap();
        assert_problem(&answer, 401);
    }
    // Auditors read their own tenant's audit log, and nothing of another tenant's.
    let verify_a = format!("/api/v1/audit/verify?tenant_id={a}");
    for token in [&auditor_a, &admin_a, &platform] {
        stack
            .expect(token, Method::GET, &verify_a, None, 200)
            .await
            .unwrap();
    }
    let encoded_b: String = b.bytes().map(|c| format!("%{c:02X}")).collect();
    for path in [
        format!("/api/v1/audit/verify?tenant_id={b}"),
        format!("/api/v1/audit/entries?tenant_id={b}"),
        format!("/api/v1/audit/export?tenant_id={b}"),
        format!("/api/v1/audit/checkpoints?tenant_id={b}"),
        format!("/api/v1/audit/verify?tenant_id={a}&tenant_id={b}"),
        format!("/api/v1/audit/verify?tenant%5Fid={encoded_b}"),
    ] {
        let answer = stack
            .send(&auditor_a, Method::GET, &path, None)
            .await
            .unwrap();
        assert_problem(&answer, 404);
    }
    let checkpoint = stack
        .send(
            &auditor_a,
            Method::POST,
            "/api/v1/audit/checkpoints",
            Some(json!({"tenant_id": a})),
        )
        .await
        .unwrap();
    assert_problem(&checkpoint, 403);

    // The admin credentials are not filter credentials.
    for token in [&stack.bootstrap(), &admin_a, &platform] {
        let answer = stack
            .send(
                token,
                Method::POST,
                "/api/v1/audit/batches",
                Some(json!({"batch_id": uuid::Uuid::new_v4(), "entries": []})),
            )
            .await
            .unwrap();
        assert_problem(&answer, 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_locking_lets_one_of_concurrent_updates_win() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    let policy = stack
        .expect(
            &admin,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "web", "allowed_domains": ["a.example"]})),
            201,
        )
        .await
        .unwrap();
    assert_eq!(policy.etag.as_deref(), Some("\"1\""));
    let path = format!("/api/v1/policies/{}", id(&policy));
    let put = |if_match: Option<&'static str>, name: &str| {
        let body = Some(json!({"name": name, "allowed_domains": ["b.example"]}));
        let path = path.clone();
        let admin = admin.clone();
        let stack = &stack;
        async move {
            stack
                .call(Call {
                    token: &admin,
                    method: Method::PUT,
                    path: &path,
                    body,
                    if_match,
                })
                .await
                .unwrap()
        }
    };
    assert_problem(&put(None, "web").await, 428);
    assert_problem(&put(Some("\"7\""), "web").await, 412);
    assert_problem(&put(Some("W/\"1\""), "web").await, 412);
    let updated = put(Some("\"1\""), "web-2").await;
    assert_eq!(updated.status, 200, "{}", updated.body);
    assert_eq!(updated.etag.as_deref(), Some("\"2\""));
    let stale = put(Some("\"1\""), "web-3").await;
    assert_problem(&stale, 412);
    assert!(
        stale.body["detail"]
            .as_str()
            .unwrap()
            .contains("current version is 2"),
        "{}",
        stale.body
    );

    // Eight concurrent updates based on version 2: exactly one wins.
    let contenders = 8;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..contenders {
        let http = stack.http.clone();
        let url = stack.control_plane.url(&path);
        let admin = admin.clone();
        tasks.spawn(async move {
            let response = http
                .put(url)
                .bearer_auth(admin)
                .header(reqwest::header::IF_MATCH, "\"2\"")
                .json(&json!({"name": format!("racer-{i}"), "allowed_domains": ["c.example"]}))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), i)
        });
    }
    let mut winners = Vec::new();
    let mut stale = 0;
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            (200, i) => winners.push(i),
            (412, _) => stale += 1,
            (status, _) => panic!("unexpected {status}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(stale, contenders - 1);
    let row: (i64, String) =
        sqlx::query_as("SELECT version, name FROM policies WHERE id = $1::uuid")
            .bind(id(&policy))
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!(row, (3, format!("racer-{}", winners[0])));

    // The same for agents: concurrent transitions from one version, one wins.
    let agent = create_agent(
        &stack,
        &admin,
        json!({"name": "bot", "certificate_pem": certificate("bot", -60, 86_400).unwrap()}),
    )
    .await;
    assert_eq!(agent.etag.as_deref(), Some("\"1\""));
    let agent_id = id(&agent);
    let (first, second) = tokio::join!(
        patch_agent(
            &stack,
            &admin,
            &agent_id,
            "\"1\"",
            json!({"status": "active"})
        ),
        patch_agent(
            &stack,
            &admin,
            &agent_id,
            "\"1\"",
            json!({"status": "deactivated"})
        ),
    );
    let mut statuses = [first.status.as_u16(), second.status.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 412], "{} / {}", first.body, second.body);
    let missing = stack
        .send(
            &admin,
            Method::PATCH,
            &format!("/api/v1/agents/{agent_id}"),
            Some(json!({})),
        )
        .await
        .unwrap();
    assert_problem(&missing, 428);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_uniqueness_and_rotation() {
    let stack = ApiStack::start().await.unwrap();
    let a = stack.create_tenant("a").await.unwrap();
    let b = stack.create_tenant("b").await.unwrap();
    let admin_a = stack.token("admin", Some(&a));
    let admin_b = stack.token("admin", Some(&b));

    let key_pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n";
    for (pem, needle) in [
        (certificate("old", -7_200, -3_600).unwrap(), "expired"),
        (
            certificate("future", 3_600, 7_200).unwrap(),
            "not valid before",
        ),
        ("hello".to_owned(), "not a PEM-encoded X.509 certificate"),
        (key_pem.to_owned(), "not CERTIFICATE"),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
            "not a PEM-encoded X.509 certificate",
        ),
    ] {
        let answer = stack
            .send(
                &admin_a,
                Method::POST,
                "/api/v1/agents",
                Some(json!({"name": "bad", "certificate_pem": pem})),
            )
            .await
            .unwrap();
        assert_problem(&answer, 422);
        assert_eq!(answer.body["errors"][0]["field"], "certificate_pem");
        let detail = answer.body["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{detail} lacks {needle}");
    }

    let pem = certificate("crawler", -60, 86_400).unwrap();
    let first = create_agent(
        &stack,
        &admin_a,
        json!({"name": "crawler", "certificate_pem": pem}),
    )
    .await;
    // The fingerprint is unique across tenants.
    let reused = stack
        .send(
            &admin_b,
            Method::POST,
            "/api/v1/agents",
            Some(json!({"name": "copy", "certificate_pem": pem})),
        )
        .await
        .unwrap();
    assert_problem(&reused, 409);
    assert!(
        reused.body["detail"]
            .as_str()
            .unwrap()
            .contains("fingerprint")
    );
    // The name is unique per tenant, not across tenants.
    let other = certificate("crawler-2", -60, 86_400).unwrap();
    let same_name = stack
        .send(
            &admin_a,
            Method::POST,
            "/api/v1/agents",
            Some(json!({"name": "crawler", "certificate_pem": other})),
        )
        .await
        .unwrap();
    assert_problem(&same_name, 409);
    assert!(same_name.body["detail"].as_str().unwrap().contains("name"));
    let in_b = create_agent(
        &stack,
        &admin_b,
        json!({"name": "crawler", "certificate_pem": other}),
    )
    .await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(count, 2, "refused registrations wrote nothing");

    // Rotation: a new certificate, a new fingerprint, a new version.
    let agent_id = id(&first);
    let rotate = |pem: String, if_match: Option<&'static str>, token: String| {
        let path = format!("/api/v1/agents/{agent_id}/certificate");
        let stack = &stack;
        async move {
            stack
                .call(Call {
                    token: &token,
                    method: Method::PUT,
                    path: &path,
                    body: Some(json!({"certificate_pem": pem})),
                    if_match,
                })
                .await
                .unwrap()
        }
    };
    let fresh = certificate("crawler-rotated", -60, 86_400).unwrap();
    assert_problem(&rotate(fresh.clone(), None, admin_a.clone()).await, 428);
    assert_problem(
        &rotate(
            certificate("stale", -7_200, -60).unwrap(),
            Some("\"1\""),
            admin_a.clone(),
        )
        .await,
        422,
    );
    // Another agent's certificate is refused.
    assert_problem(
        &rotate(other.clone(), Some("\"1\""), admin_a.clone()).await,
        409,
    );
    let rotated = rotate(fresh, Some("\"1\""), admin_a.clone()).await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    assert_ne!(rotated.body["fingerprint"], first.body["fingerprint"]);
    assert_eq!(rotated.body["subject"], "CN=crawler-rotated");
    assert_eq!(rotated.etag.as_deref(), Some("\"2\""));
    // The old certificate is free again for another agent.
    create_agent(
        &stack,
        &admin_b,
        json!({"name": "inherits", "certificate_pem": pem}),
    )
    .await;
    assert_ne!(id(&in_b), agent_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_transitions_table() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    let states = ["pending", "active", "suspended", "deactivated"];
    // How to reach each state from pending.
    let route = |state: &str| -> &'static [&'static str] {
        match state {
            "pending" => &[],
            "active" => &["active"],
            "suspended" => &["active", "suspended"],
            _ => &["deactivated"],
        }
    };
    let allowed: BTreeSet<(&str, &str)> = [
        ("pending", "active"),
        ("pending", "deactivated"),
        ("active", "suspended"),
        ("active", "deactivated"),
        ("suspended", "active"),
        ("suspended", "deactivated"),
    ]
    .into_iter()
    .collect();
    let mut checked = 0;
    for from in states {
        for to in states {
            let name = format!("{from}-to-{to}");
            let agent = create_agent(
                &stack,
                &admin,
                json!({"name": name, "certificate_pem": certificate(&name, -60, 86_400).unwrap()}),
            )
            .await;
            let agent_id = id(&agent);
            let mut version = 1;
            for step in route(from) {
                let answer = patch_agent(
                    &stack,
                    &admin,
                    &agent_id,
                    &format!("\"{version}\""),
                    json!({"status": step}),
                )
                .await;
                assert_eq!(answer.status, 200, "{name}: {}", answer.body);
                version += 1;
            }
            let answer = patch_agent(
                &stack,
                &admin,
                &agent_id,
                &format!("\"{version}\""),
                json!({"status": to}),
            )
            .await;
            if from == to || allowed.contains(&(from, to)) {
                assert_eq!(answer.status, 200, "{from} → {to}: {}", answer.body);
                assert_eq!(answer.body["status"], to);
            } else {
                assert_problem(&answer, 422);
                let detail = answer.body["detail"].as_str().unwrap();
                assert!(
                    detail.contains(&format!("invalid transition from {from} to {to}")),
                    "{detail}"
                );
                let stored: String =
                    sqlx::query_scalar("SELECT status FROM agents WHERE id = $1::uuid")
                        .bind(&agent_id)
                        .fetch_one(&stack.db)
                        .await
                        .unwrap();
                assert_eq!(stored, from, "a refused transition changes nothing");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_limit_of_a_thousand_is_race_safe() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("big").await.unwrap();
    let other = stack.create_tenant("small").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    // 998 agents directly in the database (registering them one by one through the API
    // would spend the test's time on bundle rebuilds).
    sqlx::query(
        "INSERT INTO agents (id, tenant_id, name, fingerprint, subject, not_before, not_after,
                             certificate_pem, status)
         SELECT gen_random_uuid(), $1::uuid, 'bulk-' || g, md5(g::text) || md5('x' || g),
                'CN=bulk', now(), now() + interval '1 day', 'unused', 'active'
         FROM generate_series(1, 998) AS g",
    )
    .bind(&tenant)
    .execute(&stack.db)
    .await
    .unwrap();
    // Four registrations race for the last two places.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..4 {
        let http = stack.http.clone();
        let url = stack.control_plane.url("/api/v1/agents");
        let admin = admin.clone();
        let pem = certificate(&format!("racer-{i}"), -60, 86_400).unwrap();
        tasks.spawn(async move {
            let response = http
                .post(url)
                .bearer_auth(admin)
                .json(&json!({"name": format!("racer-{i}"), "certificate_pem": pem}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        });
    }
    let mut created = 0;
    let mut refused = 0;
    while let Some(result) = tasks.join_next().await {
        let (status, body) = result.unwrap();
        match status {
            201 => created += 1,
            422 => {
                assert!(
                    body["detail"]
                        .as_str()
                        .unwrap()
                        .contains("limit of 1000 agents"),
                    "{body}"
                );
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((created, refused), (2, 2));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE tenant_id = $1::uuid")
        .bind(&tenant)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(count, 1000);
    // Another tenant is not affected; a deactivated agent frees a place.
    let other_admin = stack.token("admin", Some(&other));
    create_agent(
        &stack,
        &other_admin,
        json!({"name": "x", "certificate_pem": certificate("x", -60, 86_400).unwrap()}),
    )
    .await;
    sqlx::query("UPDATE agents SET status = 'deactivated' WHERE name = 'bulk-1'")
        .execute(&stack.db)
        .await
        .unwrap();
    create_agent(
        &stack,
        &admin,
        json!({"name": "replacement", "certificate_pem": certificate("r", -60, 86_400).unwrap()}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_filter_and_paginate_with_cursors() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    let policy = stack
        .expect(
            &admin,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "web"})),
            201,
        )
        .await
        .unwrap();
    let policy_id = id(&policy);
    let mut ids = Vec::new();
    for i in 0..7_u32 {
        let name = if i < 4 {
            format!("crawler-{i}")
        } else {
            format!("bot-{i}")
        };
        let agent = create_agent(
            &stack,
            &admin,
            json!({"name": name, "certificate_pem": certificate(&name, -60, 86_400).unwrap()}),
        )
        .await;
        let agent_id = id(&agent);
        if i.is_multiple_of(2) {
            let answer = patch_agent(
                &stack,
                &admin,
                &agent_id,
                "\"1\"",
                json!({"status": "active", "policy_ids": [policy_id]}),
            )
            .await;
            assert_eq!(answer.status, 200, "{}", answer.body);
        }
        ids.push(agent_id);
    }
    // Pages of three in creation order, following the cursors.
    let mut seen = Vec::new();
    let mut path = "/api/v1/agents?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let page = stack
            .expect(&admin, Method::GET, &path, None, 200)
            .await
            .unwrap();
        pages += 1;
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|a| a["id"].as_str().unwrap().to_owned()));
        match page.body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/agents?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    let count = |path: String| {
        let stack = &stack;
        let admin = admin.clone();
        async move {
            let page = stack
                .expect(&admin, Method::GET, &path, None, 200)
                .await
                .unwrap();
            page.body["items"].as_array().unwrap().len()
        }
    };
    assert_eq!(count("/api/v1/agents?status=active".into()).await, 4);
    assert_eq!(count("/api/v1/agents?status=pending".into()).await, 3);
    assert_eq!(count("/api/v1/agents?name_prefix=crawler-".into()).await, 4);
    assert_eq!(
        count(format!("/api/v1/agents?policy_id={policy_id}")).await,
        4
    );
    assert_eq!(
        count(format!(
            "/api/v1/agents?status=active&name_prefix=bot-&policy_id={policy_id}"
        ))
        .await,
        2
    );
    assert_eq!(count("/api/v1/policies?status=active".into()).await, 1);
    assert_eq!(count("/api/v1/policies?status=draft".into()).await, 0);

    for (path, status) in [
        ("/api/v1/agents?limit=0", 422),
        ("/api/v1/agents?limit=501", 422),
        ("/api/v1/agents?cursor=garbage", 422),
        ("/api/v1/agents?status=sleeping", 400),
        ("/api/v1/agents?colour=blue", 400),
        ("/api/v1/agents/not-a-uuid", 400),
    ] {
        let answer = stack.send(&admin, Method::GET, path, None).await.unwrap();
        assert_problem(&answer, status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_delete_is_refused_while_assigned_unless_forced() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    let mut policies = Vec::new();
    for name in ["assigned", "free"] {
        let policy = stack
            .expect(
                &admin,
                Method::POST,
                "/api/v1/policies",
                Some(json!({"name": name})),
                201,
            )
            .await
            .unwrap();
        policies.push(id(&policy));
    }
    let agent = create_agent(
        &stack,
        &admin,
        json!({"name": "bot", "certificate_pem": certificate("bot", -60, 86_400).unwrap()}),
    )
    .await;
    let agent_id = id(&agent);
    let assigned = patch_agent(
        &stack,
        &admin,
        &agent_id,
        "\"1\"",
        json!({"policy_ids": [policies[0]]}),
    )
    .await;
    assert_eq!(assigned.status, 200, "{}", assigned.body);

    let refused = stack
        .send(
            &admin,
            Method::DELETE,
            &format!("/api/v1/policies/{}", policies[0]),
            None,
        )
        .await
        .unwrap();
    assert_problem(&refused, 409);
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap()
            .contains("1 agent(s)")
    );
    let stale = stack
        .call(Call {
            token: &admin,
            method: Method::DELETE,
            path: &format!("/api/v1/policies/{}?force=true", policies[0]),
            body: None,
            if_match: Some("\"9\""),
        })
        .await
        .unwrap();
    assert_problem(&stale, 412);
    let forced = stack
        .send(
            &admin,
            Method::DELETE,
            &format!("/api/v1/policies/{}?force=true", policies[0]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(forced.status, 204, "{}", forced.body);
    let agent = stack
        .expect(
            &admin,
            Method::GET,
            &format!("/api/v1/agents/{agent_id}"),
            None,
            200,
        )
        .await
        .unwrap();
    assert_eq!(agent.body["policy_ids"], json!([]));
    assert_eq!(
        agent.etag.as_deref(),
        Some("\"3\""),
        "losing a policy bumps the version"
    );
    let gone = stack
        .send(
            &admin,
            Method::GET,
            &format!("/api/v1/policies/{}", policies[0]),
            None,
        )
        .await
        .unwrap();
    assert_problem(&gone, 404);
    let free = stack
        .send(
            &admin,
            Method::DELETE,
            &format!("/api/v1/policies/{}", policies[1]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(free.status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_evaluation_of_policies_and_agents() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    let policy = stack
        .expect(
            &admin,
            Method::POST,
            "/api/v1/policies",
            Some(json!({
                "name": "web", "status": "draft",
                "allowed_domains": ["allowed.example", "*.docs.example"],
                "blocked_domains": ["blocked.example"]
            })),
            201,
        )
        .await
        .unwrap();
    let policy_id = id(&policy);
    let evaluate = |path: String, domain: &'static str| {
        let stack = &stack;
        let admin = admin.clone();
        async move {
            stack
                .expect(
                    &admin,
                    Method::POST,
                    &path,
                    Some(json!({"domain": domain, "method": "GET", "path": "/x?y=1"})),
                    200,
                )
                .await
                .unwrap()
                .body
        }
    };
    let policy_path = format!("/api/v1/policies/{policy_id}/evaluate");
    for (domain, allow, reason) in [
        ("allowed.example", true, "domain_allowed"),
        ("Allowed.Example:443", true, "domain_allowed"),
        ("api.docs.example", true, "domain_allowed"),
        ("docs.example", false, "no_matching_policy"),
        ("blocked.example", false, "domain_blocked"),
        ("other.example", false, "no_matching_policy"),
    ] {
        let decision = evaluate(policy_path.clone(), domain).await;
        assert_eq!(
            (decision["allow"].as_bool(), decision["reason"].as_str()),
            (Some(allow), Some(reason)),
            "{domain}: {decision}"
        );
        assert_eq!(decision["status"], if allow { 200 } else { 403 });
        if reason != "no_matching_policy" {
            assert_eq!(decision["policy_id"], policy_id.as_str());
        }
    }

    // An agent's evaluation uses the enforced bundle: the draft policy does not count yet.
    let agent = create_agent(
        &stack,
        &admin,
        json!({"name": "bot", "certificate_pem": certificate("bot", -60, 86_400).unwrap()}),
    )
    .await;
    let agent_id = id(&agent);
    let agent_path = format!("/api/v1/agents/{agent_id}/evaluate");
    assert_eq!(
        evaluate(agent_path.clone(), "allowed.example").await["reason"],
        "agent_pending"
    );
    let active = patch_agent(
        &stack,
        &admin,
        &agent_id,
        "\"1\"",
        json!({"status": "active", "policy_ids": [policy_id]}),
    )
    .await;
    assert_eq!(active.status, 200);
    assert_eq!(
        evaluate(agent_path.clone(), "allowed.example").await["reason"],
        "no_matching_policy"
    );
    let activated = stack
        .call(Call {
            token: &admin,
            method: Method::PUT,
            path: &format!("/api/v1/policies/{policy_id}"),
            body: Some(json!({
                "name": "web", "status": "active",
                "allowed_domains": ["allowed.example", "*.docs.example"],
                "blocked_domains": ["blocked.example"]
            })),
            if_match: Some("\"1\""),
        })
        .await
        .unwrap();
    assert_eq!(activated.status, 200, "{}", activated.body);
    let decision = evaluate(agent_path.clone(), "allowed.example").await;
    assert_eq!(decision["allow"], true, "{decision}");
    assert_eq!(decision["agent_id"], agent_id.as_str());
    assert_eq!(decision["tenant_id"], tenant.as_str());
    assert_eq!(
        evaluate(agent_path.clone(), "blocked.example").await["reason"],
        "domain_blocked"
    );

    for body in [
        json!({}),
        json!({"domain": ""}),
        json!({"domain": "a.example", "extra": 1}),
    ] {
        let answer = stack
            .send(&admin, Method::POST, &agent_path, Some(body.clone()))
            .await
            .unwrap();
        assert!(
            matches!(answer.status.as_u16(), 400 | 422),
            "{body}: {}",
            answer.status
        );
        assert_eq!(answer.content_type, "application/problem+json");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_semantics_and_agent_metadata_are_validated() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    let policy = stack
        .expect(
            &admin,
            Method::POST,
            "/api/v1/policies",
            Some(json!({
                "name": "no-deletes", "allowed_domains": ["a.example"],
                "rules": [{"action": "deny", "conditions": [
                    {"field": "method", "operator": "in", "value": ["DELETE"]}]}],
                "time_restrictions": null
            })),
            201,
        )
        .await
        .unwrap();
    assert_eq!(policy.body["rules"][0]["id"], "rule-1", "{}", policy.body);
    let path = format!("/api/v1/policies/{}/evaluate", id(&policy));
    for (method, allow) in [("GET", true), ("DELETE", false)] {
        let decision = stack
            .expect(
                &admin,
                Method::POST,
                &path,
                Some(json!({"domain": "a.example", "method": method})),
                200,
            )
            .await
            .unwrap();
        assert_eq!(decision.body["allow"], allow, "{method}: {}", decision.body);
    }
    for (body, field) in [
        (
            json!({"name": "x", "custom_rego": "package p\ndeny contains x if {\n"}),
            "custom_rego",
        ),
        (
            json!({"name": "x", "time_restrictions": {"timezone": "Mars/Olympus", "windows": []}}),
            "time_restrictions",
        ),
        (
            json!({"name": "x", "rules": [{"action": "allow", "conditions": [
                {"field": "colour", "operator": "equals", "value": 1}]}]}),
            "rules",
        ),
    ] {
        let answer = stack
            .send(&admin, Method::POST, "/api/v1/policies", Some(body.clone()))
            .await
            .unwrap();
        assert_problem(&answer, 422);
        assert_eq!(
            answer.body["errors"][0]["field"], field,
            "{body}: {}",
            answer.body
        );
    }
    let agent = create_agent(
        &stack,
        &admin,
        json!({"name": "bot", "certificate_pem": certificate("bot", -60, 86_400).unwrap(),
               "metadata": {"team": "red", "tier": 2}}),
    )
    .await;
    assert_eq!(agent.body["metadata"], json!({"team": "red", "tier": 2}));
    for metadata in [
        json!([1]),
        json!({"nested": {"no": 1}}),
        json!({"": "empty key"}),
    ] {
        let answer = patch_agent(
            &stack,
            &admin,
            &id(&agent),
            "\"1\"",
            json!({"metadata": metadata}),
        )
        .await;
        assert_problem(&answer, 422);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM policies")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(count, 1, "refused policies wrote nothing");
}

/// The dry run agrees with Envoy running the built filter on the same cases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_agrees_with_envoy() {
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
    let other = stack
        .create_policy(&tenant, "strict", &[], &["*.docs.example"])
        .await
        .unwrap();
    let (agent_id, cert) = stack
        .create_active_agent(&tenant, "crawler", &[&policy, &other])
        .await
        .unwrap();
    let client = stack.agent_client(Some(&cert)).unwrap();
    // Wait until Envoy enforces the bundle with this agent.
    integration_tests::wait_for(
        "the agent's bundle in envoy",
        std::time::Duration::from_secs(10),
        || {
            let request = stack.request(&client, "allowed.example", "/");
            async move { request.await.ok().filter(|r| r.status == 200).map(|_| ()) }
        },
    )
    .await
    .unwrap();
    let token = stack.token("admin", Some(&tenant));
    for domain in [
        "allowed.example",
        "api.docs.example",
        "blocked.example",
        "other.example",
        "ALLOWED.example:8443",
    ] {
        let envoy = stack.request(&client, domain, "/").await.unwrap();
        let response = stack
            .http
            .post(
                stack
                    .control_plane
                    .url(&format!("/api/v1/agents/{agent_id}/evaluate")),
            )
            .bearer_auth(&token)
            .json(&json!({"domain": domain}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let dry: Value = response.json().await.unwrap();
        assert_eq!(
            u64::from(envoy.status),
            dry["status"].as_u64().unwrap(),
            "{domain}: envoy {envoy:?}, dry run {dry}"
        );
        if envoy.status == 403 {
            assert_eq!(envoy.body["reason"], dry["reason"], "{domain}");
            assert_eq!(envoy.body["policy_id"], dry["policy_id"], "{domain}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_router() {
    let stack = ApiStack::start().await.unwrap();
    let doc = stack
        .send("", Method::GET, "/api/v1/openapi.json", None)
        .await
        .unwrap();
    assert_eq!(doc.status, 200);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc.body["paths"].as_object().unwrap();
    assert!(paths.len() >= 15, "{}", paths.len());
    let token = stack.bootstrap();
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
        for method in ["get", "post", "put", "patch", "delete"] {
            if item[method].is_null() {
                continue;
            }
            operations += 1;
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let answer = stack
                .call(Call {
                    token: &token,
                    method: method.clone(),
                    path: &concrete,
                    body: Some(json!({})),
                    if_match: Some("\"1\""),
                })
                .await
                .unwrap();
            let status = answer.status.as_u16();
            assert!(
                status != 405 && status < 500,
                "documented {method} {path} → {status}: {}",
                answer.body
            );
        }
    }
    assert!(operations >= 20, "{operations}");

    // Every one of those requests is counted by route template, method and status.
    let metrics = stack.send("", Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.content_type.starts_with("text/plain"),
        "{}",
        metrics.content_type
    );
    let text = metrics.body.as_str().unwrap();
    for line in [
        r#"chronoguard_http_requests_total{route="/api/v1/policies/{id}",method="DELETE",status="404"} 1"#,
        r#"chronoguard_http_request_duration_seconds_count{route="/api/v1/agents/{id}",method="PATCH",status="404"} 1"#,
        r#"chronoguard_http_request_duration_seconds_bucket{route="/api/v1/agents/{id}",method="PATCH",status="404",le="+Inf"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    let bundle = text
        .lines()
        .find_map(|l| l.strip_prefix("chronoguard_bundle_version "))
        .unwrap();
    assert!(bundle.parse::<i64>().unwrap() >= 1, "{bundle}");
    assert!(
        !text.contains(&stack.bootstrap()),
        "no credentials in metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_per_token_and_redis_down() {
    let redis = integration_tests::redis::Redis::start().await.unwrap();
    let stack = ApiStack::start_with_redis(redis.url()).await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let busy = stack.token("admin", Some(&tenant));
    let path = format!("/api/v1/tenants/{tenant}");
    // The default bucket holds 600 requests and refills 20 per second.
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let total = 900;
    for _ in 0..16 {
        let http = stack.http.clone();
        let url = stack.control_plane.url(&path);
        let token = busy.clone();
        tasks.spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..total / 16 {
                let response = http.get(&url).bearer_auth(&token).send().await.unwrap();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .map(|v| v.to_str().unwrap().to_owned());
                let content_type = response
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.push((response.status().as_u16(), retry_after, content_type));
            }
            seen
        });
    }
    let mut ok = 0;
    let mut limited = 0;
    while let Some(result) = tasks.join_next().await {
        for (status, retry_after, content_type) in result.unwrap() {
            match status {
                200 => ok += 1,
                429 => {
                    limited += 1;
                    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
                    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("{ok} allowed, {limited} limited in {elapsed:.2} s");
    let ceiling = 600.0 + 20.0 * elapsed + 5.0;
    assert!(
        ok >= 600 && f64::from(ok) <= ceiling,
        "{ok} allowed in {elapsed} s"
    );
    assert!(limited > 0);
    // Another credential has its own bucket.
    let other = stack.token("platform-admin", None);
    assert_ne!(other, busy);
    stack
        .expect(&other, Method::GET, &path, None, 200)
        .await
        .unwrap();

    // Redis goes away: the API keeps working (the limiter fails open) and readiness says
    // degraded.
    drop(redis);
    let ready = stack
        .send("", Method::GET, "/health/ready", None)
        .await
        .unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.body["status"], "degraded", "{}", ready.body);
    assert_eq!(ready.body["redis"], "down");
    for _ in 0..3 {
        stack
            .expect(&busy, Method::GET, &path, None, 200)
            .await
            .unwrap();
    }
    let agent = create_agent(
        &stack,
        &busy,
        json!({"name": "bot", "certificate_pem": certificate("bot", -60, 86_400).unwrap()}),
    )
    .await;
    assert_eq!(agent.body["status"], "pending");
    let read = stack
        .expect(
            &busy,
            Method::GET,
            &format!("/api/v1/agents/{}", id(&agent)),
            None,
            200,
        )
        .await
        .unwrap();
    assert_eq!(
        read.body["id"], agent.body["id"],
        "reads fall back to the database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reads_are_cached_and_writes_invalidate_them() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    let agent = create_agent(
        &stack,
        &admin,
        json!({"name": "bot", "certificate_pem": certificate("bot", -60, 86_400).unwrap()}),
    )
    .await;
    let agent_id = id(&agent);
    let path = format!("/api/v1/agents/{agent_id}");
    let read = || {
        let (admin, path) = (admin.clone(), path.clone());
        let stack = &stack;
        async move {
            stack
                .expect(&admin, Method::GET, &path, None, 200)
                .await
                .unwrap()
                .body
        }
    };
    assert_eq!(read().await["name"], "bot");
    // A change behind the API's back is not seen while the entry lives: reads are cached.
    sqlx::query("UPDATE agents SET name = 'renamed' WHERE id = $1::uuid")
        .bind(&agent_id)
        .execute(&stack.db)
        .await
        .unwrap();
    assert_eq!(read().await["name"], "bot", "served from the cache");
    // A write through the API reads the database and replaces the entry.
    let patched = patch_agent(
        &stack,
        &admin,
        &agent_id,
        "\"1\"",
        json!({"status": "active"}),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.body["name"], "renamed");
    let after = read().await;
    assert_eq!(
        (after["name"].as_str(), after["version"].as_i64()),
        (Some("renamed"), Some(2))
    );

    // A forced policy delete changes the agents that had it: their entries are replaced.
    let policy = stack
        .expect(
            &admin,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "web"})),
            201,
        )
        .await
        .unwrap();
    let policy_id = id(&policy);
    let assigned = patch_agent(
        &stack,
        &admin,
        &agent_id,
        "\"2\"",
        json!({"policy_ids": [policy_id]}),
    )
    .await;
    assert_eq!(assigned.status, 200);
    assert_eq!(read().await["policy_ids"], json!([policy_id]));
    let policy_path = format!("/api/v1/policies/{policy_id}");
    stack
        .expect(&admin, Method::GET, &policy_path, None, 200)
        .await
        .unwrap();
    stack
        .expect(
            &admin,
            Method::DELETE,
            &format!("{policy_path}?force=true"),
            None,
            204,
        )
        .await
        .unwrap();
    let after = read().await;
    assert_eq!(after["policy_ids"], json!([]), "{after}");
    assert_eq!(after["version"], 4);
    let gone = stack
        .send(&admin, Method::GET, &policy_path, None)
        .await
        .unwrap();
    assert_problem(&gone, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_events_are_scoped_to_the_callers_tenant() {
    use integration_tests::api_stack::EventStream;
    use std::time::Duration;
    let stack = ApiStack::start().await.unwrap();
    let a = stack.create_tenant("a").await.unwrap();
    let b = stack.create_tenant("b").await.unwrap();
    let admin_a = stack.token("admin", Some(&a));
    let admin_b = stack.token("admin", Some(&b));
    let port = stack.control_plane.http_port;
    assert_eq!(
        EventStream::connect(port, "nope").await.unwrap().err(),
        Some(401),
        "authentication happens at connect"
    );
    let mut streams = Vec::new();
    for token in [&admin_a, &admin_b, &stack.bootstrap()] {
        let mut stream = EventStream::connect(port, token).await.unwrap().unwrap();
        let hello = stream.next(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(hello["kind"], "subscribed");
        streams.push(stream);
    }
    let [mut events_a, mut events_b, mut events_all] =
        <[EventStream; 3]>::try_from(streams).ok().unwrap();

    let policy = stack
        .expect(
            &admin_a,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "web", "allowed_domains": ["a.example"]})),
            201,
        )
        .await
        .unwrap();
    let policy_id = id(&policy);
    for stream in [&mut events_a, &mut events_all] {
        let created = stream.next(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(created["kind"], "policy.created", "{created}");
        assert_eq!(created["id"], policy_id.as_str());
        assert_eq!(created["tenant_id"], a.as_str());
        assert_eq!(created["version"], 1);
        assert_eq!(created["actor"], "test-admin");
        let pushed = stream.next(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(pushed["kind"], "bundle.published", "{pushed}");
        assert!(pushed["version"].as_i64().unwrap() >= 2);
    }
    // Tenant B's subscriber sees nothing of tenant A, then its own change.
    assert_eq!(
        events_b.next(Duration::from_millis(300)).await.unwrap(),
        None
    );
    let agent = create_agent(
        &stack,
        &admin_b,
        json!({"name": "bot", "certificate_pem": certificate("bot", -60, 86_400).unwrap()}),
    )
    .await;
    let created = events_b
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(created["kind"], "agent.created", "{created}");
    assert_eq!(created["id"], id(&agent).as_str());
    let seen = events_all
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen["kind"], "agent.created");
    let update = patch_agent(
        &stack,
        &admin_b,
        &id(&agent),
        "\"1\"",
        json!({"status": "active"}),
    )
    .await;
    assert_eq!(update.status, 200);
    let mut kinds = Vec::new();
    while let Some(event) = events_b.next(Duration::from_millis(500)).await.unwrap() {
        kinds.push(event["kind"].as_str().unwrap().to_owned());
    }
    assert!(kinds.contains(&"agent.updated".to_owned()), "{kinds:?}");
    assert_eq!(
        events_a.next(Duration::from_millis(200)).await.unwrap(),
        None
    );

    // A filter batch with 2 entries of tenant A and 1 of tenant B: each tenant hears of
    // its own entries; the same batch again stores nothing and announces nothing.
    let entry = |tenant: &str| {
        json!({
            "decision_id": uuid::Uuid::new_v4().to_string(), "timestamp_ns": 1_764_000_000_000_000_000u64,
            "tenant_id": tenant, "agent_id": null, "agent_fingerprint": "", "agent_subject": "",
            "domain": "a.example", "method": "GET", "path": "/", "user_agent": "", "source_ip": "10.0.0.1",
            "decision": "allow", "reason": "domain_allowed", "policy_id": null, "config_version": "1"
        })
    };
    let batch = json!({"batch_id": uuid::Uuid::new_v4().to_string(),
        "entries": [entry(&a), entry(&b), entry(&a)]});
    for (attempt, status) in [(0, 201), (1, 200)] {
        let answer = stack
            .control_plane
            .post_audit_batch(&stack.http, &batch)
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), status, "attempt {attempt}");
    }
    for (stream, tenant, count) in [(&mut events_a, &a, 2), (&mut events_b, &b, 1)] {
        let appended = stream.next(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(appended["kind"], "audit.appended", "{appended}");
        assert_eq!(appended["tenant_id"], tenant.as_str());
        assert_eq!(appended["version"], count);
        assert_eq!(appended["actor"], "filter");
        assert_eq!(stream.next(Duration::from_millis(300)).await.unwrap(), None);
    }
    // A large batch stored in parts (250 entries per tenant) whose first part was stored
    // already: only the tenant of the part stored now hears of it.
    let (first, second) = {
        let (ua, ub): (uuid::Uuid, uuid::Uuid) = (a.parse().unwrap(), b.parse().unwrap());
        if ua < ub { (&a, &b) } else { (&b, &a) }
    };
    let mut entries: Vec<Value> = (0..250).map(|_| entry(first)).collect();
    entries.extend((0..250).map(|_| entry(second)));
    let batch_id = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO audit_batches (batch_id, entry_count) VALUES ($1, 250)")
        .bind(control_plane::audit::ingest::part_id(
            batch_id,
            first.parse().unwrap(),
        ))
        .execute(&stack.db)
        .await
        .unwrap();
    let answer = stack
        .control_plane
        .post_audit_batch(
            &stack.http,
            &json!({"batch_id": batch_id.to_string(), "entries": entries}),
        )
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 201);
    let (mut heard_first, mut heard_second) = if first == &a {
        (events_a, events_b)
    } else {
        (events_b, events_a)
    };
    let appended = heard_second
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (appended["kind"].as_str(), appended["version"].as_i64()),
        (Some("audit.appended"), Some(250)),
        "{appended}"
    );
    assert_eq!(
        heard_first.next(Duration::from_millis(300)).await.unwrap(),
        None
    );
}

/// A small deterministic PRNG (xorshift64*), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 2 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => Value::Bool(self.next().is_multiple_of(2)),
            2 => json!(self.next() as i64),
            3 => json!((self.next() % 2_000_000) as f64 / 3.0 - 1e5),
            4 => Value::String(self.string()),
            5 => {
                let long = "x".repeat(300);
                let options = ["*.example.com", "bad domain", "", long.as_str()];
                Value::String(options[self.below(options.len())].to_owned())
            }
            6 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => {
                let mut map = serde_json::Map::new();
                for _ in 0..self.below(4) {
                    map.insert(self.string(), self.value(depth + 1));
                }
                Value::Object(map)
            }
        }
    }

    fn string(&mut self) -> String {
        let pool = [
            "",
            "a",
            "name",
            "tenant_id",
            "status",
            "active",
            "deactivated",
            "\u{0}",
            "é",
            "'; DROP TABLE agents; --",
            "00000000-0000-0000-0000-000000000000",
            "🦀",
            "-----BEGIN CERTIFICATE-----",
            "policy_ids",
            "\n",
        ];
        let mut s = String::new();
        for _ in 0..self.below(4) {
            s.push_str(pool[self.below(pool.len())]);
        }
        if self.below(10) == 0 {
            s.push_str(&"z".repeat(self.below(5_000)));
        }
        s
    }

    /// A body for an endpoint: a mutated valid one, a random value, or broken bytes.
    fn body(&mut self, valid: &Value) -> (String, Vec<u8>) {
        let json = "application/json".to_owned();
        match self.below(6) {
            0 => {
                let text = valid.to_string();
                let cut = self.below(text.len().max(1));
                (json, text.as_bytes()[..cut].to_vec())
            }
            1 => (
                json,
                (0..self.below(64)).map(|_| self.next() as u8).collect(),
            ),
            2 => (json, self.value(0).to_string().into_bytes()),
            3 => ("text/plain".into(), valid.to_string().into_bytes()),
            _ => {
                let mut body = valid.clone();
                if let Some(map) = body.as_object_mut() {
                    let keys: Vec<String> = map.keys().cloned().collect();
                    match self.below(3) {
                        0 if !keys.is_empty() => {
                            let key = &keys[self.below(keys.len())];
                            map.insert(key.clone(), self.value(1));
                        }
                        1 if !keys.is_empty() => {
                            let key = &keys[self.below(keys.len())];
                            map.remove(key);
                        }
                        _ => {
                            map.insert(self.string(), self.value(1));
                        }
                    }
                }
                (json, body.to_string().into_bytes())
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_never_cause_a_5xx_or_a_partial_write() {
    let stack = ApiStack::start().await.unwrap();
    let tenant = stack.create_tenant("acme").await.unwrap();
    let admin = stack.token("admin", Some(&tenant));
    let policy = stack
        .expect(
            &admin,
            Method::POST,
            "/api/v1/policies",
            Some(json!({"name": "web", "allowed_domains": ["a.example"]})),
            201,
        )
        .await
        .unwrap();
    let policy_id = id(&policy);
    let agent = create_agent(
        &stack,
        &admin,
        json!({"name": "bot", "certificate_pem": certificate("bot", -60, 86_400).unwrap()}),
    )
    .await;
    let agent_id = id(&agent);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("fuzz seed {seed}");
    let mut rng = Rng(seed);
    let cert = certificate("fuzz", -60, 86_400).unwrap();
    let mut versions =
        std::collections::HashMap::from([(agent_id.clone(), 1i64), (policy_id.clone(), 1i64)]);
    let mut created = std::collections::HashMap::<&str, i64>::new();
    let rounds = 300;
    for round in 0..rounds {
        let endpoint = rng.below(8);
        let (method, path, valid, versioned) = match endpoint {
            0 => (
                Method::POST,
                "/api/v1/tenants".to_owned(),
                json!({"name": format!("t{round}")}),
                None,
            ),
            1 => (
                Method::POST,
                "/api/v1/agents".to_owned(),
                json!({"name": format!("a{round}"), "certificate_pem": cert}),
                None,
            ),
            2 => (
                Method::POST,
                "/api/v1/policies".to_owned(),
                json!({"name": format!("p{round}"), "priority": 5, "status": "draft", "mode": "dry_run",
                       "allowed_domains": ["x.example"], "blocked_domains": ["*.y.example"]}),
                None,
            ),
            3 => (
                Method::PATCH,
                format!("/api/v1/agents/{agent_id}"),
                json!({"status": "pending", "policy_ids": [policy_id]}),
                Some(agent_id.clone()),
            ),
            4 => (
                Method::PUT,
                format!("/api/v1/policies/{policy_id}"),
                json!({"name": "web", "priority": 7, "allowed_domains": ["a.example"]}),
                Some(policy_id.clone()),
            ),
            5 => (
                Method::PUT,
                format!("/api/v1/agents/{agent_id}/certificate"),
                json!({"certificate_pem": "-----BEGIN CERTIFICATE-----\n"}),
                Some(agent_id.clone()),
            ),
            6 => (
                Method::POST,
                format!("/api/v1/agents/{agent_id}/evaluate"),
                json!({"domain": "a.example", "at": "2026-01-01T00:00:00Z"}),
                None,
            ),
            _ => (
                Method::POST,
                format!("/api/v1/policies/{policy_id}/evaluate"),
                json!({"domain": "a.example", "source_ip": "10.0.0.1"}),
                None,
            ),
        };
        let (content_type, body) = rng.body(&valid);
        let if_match = versioned.as_ref().map(|id| format!("\"{}\"", versions[id]));
        let token = if endpoint == 0 {
            stack.bootstrap()
        } else {
            admin.clone()
        };
        let answer = stack
            .raw(
                &token,
                method.clone(),
                &path,
                &content_type,
                body.clone(),
                if_match.as_deref(),
            )
            .await
            .unwrap();
        let status = answer.status.as_u16();
        let shown = String::from_utf8_lossy(&body);
        assert!(
            status < 500,
            "seed {seed} round {round}: {method} {path} with {shown:?} → {status}: {}",
            answer.body
        );
        if status >= 400 {
            assert_problem(&answer, status);
        } else if let Some(id) = &versioned {
            let version = answer.body["version"].as_i64().unwrap();
            assert_eq!(version, versions[id] + 1, "seed {seed} round {round}");
            versions.insert(id.clone(), version);
        } else if status == 201 {
            *created
                .entry(["tenants", "agents", "policies"][endpoint])
                .or_default() += 1;
        }
    }
    // Exactly the answered writes are in the database: nothing partial.
    for (table, base) in [("tenants", 1), ("agents", 1), ("policies", 1)] {
        let count: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&stack.db)
                .await
                .unwrap();
        assert_eq!(
            count,
            base + created.get(table).copied().unwrap_or(0),
            "seed {seed}: {table}"
        );
    }
    for (table, row) in [("agents", &agent_id), ("policies", &policy_id)] {
        let version: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT version FROM {table} WHERE id = $1::uuid"
        )))
        .bind(row)
        .fetch_one(&stack.db)
        .await
        .unwrap();
        assert_eq!(version, versions[row], "seed {seed}: {table} version");
    }
    let assignments: i64 = sqlx::query_scalar("SELECT count(*) FROM agent_policies")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert!(assignments <= 1, "seed {seed}");
}
