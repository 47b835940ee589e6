//! One plugin hop on its own, for the benchmark (`test-util` only): a plugin loaded and
//! initialized exactly as a chain step is, then, per call, what a request costs in the response
//! phase: a fresh store and instance from the pool (or, for `Instances::Reused`, an idle one
//! when there is one) and one `on-response` call under the use's limits. No HTTP around it, so
//! the figure is the cost of the isolation alone.

use std::path::Path;
use std::sync::Arc;

use super::bindings::bff::plugin::types;
use super::chain::{guarded, new_instance};
use super::load::{LoadedPlugin, init, load_file};
use super::reuse::{IdlePool, Reusable};
use super::{Instances, PluginLimits, PluginsConfig, Runtime};

/// A plugin use ready to run hops.
#[derive(Debug)]
pub struct Hop {
    runtime: Arc<Runtime>,
    plugin: Arc<LoadedPlugin>,
    config_json: Arc<str>,
    limits: PluginLimits,
    ctx: types::Context,
    reuse: Option<IdlePool>,
}

impl Hop {
    /// Loads `<dir>/<plugin>.wasm` with the default `[plugins]` settings and runs its `init`
    /// with `config`, as startup does. Must be called inside a Tokio runtime.
    pub async fn load(
        dir: &Path,
        plugin: &str,
        config: &serde_json::Value,
        instances: Instances,
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
        let reuse = (instances == Instances::Reused)
            .then(|| IdlePool::new(plugins.reuse, runtime.metrics.instances_idle.clone()));
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
            reuse,
        })
    }

    /// `on-response` on a 200 JSON response with `body`, by a fresh instance (or an idle one,
    /// for a reused use); returns the body the plugin produced.
    pub async fn on_response(&self, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let code = self.plugin.code();
        let idle = self.reuse.as_ref().and_then(|p| p.take(code.tier));
        let (mut store, instance, uses) = match idle {
            Some(r) => (r.store, r.instance, r.uses),
            None => {
                let (store, instance) = new_instance(
                    &self.runtime,
                    &self.plugin,
                    &code,
                    self.config_json.clone(),
                    self.limits,
                    None,
                    None,
                )
                .await;
                (store, instance.map_err(|e| e.to_string())?, 0)
            }
        };
        let resp = types::Response {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
        };
        let hooks = instance.bff_plugin_hooks();
        let out = guarded!(
            store,
            self.limits,
            hooks.call_on_response(&mut store, &self.ctx, &resp)
        )
        .map(|r| r.body)
        .map_err(|f| f.to_string())?;
        if let Some(pool) = &self.reuse {
            pool.put(Reusable {
                store,
                instance,
                uses,
                tier: code.tier,
            });
        }
        Ok(out)
    }
}
