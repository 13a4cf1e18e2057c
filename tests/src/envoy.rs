//! Envoy 1.40 with the built filter, configured from `envoy-config/envoy.yaml.tmpl`.

use crate::process::Process;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Envoy {
    pub listen_port: u16,
    /// The port of the listener without the filter (`EnvoyConfig::plain_twin`).
    pub twin_port: Option<u16>,
    pub admin_port: u16,
    pub node_id: String,
    pub log: PathBuf,
    /// The peer-header token in Envoy's environment (`CHRONOGUARD_PEER_TOKEN`), random
    /// per start: the listener's header carries it (`envoy-config/README.md`).
    pub peer_token: String,
    process: Process,
}

/// Values for the bootstrap template's placeholders.
pub struct EnvoyConfig<'a> {
    pub node_id: &'a str,
    /// The gateway fleet (`node.cluster`): which tenants' bundle the control plane sends.
    pub fleet: &'a str,
    pub cp_grpc_port: u16,
    pub cp_http_port: u16,
    pub upstream_port: u16,
    pub ca: &'a Path,
    pub server_cert: &'a Path,
    pub server_key: &'a Path,
    pub wasm: &'a Path,
    pub initial_fetch_timeout: &'a str,
    pub concurrency: u32,
    pub dir: &'a Path,
    /// Drop the ChronoGuard filter from the bootstrap (benchmark baseline only).
    pub without_filter: bool,
    /// Add a second listener, the gateway listener's twin without the ChronoGuard filter
    /// (benchmark only: requests to both, interleaved, meet the machine in the same state).
    pub plain_twin: bool,
    /// Envoy writes a request id on each request (`generate_request_id`, Envoy's default);
    /// `false` only to test the filter's own decision ids.
    pub request_ids: bool,
    /// The listener writes the peer header (`x-chronoguard-peer`) before the filters;
    /// `false` only to test a bootstrap without it.
    pub peer_header: bool,
    /// A command Envoy runs under, e.g. `valgrind --tool=callgrind ...` (benchmark only;
    /// empty: none). Envoy then gets ten minutes to become ready instead of 30 s.
    pub wrapper: &'a [String],
}

/// The Envoy binary: `CHRONOGUARD_ENVOY`, or the one `cargo xtask setup` installs.
pub fn binary() -> PathBuf {
    std::env::var_os("CHRONOGUARD_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::target_dir().join("tools/bin/envoy"))
}

/// The filter module: `CHRONOGUARD_WASM`, or the one `cargo xtask build-filter` writes.
pub fn wasm() -> PathBuf {
    std::env::var_os("CHRONOGUARD_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::target_dir().join("filter/chronoguard.wasm"))
}

/// Renders the bootstrap template.
pub fn render(
    config: &EnvoyConfig<'_>,
    listen_port: u16,
    admin_port: u16,
    twin_port: Option<u16>,
) -> anyhow::Result<String> {
    let template =
        std::fs::read_to_string(crate::workspace_root().join("envoy-config/envoy.yaml.tmpl"))?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let values = [
        ("NODE_ID", config.node_id.to_owned()),
        ("FLEET", config.fleet.to_owned()),
        ("ADMIN_PORT", admin_port.to_string()),
        ("LISTEN_PORT", listen_port.to_string()),
        ("CP_GRPC_PORT", config.cp_grpc_port.to_string()),
        ("CP_HTTP_PORT", config.cp_http_port.to_string()),
        ("UPSTREAM_PORT", config.upstream_port.to_string()),
        ("CA_CERT", path(config.ca)),
        ("SERVER_CERT", path(config.server_cert)),
        ("SERVER_KEY", path(config.server_key)),
        ("WASM", path(config.wasm)),
        (
            "INITIAL_FETCH_TIMEOUT",
            config.initial_fetch_timeout.to_owned(),
        ),
    ];
    let mut out = template;
    for (key, value) in values {
        out = out.replace(&format!("{{{{{key}}}}}"), &value);
    }
    anyhow::ensure!(
        !out.contains("{{"),
        "unfilled placeholder in the envoy template"
    );
    if !config.request_ids {
        const AT: &str = "          use_remote_address: true\n";
        anyhow::ensure!(
            out.contains(AT),
            "no use_remote_address in the envoy template"
        );
        out = out.replacen(
            AT,
            &format!("{AT}          generate_request_id: false\n"),
            1,
        );
    }
    if !config.peer_header {
        out = without_block(&out, PEER_HEADER_BLOCK, HTTP_FILTERS, "peer header")?;
    }
    if config.without_filter {
        out = without_chronoguard(&out)?;
    }
    if let Some(twin_port) = twin_port {
        let (Some(start), Some(end)) = (out.find(LISTENER), out.find(CLUSTERS)) else {
            anyhow::bail!("cannot find the gateway listener in the envoy template");
        };
        let listener = &out[start..end];
        let mut twin = if config.without_filter {
            listener.to_owned()
        } else {
            without_chronoguard(listener)?
        };
        twin = twin
            .replacen(LISTENER, "  - name: egress_mtls_plain\n", 1)
            .replacen("stat_prefix: egress\n", "stat_prefix: egress_plain\n", 1);
        let port = format!("port_value: {listen_port} ");
        anyhow::ensure!(
            twin.contains(&port),
            "no listener port in the envoy template"
        );
        twin = twin.replacen(&port, &format!("port_value: {twin_port} "), 1);
        out.insert_str(end, &twin);
    }
    Ok(out)
}

/// Where the gateway listener starts and where the listeners end in the template.
const LISTENER: &str = "  - name: egress_mtls\n";
const CLUSTERS: &str = "\n  clusters:\n";

/// The bootstrap (or listener) `yaml` without the ChronoGuard HTTP filter and without the
/// route's decision-id headers and the listener's peer header it brings (so a plain
/// baseline pays for none of them).
fn without_chronoguard(yaml: &str) -> anyhow::Result<String> {
    let mut out = without_block(
        yaml,
        "          - name: chronoguard\n",
        "          - name: envoy.filters.http.router\n",
        "filter",
    )?;
    out = without_block(
        &out,
        "              # ChronoGuard's decision id",
        HTTP_FILTERS,
        "route's decision-id headers",
    )?;
    if out.contains(PEER_HEADER_BLOCK) {
        out = without_block(&out, PEER_HEADER_BLOCK, HTTP_FILTERS, "peer header")?;
    }
    const REMOVED: &str =
        r#"request_headers_to_remove: ["x-envoy-external-address", "x-chronoguard-peer"]"#;
    anyhow::ensure!(
        out.contains(REMOVED),
        "cannot find the peer header's removal in the envoy template"
    );
    Ok(out.replace(
        REMOVED,
        r#"request_headers_to_remove: ["x-envoy-external-address"]"#,
    ))
}

/// Where the listener's peer header mutation starts in the template.
const PEER_HEADER_BLOCK: &str = "          # ChronoGuard's peer header";
const HTTP_FILTERS: &str = "          http_filters:\n";

/// `yaml` without the text from `from` up to (not including) the next `to`.
fn without_block(yaml: &str, from: &str, to: &str, what: &str) -> anyhow::Result<String> {
    let mut out = yaml.to_owned();
    let start = out.find(from);
    match (start, start.and_then(|start| out[start..].find(to))) {
        (Some(start), Some(len)) => out.replace_range(start..start + len, ""),
        _ => anyhow::bail!("cannot find the chronoguard {what} in the envoy template"),
    }
    Ok(out)
}

/// What Envoy logs when a port it was given was taken in the meantime.
const BIND_RACE: &str = "Address already in use";

// === impl Envoy ===

impl Envoy {
    /// Starts Envoy and waits until its admin endpoint reports ready (listeners warmed,
    /// i.e. the first ECDS response applied or the fetch timed out). Ports come from
    /// [`crate::free_port`], which another test may take before Envoy binds them: on
    /// `Address already in use` it starts again on other ports (three attempts).
    pub async fn start(config: EnvoyConfig<'_>) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(&config).await {
                Err(err) if attempt < 3 && err.to_string().contains(BIND_RACE) => attempt += 1,
                result => return result,
            }
        }
    }

    async fn start_once(config: &EnvoyConfig<'_>) -> anyhow::Result<Self> {
        let (listen_port, admin_port) = (crate::free_port(), crate::free_port());
        let twin_port = config.plain_twin.then(crate::free_port);
        let bootstrap = config.dir.join(format!("envoy-{}.yaml", config.node_id));
        std::fs::write(
            &bootstrap,
            render(config, listen_port, admin_port, twin_port)?,
        )?;
        let log = config.dir.join(format!("envoy-{}.log", config.node_id));
        let binary = binary();
        anyhow::ensure!(
            binary.exists(),
            "{} not found: run `cargo xtask setup`",
            binary.display()
        );
        let mut cmd = match config.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        let peer_token = uuid::Uuid::new_v4().simple().to_string();
        cmd.env("CHRONOGUARD_PEER_TOKEN", &peer_token)
            .arg("-c")
            .arg(&bootstrap)
            .args(["--concurrency", &config.concurrency.to_string()])
            .args(["--disable-hot-restart", "--log-level", "info"]);
        let process = Process::spawn("envoy", cmd, &log)?;
        let envoy = Self {
            listen_port,
            twin_port,
            admin_port,
            node_id: config.node_id.to_owned(),
            log,
            peer_token,
            process,
        };
        let ready_within = if config.wrapper.is_empty() { 30 } else { 600 };
        if let Err(err) = envoy.wait_ready(ready_within).await {
            let text = std::fs::read_to_string(&envoy.log).unwrap_or_default();
            if text.contains(BIND_RACE) {
                anyhow::bail!("{BIND_RACE} ({err})");
            }
            return Err(err);
        }
        Ok(envoy)
    }

    async fn wait_ready(&self, seconds: u64) -> anyhow::Result<()> {
        let client = crate::client::plain_client()?;
        let url = self.admin("/ready");
        crate::wait_for(
            "envoy ready",
            std::time::Duration::from_secs(seconds),
            || {
                let request = client.get(&url).send();
                async move {
                    request
                        .await
                        .ok()
                        .filter(|r| r.status().is_success())
                        .map(|_| ())
                }
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}; see {}", self.log.display()))
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// The gateway URL for `path` (send the target domain in the Host header).
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.listen_port)
    }

    /// The URL for `path` on the listener without the filter (`EnvoyConfig::plain_twin`).
    pub fn twin_url(&self, path: &str) -> Option<String> {
        let port = self.twin_port?;
        Some(format!("https://127.0.0.1:{port}{path}"))
    }

    /// One stat's value from `/stats?filter=`.
    pub async fn stat(&self, name: &str) -> anyhow::Result<Option<String>> {
        let body = crate::client::plain_client()?
            .get(self.admin(&format!("/stats?filter=^{}$", regex_escape(name))))
            .send()
            .await?
            .text()
            .await?;
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned)))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn stop(&mut self) {
        self.process.stop(std::time::Duration::from_secs(5));
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(without_filter: bool, plain_twin: bool) -> EnvoyConfig<'static> {
        EnvoyConfig {
            node_id: "n",
            fleet: "f",
            cp_grpc_port: 1,
            cp_http_port: 2,
            upstream_port: 3,
            ca: Path::new("ca.pem"),
            server_cert: Path::new("server.pem"),
            server_key: Path::new("server.key"),
            wasm: Path::new("filter.wasm"),
            initial_fetch_timeout: "1s",
            concurrency: 1,
            dir: Path::new("."),
            without_filter,
            plain_twin,
            request_ids: true,
            peer_header: true,
            wrapper: &[],
        }
    }

    #[test]
    fn the_twin_listener_is_the_gateway_listener_without_the_filter() -> anyhow::Result<()> {
        for without_filter in [false, true] {
            let yaml = render(&config(without_filter, true), 10001, 10002, Some(10003))?;
            let (listeners, _) = yaml.split_once(CLUSTERS).unwrap_or_default();
            let (gateway, twin) = listeners
                .split_once("  - name: egress_mtls_plain\n")
                .unwrap_or_default();
            assert!(gateway.contains("port_value: 10001 "), "{yaml}");
            assert_eq!(gateway.contains("- name: chronoguard\n"), !without_filter);
            assert!(twin.contains("port_value: 10003 "), "{yaml}");
            assert!(twin.contains("stat_prefix: egress_plain\n"), "{yaml}");
            assert!(twin.contains("require_client_certificate: true"), "{yaml}");
            assert!(!twin.contains("- name: chronoguard\n"), "{yaml}");
            assert!(!twin.contains("x-chronoguard-decision-id"), "{yaml}");
            assert_eq!(
                gateway.contains("x-chronoguard-decision-id"),
                !without_filter
            );
            assert!(twin.contains("use_remote_address: true"), "{yaml}");
            assert!(!twin.contains("x-chronoguard-peer"), "{yaml}");
            assert_eq!(gateway.contains("x-chronoguard-peer"), !without_filter);
            assert_eq!(
                gateway.contains("early_header_mutation_extensions"),
                !without_filter
            );
        }
        let single = render(&config(false, false), 10001, 10002, None)?;
        assert!(!single.contains("egress_mtls_plain"));
        let mut no_peer_header = config(false, false);
        no_peer_header.peer_header = false;
        let yaml = render(&no_peer_header, 10001, 10002, None)?;
        assert!(!yaml.contains("early_header_mutation_extensions"), "{yaml}");
        assert!(yaml.contains("- name: chronoguard\n"), "{yaml}");
        Ok(())
    }
}
