//! The example Envoy configurations users start from stay valid for Envoy 1.40.

use integration_tests::certs::Pki;
use std::process::Command;
use std::time::Duration;

#[test]
fn dynamic_forward_proxy_example_validates() {
    let dir = integration_tests::postgres::tempdir("chronoguard-envoy-configs").unwrap();
    let pki = Pki::new(dir.clone()).unwrap();
    for (name, from) in [
        ("gateway.pem", &pki.server_cert_path),
        ("gateway-key.pem", &pki.server_key_path),
        ("gateway-client.pem", &pki.server_cert_path),
        ("gateway-client-key.pem", &pki.server_key_path),
        ("tenant-ca.pem", &pki.ca_path),
        ("control-plane-ca.pem", &pki.ca_path),
    ] {
        std::fs::copy(from, dir.join(name)).unwrap();
    }
    std::fs::copy(
        integration_tests::envoy::wasm(),
        dir.join("chronoguard.wasm"),
    )
    .unwrap();
    let example = std::fs::read_to_string(
        integration_tests::workspace_root().join("envoy-config/egress-dynamic-forward-proxy.yaml"),
    )
    .unwrap()
    .replace("/etc/chronoguard/", &format!("{}/", dir.display()))
    .replace(
        "/etc/ssl/certs/ca-certificates.crt",
        &pki.ca_path.display().to_string(),
    );
    let config = dir.join("egress.yaml");
    std::fs::write(&config, example).unwrap();
    let output = Command::new(integration_tests::envoy::binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Requests carry no stream context into the module (one V8 entry per request), so the
/// latest configuration a VM accepted decides its requests: two ChronoGuard filters
/// sharing a VM would decide each other's requests (here: one filter's allow-all would
/// let the other's requests through). The VM treats the second filter's configuration as
/// a conflict and denies every request from then on: both fail closed, with a critical
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_filters_cannot_share_a_vm() {
    let dir = integration_tests::postgres::tempdir("chronoguard-shared-vm").unwrap();
    let listener = |name: &str, port: u16| {
        format!(
            r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "through" }} }}
          http_filters:
          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: chronoguard
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: shared
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: "{wasm}" }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{{"version":"1","mode":"allowAll"}}'
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#,
            wasm = integration_tests::envoy::wasm().display()
        )
    };
    let config = dir.join("shared-vm.yaml");
    let log = dir.join("envoy.log");
    let client = integration_tests::client::plain_client().unwrap();
    // The ports may be taken by another test before Envoy binds them: then again, on others.
    let mut attempt = 1;
    let (_envoy, statuses) = loop {
        let ports: Vec<u16> = (0..3).map(|_| integration_tests::free_port()).collect();
        let bootstrap = format!(
            "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }}\nstatic_resources:\n  listeners:{}{}\n",
            ports[0],
            listener("first", ports[1]),
            listener("second", ports[2])
        );
        std::fs::write(&config, bootstrap).unwrap();
        let mut cmd = Command::new(integration_tests::envoy::binary());
        cmd.arg("-c").arg(&config).args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "info",
        ]);
        let envoy = integration_tests::process::Process::spawn("envoy", cmd, &log).unwrap();
        let statuses =
            integration_tests::wait_for("both listeners deny", Duration::from_secs(30), || {
                let client = client.clone();
                let ports = ports.clone();
                async move {
                    let mut out = Vec::new();
                    for port in &ports[1..] {
                        let response = client
                            .get(format!("http://127.0.0.1:{port}/"))
                            .send()
                            .await
                            .ok()?;
                        out.push(response.status().as_u16());
                    }
                    (out == [403, 403]).then_some(out)
                }
            })
            .await;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match statuses {
            Ok(statuses) => break (envoy, statuses),
            Err(_) if attempt < 3 && text.contains("Address already in use") => attempt += 1,
            Err(err) => panic!("{err}\n{text}"),
        }
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(statuses, [403, 403], "{text}");
    assert!(text.contains("this VM already serves the filter"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}
