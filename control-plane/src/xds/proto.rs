//! Domain → Envoy protobuf: the ECDS resource wrapping the wasm filter configuration.

use crate::bundle::Snapshot;
use crate::config::Gateway;
use envoy_types::pb::envoy::config::core::v3::{
    AsyncDataSource, DataSource, TypedExtensionConfig, async_data_source, data_source,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    EnvironmentVariables, PluginConfig, VmConfig, plugin_config,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{Any, StringValue};
use envoy_types::util::pack_any;
use filter_core::input::PEER_TOKEN_ENV;

/// The response type URL Envoy expects for ECDS (not the wasm filter's type).
pub const TYPED_EXTENSION_CONFIG: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

const FAILURE_POLICY_FAIL_CLOSED: i32 = 1;

/// The wasm filter configuration carrying `plugin_config` JSON.
pub fn wasm_filter(gateway: &Gateway, plugin_config: &str) -> Any {
    let wasm = Wasm {
        config: Some(PluginConfig {
            name: gateway.resource_name.clone(),
            root_id: "chronoguard".into(),
            configuration: Some(pack_any(StringValue {
                value: plugin_config.to_owned(),
            })),
            failure_policy: FAILURE_POLICY_FAIL_CLOSED,
            vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                vm_id: gateway.vm_id.clone(),
                runtime: "envoy.wasm.runtime.v8".into(),
                code: Some(AsyncDataSource {
                    specifier: Some(async_data_source::Specifier::Local(DataSource {
                        specifier: Some(data_source::Specifier::Filename(
                            gateway.wasm_filename.clone(),
                        )),
                        ..Default::default()
                    })),
                }),
                // The listener's peer-header token (`envoy-config/README.md`,
                // "Identity"), from Envoy's own environment: it never passes through here.
                environment_variables: Some(EnvironmentVariables {
                    host_env_keys: vec![PEER_TOKEN_ENV.into()],
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }),
    };
    pack_any(wasm)
}

/// A state-of-the-world response with the single ECDS resource: `snapshot`'s version with
/// `plugin_config`, its configuration in full or a delta against the stream's previous one.
pub fn response(
    gateway: &Gateway,
    snapshot: &Snapshot,
    plugin_config: &str,
    nonce: String,
) -> DiscoveryResponse {
    let resource = TypedExtensionConfig {
        name: gateway.resource_name.clone(),
        typed_config: Some(wasm_filter(gateway, plugin_config)),
    };
    DiscoveryResponse {
        version_info: snapshot.version_info(),
        resources: vec![pack_any(resource)],
        type_url: TYPED_EXTENSION_CONFIG.into(),
        nonce,
        ..Default::default()
    }
}
