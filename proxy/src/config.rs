//! Configuration: the TOML file ops write, turned into typed, validated settings.
//!
//! Sits before everything else: `main` (and `check`) load a [`Config`], and the live-state builder
//! turns it into the immutable snapshot the request path reads. Loading goes parse → decode each
//! section → validate, and collects *every* problem with its path and line before failing, so one
//! `bff-proxy check` run shows everything that is wrong with a file.
//!
//! Each component owns its section's struct (`listener::ServerConfig`, `upstream::ServiceConfig`,
//! `identity::ClientConfig`, `router::RouteConfig`, ...); this module only assembles them.

pub(crate) mod files;
mod load;
mod path;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

pub(crate) use self::load::Problems;
pub use self::load::{ConfigError, Problem};
pub(crate) use self::path::ConfigPath;

pub use crate::admin::AdminConfig;
pub use crate::identity::{
    CertField, ClientConfig, IdentifyRule, IdentityConfig, JwtConfig, TOKEN_CACHE_ENTRIES,
};
pub use crate::listener::ServerConfig;
pub use crate::listener::tls::{ClientCertMode, TlsConfig, TlsVersion};
pub use crate::observe::access_log::{AccessLogConfig, AccessLogFormat};
pub use crate::pipeline::HeadersConfig;
pub use crate::plugins::{PluginLimits, PluginLimitsOverride, PluginsConfig};
pub use crate::ratelimit::RateLimit;
pub use crate::reload::ReloadConfig;
pub use crate::router::{ChainStep, OnError, RouteConfig};
pub use crate::upstream::{CacheConfig, Protocol, ServiceConfig, UpstreamTlsConfig};

/// Default data-plane listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The whole configuration file. See `config/full.toml` for every key with its default.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Data-plane listen address (HTTP/1.1 and h2c on one port).
    pub listen: SocketAddr,
    /// Admin listener (probes, `/metrics`, `/admin/*`) and its optional token.
    pub admin: AdminConfig,
    /// Server limits, timeouts and lifecycle.
    pub server: ServerConfig,
    /// TLS termination on the data-plane port (cleartext when absent).
    pub tls: Option<TlsConfig>,
    /// Headers the proxy adds to or strips from upstream requests.
    pub headers: HeadersConfig,
    /// What to do with requests no client rule matches.
    pub identity: IdentityConfig,
    /// Named upstream services.
    pub services: BTreeMap<String, ServiceConfig>,
    /// Clients in evaluation order: the first whose rule matches wins.
    pub clients: Vec<ClientConfig>,
    /// Routes in match order: the first that matches the client, method and path wins.
    pub routes: Vec<RouteConfig>,
    /// Where plugins come from and their default limits.
    pub plugins: PluginsConfig,
    /// Hot reload: file watching and debouncing.
    pub reload: ReloadConfig,
    /// One line per request.
    pub access_log: AccessLogConfig,
    /// Span export to an OpenTelemetry collector (none when absent).
    pub tracing: Option<crate::observe::otel::TracingConfig>,
    /// The file this config was loaded from, if any: reloads read it again.
    pub source: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid socket address"),
            admin: AdminConfig::default(),
            server: ServerConfig::default(),
            tls: None,
            headers: HeadersConfig::default(),
            identity: IdentityConfig::default(),
            services: BTreeMap::new(),
            clients: Vec::new(),
            routes: Vec::new(),
            plugins: PluginsConfig::default(),
            reload: ReloadConfig::default(),
            access_log: AccessLogConfig::default(),
            tracing: None,
            source: None,
        }
    }
}

impl Config {
    /// Reads and validates a config file, reporting every problem at once.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        // Paths in the file are relative to the file, not to wherever the proxy was started.
        let mut config = load::load(&text, &path.display().to_string(), path.parent())?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Makes the relative paths in the config relative to `base`.
    fn resolve_paths(&mut self, base: &Path) {
        if self.plugins.dir.is_relative() {
            self.plugins.dir = base.join(&self.plugins.dir);
        }
        if let Some(dir) = &mut self.plugins.cache_dir
            && dir.is_relative()
        {
            *dir = base.join(&*dir);
        }
        self.access_log.resolve(base);
        if let Some(tls) = &mut self.tls {
            tls.resolve(base);
        }
        if let Some(jwt) = &mut self.identity.jwt {
            jwt.resolve(base);
        }
        for tls in self.services.values_mut().filter_map(|s| s.tls.as_mut()) {
            tls.resolve(base);
        }
    }

    /// True if some route runs plugins (the plugin runtime is only started then).
    pub fn uses_plugins(&self) -> bool {
        self.routes.iter().any(|r| !r.chain.is_empty())
    }

    /// Parses and validates config text; `origin` names it in error messages (usually the file path).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        load::load(text, origin, None)
    }

    /// Semantic checks across sections (references, duplicates, ranges). Structural problems
    /// (types, unknown keys) were already collected while decoding.
    fn validate(&self, problems: &mut Problems) {
        let root = ConfigPath::root();
        if self.listen == self.admin.listen && self.listen.port() != 0 {
            problems.push(
                root.key("listen"),
                format!(
                    "must differ from the admin listener (`admin.listen` = {})",
                    self.admin.listen
                ),
            );
        }
        self.admin.validate(&root.key("admin"), problems);
        self.server.validate(&root.key("server"), problems);
        self.headers.validate(&root.key("headers"), problems);
        for (name, service) in &self.services {
            service.validate(name, &root.key("services").key(name), problems);
        }
        crate::identity::validate(
            &self.identity,
            &self.clients,
            self.tls.as_ref(),
            &root,
            problems,
        );
        self.plugins.validate(&root.key("plugins"), problems);
        self.reload.validate(&root.key("reload"), problems);
        self.access_log.validate(&root.key("access_log"), problems);
        if let Some(t) = &self.tracing {
            t.validate(&root.key("tracing"), problems);
        }
        crate::router::validate(&self.routes, self, &root.key("routes"), problems);
    }

    /// One line for `bff-proxy check`: what the file defines.
    pub fn summary(&self) -> String {
        let keyed = self
            .clients
            .iter()
            .filter(|c| c.identify.iter().any(|r| r.api_key_header.is_some()))
            .count();
        let listen = match &self.tls {
            None => format!("listen {}", self.listen),
            Some(t) => format!(
                "listen {} (HTTPS{})",
                self.listen,
                match (&t.client_ca, t.client_cert) {
                    (None, _) => "",
                    (Some(_), ClientCertMode::Optional) => ", client certificates optional",
                    (Some(_), ClientCertMode::Required) => ", client certificates required",
                }
            ),
        };
        let jwt = match &self.identity.jwt {
            Some(_) => ", bearer tokens verified",
            None => "",
        };
        format!(
            "{} service(s), {} client(s) ({} by API key{jwt}), {} route(s); {listen}, admin {}",
            self.services.len(),
            self.clients.len(),
            keyed,
            self.routes.len(),
            self.admin.listen
        )
    }
}

/// What [`is_valid_name`] accepts, for problem messages.
pub(crate) const NAME_RULE: &str = "names start with a lowercase letter and use only lowercase \
                                    letters, digits, `-` and `_` (at most 64 characters)";

/// Names of clients, services, routes and plugins: they become metric labels and header values,
/// so they are kept short and boring.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Records a problem when `value` is outside `range`.
pub(crate) fn check_duration(
    value: std::time::Duration,
    range: std::ops::RangeInclusive<std::time::Duration>,
    at: &ConfigPath,
    problems: &mut Problems,
) {
    if !range.contains(&value) {
        problems.push(
            at.clone(),
            format!(
                "must be between {} and {}",
                humantime::format_duration(*range.start()),
                humantime::format_duration(*range.end())
            ),
        );
    }
}

/// Records a problem when `value` is outside `range`.
pub(crate) fn check_range<T: PartialOrd + std::fmt::Display>(
    value: T,
    range: std::ops::RangeInclusive<T>,
    at: &ConfigPath,
    problems: &mut Problems,
) {
    if !range.contains(&value) {
        problems.push(
            at.clone(),
            format!("must be between {} and {}", range.start(), range.end()),
        );
    }
}
