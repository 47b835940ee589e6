//! One plugin hop on its own, for the benchmark (`test-util` only): a plugin loaded and
//! initialized exactly as a chain step is, then, per call, what a request costs in the response
//! phase: a fresh store and instance from the pool and one `on-response` call under the use's
//! limits. No HTTP around it, so the figure is the isolation cost alone.

use std::path::Path;
use std::sync::Arc;

use super::bindings::bff::plugin::types;
use super::chain::{guarded, new_instance};
use super::load::{LoadedPlugin, init, load_file};
use super::{PluginLimits, PluginsConfig, Runtime};

/// A plugin use ready to run hops.
#[derive(Debug)]
pub struct Hop {
    runtime: Arc<Runtime>,
    plugin: Arc<LoadedPlugin>,
    config_json: Arc<str>,
    limits: PluginLimits,
    ctx: types::Context,
}

impl Hop {
    /// Loads `<dir>/<plugin>.wasm` with the default `[plugins]` settings and runs its `init`
    /// with `config`, as startup does. Must be called inside a Tokio runtime.
    pub async fn load(
        dir: &Path,
        plugin: &str,
        config: &serde_json::Value,
    ) -> Result<Self, String> {
        // The steady state: optimized code from the start.
        let plugins = PluginsConfig {
            dir: dir.to_path_buf(),
            tiered_compilation: false,
            ..PluginsConfig::default()
        };
        let runtime = Arc::new(
            Runtime::new(&plugins, &crate::Metrics::new().plugins).map_err(|e| e.to_string())?,
        );
        let loaded = load_file(&runtime, dir, plugin).await?;
        let limits = plugins.limits;
        let config_json: Arc<str> = config.to_string().into();
        let caps = init(&runtime, &loaded, config_json.clone(), limits).await?;
        if !caps.handles_response {
            return Err(format!("`{plugin}` does not handle responses"));
        }
        Ok(Self {
            runtime,
            plugin: loaded,
            config_json,
            limits,
            ctx: types::Context {
                client: "bench".into(),
                attributes: Vec::new(),
                route: "bench".into(),
                params: Vec::new(),
                request_id: "bench".into(),
            },
        })
    }

    /// A fresh instance's `on-response` on a 200 JSON response with `body`; returns the body the
    /// plugin produced.
    pub async fn on_response(&self, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let (mut store, instance) = new_instance(
            &self.runtime,
            &self.plugin,
            self.config_json.clone(),
            self.limits,
            None,
            None,
        )
        .await;
        let instance = instance.map_err(|e| e.to_string())?;
        let resp = types::Response {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
        };
        let hooks = instance.bff_plugin_hooks();
        guarded!(
            store,
            self.limits,
            hooks.call_on_response(&mut store, &self.ctx, &resp)
        )
        .map(|r| r.body)
        .map_err(|f| f.to_string())
    }
}
