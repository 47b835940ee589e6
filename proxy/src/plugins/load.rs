//! Loading: from `<dir>/<name>.wasm` to a type-checked, initialized plugin, off the request path.
//!
//! Each plugin file is read, hashed, checked against the contract version, compiled (on a
//! blocking thread) and pre-instantiated against the linker once (`PluginPre`): that is the
//! type-check, so a plugin that imports something the proxy does not provide fails here, never
//! on a request. Then every use of it in a chain is initialized with that use's config (`init`),
//! so a config the plugin rejects fails the load too. Every problem is collected.

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::{self, bff::plugin::types};
use super::chain::{Chain, FailureKind, Step, new_store};
use super::{PluginLimits, Runtime};
use crate::config::Config;

/// The contract version this host implements: `package bff:plugin@CONTRACT_VERSION` in
/// `plugin-sdk/wit/plugin.wit` (a test keeps the two equal).
pub(crate) const CONTRACT_VERSION: (u64, u64, u64) = (0, 1, 0);
const HOOKS_EXPORT: &str = "bff:plugin/hooks";

/// Plugins that could not be loaded, every problem listed.
#[derive(Debug, thiserror::Error)]
#[error("{} plugin problem(s):\n  {}", .problems.len(), .problems.join("\n  "))]
pub struct LoadError {
    /// One line per problem: where (route and chain step, or plugin file) and what.
    pub problems: Vec<String>,
}

/// A compiled, type-checked plugin file.
pub(crate) struct LoadedPlugin {
    pub(crate) name: Arc<str>,
    /// Hex SHA-256 of the file: the plugin's version.
    pub(crate) sha256: String,
    pub(crate) size: u64,
    pub(crate) pre: bindings::PluginPre<super::host::HostState>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Loads every plugin the config's routes use and initializes each use. Returns, per route (in
/// config order), its chain, or `None` for routes without one.
pub(crate) async fn load_chains(
    runtime: &Arc<Runtime>,
    config: &Config,
) -> Result<Vec<Option<Arc<Chain>>>, LoadError> {
    let mut problems = Vec::new();
    let mut plugins: BTreeMap<&str, Option<Arc<LoadedPlugin>>> = BTreeMap::new();
    for r in &config.routes {
        for step in &r.chain {
            plugins.entry(step.plugin.as_str()).or_insert(None);
        }
    }
    for (name, slot) in plugins.iter_mut() {
        match load_file(runtime, name).await {
            Ok(p) => *slot = Some(Arc::new(p)),
            Err(e) => problems.push(format!("plugin `{name}`: {e}")),
        }
    }

    let mut chains = Vec::with_capacity(config.routes.len());
    for (i, r) in config.routes.iter().enumerate() {
        if r.chain.is_empty() {
            chains.push(None);
            continue;
        }
        let mut steps = Vec::with_capacity(r.chain.len());
        for (j, use_) in r.chain.iter().enumerate() {
            let Some(Some(plugin)) = plugins.get(use_.plugin.as_str()) else {
                continue; // already reported
            };
            let limits = runtime.config.limits.with(&use_.limits);
            let config_json: Arc<str> = serde_json::to_string(&use_.config)
                .unwrap_or_else(|_| "{}".into())
                .into();
            match init(runtime, plugin, config_json.clone(), limits).await {
                Ok(caps) => steps.push(Step {
                    plugin: plugin.clone(),
                    config_json,
                    on_error: use_.on_error,
                    limits,
                    caps,
                }),
                Err(e) => problems.push(format!(
                    "routes[{i}].chain[{j}] (route `{}`, plugin `{}`): {e}",
                    r.id, use_.plugin
                )),
            }
        }
        chains.push(Some(Arc::new(Chain::new(
            r.id.as_str().into(),
            steps,
            r.egress.iter().map(|s| Arc::from(s.as_str())).collect(),
            runtime.clone(),
        ))));
    }
    if problems.is_empty() {
        Ok(chains)
    } else {
        Err(LoadError { problems })
    }
}

/// Reads, checks and compiles one plugin file.
pub(crate) async fn load_file(runtime: &Runtime, name: &str) -> Result<LoadedPlugin, String> {
    let path = runtime.config.dir.join(format!("{name}.wasm"));
    let engine = runtime.engine.clone();
    // Reading and compiling take milliseconds to seconds: never on a runtime worker.
    let (component, sha256, size) = tokio::task::spawn_blocking(move || {
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let component = Component::new(&engine, &bytes).map_err(|e| {
            format!(
                "{} is not a valid WebAssembly component: {}",
                path.display(),
                first_line(&e)
            )
        })?;
        Ok::<_, String>((component, sha256, bytes.len() as u64))
    })
    .await
    .map_err(|e| format!("loading was interrupted: {e}"))??;
    check_contract(runtime, &component)?;
    let pre = runtime.linker.instantiate_pre(&component).map_err(|e| {
        format!(
            "does not fit the bff-proxy host: {}",
            crate::ErrorChain(e.as_ref())
        )
    })?;
    let pre = bindings::PluginPre::new(pre).map_err(|e| {
        format!(
            "does not implement the plugin world: {}",
            crate::ErrorChain(e.as_ref())
        )
    })?;
    Ok(LoadedPlugin {
        name: name.into(),
        sha256,
        size,
        pre,
    })
}

/// Refuses a component built against an incompatible contract version, naming both versions.
fn check_contract(runtime: &Runtime, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    let found: Vec<String> = ty
        .exports(&runtime.engine)
        .map(|(name, _)| name.to_owned())
        .filter(|n| n.starts_with(HOOKS_EXPORT))
        .collect();
    let (ours_major, ours_minor, _) = CONTRACT_VERSION;
    let ours = format!("{ours_major}.{ours_minor}.{}", CONTRACT_VERSION.2);
    let Some(export) = found.first() else {
        return Err(format!(
            "does not export `{HOOKS_EXPORT}`: not a bff-proxy plugin (build it with bff-plugin-sdk, contract {ours})"
        ));
    };
    let version = export
        .split_once('@')
        .map(|(_, v)| v)
        .ok_or_else(|| format!("exports `{export}` without a version"))?;
    let parsed: Vec<u64> = version
        .split('.')
        .map(|p| {
            p.split(['-', '+'])
                .next()
                .unwrap_or(p)
                .parse()
                .unwrap_or(u64::MAX)
        })
        .collect();
    let (major, minor) = (parsed.first().copied(), parsed.get(1).copied());
    let compatible = match (major, minor) {
        (Some(0), Some(m)) => ours_major == 0 && m == ours_minor,
        (Some(m), Some(_)) => m == ours_major,
        _ => false,
    };
    if !compatible {
        return Err(format!(
            "built against plugin contract bff:plugin@{version}, but this proxy implements bff:plugin@{ours}; rebuild it with a matching bff-plugin-sdk"
        ));
    }
    Ok(())
}

/// Calls `init` on a fresh instance with one use's config.
pub(crate) async fn init(
    runtime: &Runtime,
    plugin: &LoadedPlugin,
    config_json: Arc<str>,
    limits: PluginLimits,
) -> Result<types::Capabilities, String> {
    let mut store = new_store(runtime, plugin, config_json.clone(), limits, None);
    let instance = plugin
        .pre
        .instantiate_async(&mut store)
        .await
        .map_err(|e| format!("cannot be instantiated: {}", first_line(&e)))?;
    let hooks = instance.bff_plugin_hooks();
    super::chain::guarded!(store, limits, hooks.call_init(&mut store, &config_json)).map_err(|f| {
        match f {
            FailureKind::Error {
                kind: types::ErrorKind::InvalidConfig,
                message,
            } => format!("config rejected by the plugin: {message}"),
            other => format!("init failed: {other}"),
        }
    })
}

fn first_line(e: &wasmtime::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_version_matches_the_wit() {
        let wit = include_str!("../../../plugin-sdk/wit/plugin.wit");
        let (a, b, c) = CONTRACT_VERSION;
        assert!(wit.contains(&format!("package bff:plugin@{a}.{b}.{c};")));
    }
}
