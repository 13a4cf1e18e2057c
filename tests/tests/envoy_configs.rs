//! The example Envoy configurations users start from stay valid for Envoy 1.40.

use integration_tests::certs::Pki;
use std::process::Command;

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
