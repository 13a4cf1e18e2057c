//! The ChronoGuard control plane binary: settings, telemetry, then the servers.

use anyhow::Context as _;
use control_plane::{app, config::Settings, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut config_path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config_path = args.next(),
            "--print-openapi" => {
                // The document served at /api/v1/openapi.json, without starting anything.
                println!("{}", control_plane::api::openapi::json());
                return Ok(());
            }
            "--help" | "-h" => {
                println!(
                    "usage: chronoguard-control-plane [--config FILE] [--print-openapi]\n\nSettings come from FILE (default control-plane/config/base.yaml if present), then APP__SECTION__KEY environment variables."
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let settings = Settings::load(config_path.as_deref()).context("loading settings")?;
    telemetry::init(&settings.log);
    app::run(settings).await
}
