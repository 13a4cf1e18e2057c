//! `cargo xtask demo`: the whole stack with demo data, and curl commands to try it.

use integration_tests::{Stack, StackOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!(
        "==> starting PostgreSQL, Redis, the control plane, Envoy with the filter and an upstream"
    );
    let stack = Stack::start(StackOptions {
        audit_flush_interval_ms: 500,
        ..StackOptions::default()
    })
    .await?;
    let tenant = stack.create_tenant("demo").await?;
    let policy = stack
        .create_policy(
            &tenant,
            "demo-web",
            &["allowed.example", "*.docs.example"],
            &["blocked.example"],
        )
        .await?;
    let (agent_id, cert) = stack
        .create_active_agent(&tenant, "demo-agent", &[&policy])
        .await?;
    let pki = &stack.pki.dir;
    let curl = |host: &str| {
        format!(
            "curl -sS -i --cacert {ca} --cert {cert} --key {key} -H 'Host: {host}' {url}",
            ca = pki.join("ca.pem").display(),
            cert = pki.join("demo-agent.pem").display(),
            key = pki.join("demo-agent-key.pem").display(),
            url = stack.envoy.url("/hello"),
        )
    };
    let cp = |path: &str| {
        format!(
            "curl -sS -H 'Authorization: Bearer {token}' '{url}'",
            token = stack.control_plane.admin_token,
            url = stack.control_plane.url(path)
        )
    };
    println!(
        "
ChronoGuard demo is running.
  tenant  {tenant}
  agent   {agent_id} (certificate SHA-256 {fp})
  policy  {policy}: allow allowed.example and *.docs.example, block blocked.example

Allowed (200 from the upstream, with an x-chronoguard-decision-id header):
  {allowed}

Denied (403 with a JSON reason):
  {denied}

Without a client certificate (the TLS handshake fails):
  curl -sS --cacert {ca} -H 'Host: allowed.example' {url}

The audit chain and its verification, the gateways and their fleet (`egress`, serving
the demo tenant) (admin token for this run only):
  {verify}
  {envoys}
  {fleets}

Logs: {dir}
Press Ctrl-C to stop everything.",
        fp = cert.fingerprint,
        allowed = curl("allowed.example"),
        denied = curl("blocked.example"),
        ca = pki.join("ca.pem").display(),
        url = stack.envoy.url("/hello"),
        verify = cp(&format!("/api/v1/audit/verify?tenant_id={tenant}")),
        envoys = cp("/api/v1/envoys"),
        fleets = cp("/api/v1/gateways"),
        dir = stack.dir.display(),
    );
    tokio::signal::ctrl_c().await?;
    println!("\n==> stopping");
    drop(stack);
    Ok(())
}
