//! Routing: the phase after identification. Picks the identified client's route for the
//! (normalized) method and path, and captures `{param}` segments for the rewrite.
//!
//! Routes are tried in config order and the first match wins, the way Envoy's route tables
//! work: ops can read the file top to bottom and know which route serves a request. Each client
//! only sees routes that list it (or list no clients), so the same URL can reach a different
//! backend per client, which is the point of a BFF.

pub(crate) mod path;

use std::collections::HashSet;
use std::sync::Arc;

use http::Method;
use serde::Deserialize;

use crate::config::{Config, ConfigPath, Problems, is_valid_name};

/// `[[routes]]`: one route. See `config/full.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique id, used in logs and metrics.
    pub id: String,
    /// Clients this route serves; empty means every client.
    #[serde(default)]
    pub clients: Vec<String>,
    /// Methods this route serves; empty means any. `GET` also serves `HEAD`.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path pattern: literal segments, `{name}` for one segment, `{*name}` (last) for the rest.
    pub path: String,
    /// Upstream service requests are proxied to.
    pub service: Option<String>,
    /// Upstream path template using the captured params (default: the request path).
    pub rewrite: Option<String>,
    /// Plugins run on this route, in order.
    #[serde(default)]
    pub chain: Vec<ChainStep>,
    /// Services the chain's plugins may call with `send`; any other is refused.
    #[serde(default)]
    pub egress: Vec<String>,
}

/// One plugin use in a route's chain.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChainStep {
    /// Plugin name.
    pub plugin: String,
    /// What a failing plugin does to the request.
    #[serde(default)]
    pub on_error: OnError,
    /// The plugin's own config, validated by the plugin when it loads.
    #[serde(default)]
    pub config: toml::Table,
    /// Overrides of `[plugins.limits]` for this use.
    #[serde(default)]
    pub limits: crate::plugins::PluginLimitsOverride,
    /// Where this use's instances come from: a fresh one per request (the default), or
    /// `reused` from earlier requests (trusted plugins only, see `[plugins.reuse]`).
    #[serde(default)]
    pub instances: crate::plugins::Instances,
}

/// Failure policy of a plugin use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// The request fails with a JSON 502 naming the plugin.
    #[default]
    FailClosed,
    /// The plugin is skipped and the chain continues.
    FailOpen,
}

/// A compiled route of the live snapshot.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) id: Arc<str>,
    /// Position in the config's `routes` (its metrics series).
    pub(crate) index: usize,
    methods: Vec<Method>,
    pattern: Pattern,
    pub(crate) service: Option<Arc<str>>,
    rewrite: Option<Template>,
    /// The loaded plugin chain, if the route has one.
    pub(crate) chain: Option<Arc<crate::plugins::Chain>>,
}

/// Captured `{param}` values, in pattern order.
pub(crate) type Params = Vec<(Arc<str>, String)>;

/// Why no route serves a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("no route matches the request path")]
    NotFound,
    #[error("the route does not serve this method")]
    MethodNotAllowed { allow: String },
}

#[derive(Debug)]
pub(crate) struct Router {
    routes: Vec<Arc<Route>>,
    /// For each client (by identifier index), the indices of the routes it may use, in order.
    by_client: Vec<Vec<usize>>,
}

impl Router {
    /// Builds from a validated config and the routes' loaded chains (by route index).
    pub(crate) fn build(
        config: &Config,
        mut chains: Vec<Option<Arc<crate::plugins::Chain>>>,
    ) -> Self {
        chains.resize(config.routes.len(), None);
        let routes: Vec<Arc<Route>> = config
            .routes
            .iter()
            .zip(chains)
            .enumerate()
            .map(|(index, (r, chain))| {
                Arc::new(Route {
                    id: r.id.as_str().into(),
                    index,
                    methods: r
                        .methods
                        .iter()
                        .map(|m| Method::from_bytes(m.as_bytes()).expect("methods were validated"))
                        .collect(),
                    pattern: Pattern::parse(&r.path).expect("route paths were validated"),
                    service: r.service.as_deref().map(Arc::from),
                    rewrite: r
                        .rewrite
                        .as_deref()
                        .map(|t| Template::parse(t).expect("rewrites were validated")),
                    chain,
                })
            })
            .collect();
        let by_client = config
            .clients
            .iter()
            .map(|c| {
                config
                    .routes
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.clients.is_empty() || r.clients.contains(&c.name))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        Self { routes, by_client }
    }

    /// The first of `client`'s routes that matches; 405 if only the method is wrong.
    pub(crate) fn find(
        &self,
        client: usize,
        method: &Method,
        path: &str,
    ) -> Result<(&Arc<Route>, Params), RouteError> {
        let mut allowed: Vec<&Method> = Vec::new();
        let mut path_matched = false;
        let mut params = Params::new();
        for &i in self.by_client.get(client).map_or(&[][..], |v| v.as_slice()) {
            let route = &self.routes[i];
            params.clear();
            if !route.pattern.matches(path, &mut params) {
                continue;
            }
            if route.allows(method) {
                return Ok((route, params));
            }
            path_matched = true;
            allowed.extend(route.methods.iter());
        }
        if !path_matched {
            return Err(RouteError::NotFound);
        }
        let mut names: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
        if names.contains(&"GET") {
            names.push("HEAD");
        }
        names.sort_unstable();
        names.dedup();
        Err(RouteError::MethodNotAllowed {
            allow: names.join(", "),
        })
    }
}

impl Route {
    fn allows(&self, method: &Method) -> bool {
        self.methods.is_empty()
            || self.methods.contains(method)
            || (method == Method::HEAD && self.methods.contains(&Method::GET))
    }

    /// The upstream path (before the service's base path) for a matched request.
    pub(crate) fn upstream_path<'a>(
        &self,
        path: &'a str,
        params: &Params,
    ) -> std::borrow::Cow<'a, str> {
        match &self.rewrite {
            None => std::borrow::Cow::Borrowed(path),
            Some(t) => std::borrow::Cow::Owned(t.render(params)),
        }
    }
}

// === Path patterns ===

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(Box<str>),
    Param(Arc<str>),
    Rest(Arc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    segs: Vec<Seg>,
}

fn param_name(seg: &str) -> Option<(&str, bool)> {
    let inner = seg.strip_prefix('{')?.strip_suffix('}')?;
    match inner.strip_prefix('*') {
        Some(rest) => Some((rest, true)),
        None => Some((inner, false)),
    }
}

fn is_ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Pattern {
    fn parse(pattern: &str) -> Result<Self, String> {
        let body = pattern
            .strip_prefix('/')
            .ok_or("a path pattern starts with `/`")?;
        let raw: Vec<&str> = body.split('/').collect();
        let mut segs = Vec::with_capacity(raw.len());
        let mut names = HashSet::new();
        for (i, seg) in raw.iter().enumerate() {
            let last = i + 1 == raw.len();
            if let Some((name, rest)) = param_name(seg) {
                if !is_ident(name) {
                    return Err(format!(
                        "`{seg}`: a parameter name is letters, digits and `_`"
                    ));
                }
                if !names.insert(name) {
                    return Err(format!("parameter `{name}` appears twice"));
                }
                if rest && !last {
                    return Err(format!("`{seg}` must be the last segment"));
                }
                segs.push(if rest {
                    Seg::Rest(name.into())
                } else {
                    Seg::Param(name.into())
                });
            } else {
                if seg.contains(['{', '}']) {
                    return Err(format!(
                        "`{seg}`: a parameter takes a whole segment, like `{{id}}`"
                    ));
                }
                if (seg.is_empty() && !last) || *seg == "." || *seg == ".." {
                    return Err("the pattern must be normalized (no `//`, `.` or `..`)".into());
                }
                if seg.contains(['%', '\\', '?', '#', ' ']) {
                    return Err(format!(
                        "`{seg}` contains a character paths cannot route on"
                    ));
                }
                segs.push(Seg::Lit((*seg).into()));
            }
        }
        Ok(Self { segs })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.segs.iter().filter_map(|s| match s {
            Seg::Param(n) | Seg::Rest(n) => Some(&**n),
            Seg::Lit(_) => None,
        })
    }

    fn matches(&self, path: &str, params: &mut Params) -> bool {
        let mut rest = &path[1..];
        for (i, seg) in self.segs.iter().enumerate() {
            if let Seg::Rest(name) = seg {
                params.push((name.clone(), rest.to_owned()));
                return true;
            }
            let (head, tail) = match rest.find('/') {
                Some(p) => (&rest[..p], Some(&rest[p + 1..])),
                None => (rest, None),
            };
            let ok = match seg {
                Seg::Lit(l) => **l == *head,
                Seg::Param(name) => {
                    let ok = !head.is_empty();
                    if ok {
                        params.push((name.clone(), head.to_owned()));
                    }
                    ok
                }
                Seg::Rest(_) => unreachable!("handled above"),
            };
            if !ok {
                return false;
            }
            match tail {
                Some(t) => rest = t,
                None => {
                    // Path used up: matches only if the pattern is too, or only a `{*rest}` is left.
                    return match &self.segs[i + 1..] {
                        [] => true,
                        [Seg::Rest(name)] => {
                            params.push((name.clone(), String::new()));
                            true
                        }
                        _ => false,
                    };
                }
            }
        }
        false
    }
}

// === Rewrite templates ===

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(Box<str>),
    Var(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    parts: Vec<Part>,
}

impl Template {
    fn parse(t: &str) -> Result<Self, String> {
        if !t.starts_with('/') {
            return Err("a rewrite starts with `/`".into());
        }
        let mut parts = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].into()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{t}`"))?;
            let inner = &rest[open + 1..open + close];
            let name = inner.strip_prefix('*').unwrap_or(inner);
            if !is_ident(name) {
                return Err(format!("`{{{inner}}}` is not a parameter name"));
            }
            parts.push(Part::Var(name.into()));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in `{t}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.into()));
        }
        Ok(Self { parts })
    }

    fn vars(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(&**v),
            Part::Lit(_) => None,
        })
    }

    fn render(&self, params: &Params) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(l) => out.push_str(l),
                Part::Var(v) => {
                    if let Some((_, value)) = params.iter().find(|(n, _)| **n == **v) {
                        out.push_str(value);
                    }
                }
            }
        }
        out
    }
}

// === Validation ===

/// Checks `[[routes]]` against the services and clients of the same config.
pub(crate) fn validate(
    routes: &[RouteConfig],
    config: &Config,
    at: &ConfigPath,
    problems: &mut Problems,
) {
    let mut ids = HashSet::new();
    let reused: Vec<(usize, usize)> = routes
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.chain
                .iter()
                .enumerate()
                .filter(|(_, s)| s.instances == crate::plugins::Instances::Reused)
                .map(move |(j, _)| (i, j))
        })
        .collect();
    if let Some(&(i, j)) = reused.first()
        && let Some(why) = config
            .plugins
            .idle_overcommit(reused.len(), config.plugins.max_instances)
    {
        problems.push(at.index(i).key("chain").index(j).key("instances"), why);
    }
    for (i, r) in routes.iter().enumerate() {
        let at = at.index(i);
        if !is_valid_name(&r.id) {
            problems.push(at.key("id"), crate::config::NAME_RULE);
        } else if r.id == crate::metrics::OTHER {
            problems.push(
                at.key("id"),
                "`other` is reserved: metrics label requests no route matched with it",
            );
        } else if !ids.insert(r.id.as_str()) {
            problems.push(at.key("id"), format!("duplicate route id `{}`", r.id));
        }
        let mut seen_clients = HashSet::new();
        for (j, c) in r.clients.iter().enumerate() {
            if !config.clients.iter().any(|k| &k.name == c) {
                problems.push(at.key("clients").index(j), format!("unknown client `{c}`"));
            } else if !seen_clients.insert(c) {
                problems.push(
                    at.key("clients").index(j),
                    format!("client `{c}` is listed twice"),
                );
            }
        }
        for (j, m) in r.methods.iter().enumerate() {
            let token = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
            if !token || Method::from_bytes(m.as_bytes()).is_err() {
                problems.push(
                    at.key("methods").index(j),
                    format!("`{m}` is not an HTTP method (use uppercase, like `GET`)"),
                );
            }
        }
        let pattern = match Pattern::parse(&r.path) {
            Ok(p) => Some(p),
            Err(e) => {
                problems.push(at.key("path"), e);
                None
            }
        };
        if let Some(rw) = &r.rewrite {
            match Template::parse(rw) {
                Err(e) => problems.push(at.key("rewrite"), e),
                Ok(t) => {
                    if let Some(p) = &pattern {
                        let known: HashSet<&str> = p.names().collect();
                        for v in t.vars().filter(|v| !known.contains(v)) {
                            problems.push(
                                at.key("rewrite"),
                                format!("`{{{v}}}` is not captured by the path `{}`", r.path),
                            );
                        }
                    }
                }
            }
        }
        match &r.service {
            Some(s) if !config.services.contains_key(s) => {
                problems.push(at.key("service"), format!("unknown service `{s}`"));
            }
            None if r.chain.is_empty() => problems.push(
                at.key("id"),
                "the route has no `service` and no `chain`: nothing would answer it",
            ),
            _ => {}
        }
        for (j, step) in r.chain.iter().enumerate() {
            if !is_valid_name(&step.plugin) {
                problems.push(
                    at.key("chain").index(j).key("plugin"),
                    crate::config::NAME_RULE,
                );
            }
        }
        for (j, service) in r.egress.iter().enumerate() {
            if !config.services.contains_key(service) {
                problems.push(
                    at.key("egress").index(j),
                    format!("unknown service `{service}`"),
                );
            }
        }
        for (j, step) in r.chain.iter().enumerate() {
            let limits = config.plugins.limits.with(&step.limits);
            if step.limits != Default::default() {
                limits.validate(
                    config.plugins.instance_memory_bytes,
                    &at.key("chain").index(j).key("limits"),
                    problems,
                );
            }
        }
        if r.chain.is_empty() && !r.egress.is_empty() {
            problems.push(
                at.key("egress"),
                "`egress` lists services for plugins to call, but the route has no `chain`",
            );
        }
    }
    validate_pins(routes, &config.plugins, at, problems);
    validate_canaries(routes, config, at, problems);
}

/// Canaries name plugins the routes use and clients that exist; a chain runs at most one
/// plugin with a canary (a request is in one cohort for its whole chain); a pinned plugin can
/// have no canary (only the pinned build may run).
fn validate_canaries(
    routes: &[RouteConfig],
    config: &Config,
    at: &ConfigPath,
    problems: &mut Problems,
) {
    let canaries = ConfigPath::root().key("plugins").key("canary");
    for (name, canary) in &config.plugins.canary {
        if !routes
            .iter()
            .any(|r| r.chain.iter().any(|s| s.plugin == *name))
        {
            problems.push(
                canaries.key(name),
                format!("no route's chain uses plugin `{name}`"),
            );
        }
        if config.plugins.sha256.contains_key(name) {
            problems.push(
                canaries.key(name),
                format!(
                    "plugin `{name}` is pinned in `plugins.sha256`: only the pinned build may run"
                ),
            );
        }
        for (k, client) in canary.clients.iter().enumerate() {
            if !config.clients.iter().any(|c| c.name == *client) {
                problems.push(
                    canaries.key(name).key("clients").index(k),
                    format!("unknown client `{client}`"),
                );
            }
        }
    }
    for (i, r) in routes.iter().enumerate() {
        let mut with_canary: Vec<&str> = r
            .chain
            .iter()
            .map(|s| s.plugin.as_str())
            .filter(|p| config.plugins.canary.contains_key(*p))
            .collect();
        with_canary.sort_unstable();
        with_canary.dedup();
        if with_canary.len() > 1 {
            problems.push(
                at.index(i).key("chain"),
                format!(
                    "plugins `{}` all have a canary: a chain runs at most one plugin with a canary",
                    with_canary.join("`, `")
                ),
            );
        }
    }
}

/// Pins name plugins the routes use (a typo would pin nothing), and with `require_sha256` every
/// plugin used has one.
fn validate_pins(
    routes: &[RouteConfig],
    plugins: &crate::plugins::PluginsConfig,
    at: &ConfigPath,
    problems: &mut Problems,
) {
    let mut first_use: std::collections::BTreeMap<&str, ConfigPath> = Default::default();
    for (i, r) in routes.iter().enumerate() {
        for (j, step) in r.chain.iter().enumerate() {
            first_use
                .entry(step.plugin.as_str())
                .or_insert_with(|| at.index(i).key("chain").index(j).key("plugin"));
        }
    }
    let pins = ConfigPath::root().key("plugins").key("sha256");
    for name in plugins.sha256.keys() {
        if !first_use.contains_key(name.as_str()) {
            problems.push(
                pins.key(name),
                format!("no route's chain uses plugin `{name}`"),
            );
        }
    }
    if plugins.require_sha256 {
        for (name, used_at) in first_use {
            if !plugins.sha256.contains_key(name) {
                problems.push(
                    used_at,
                    format!("`plugins.require_sha256` is on and plugin `{name}` has no pin in `plugins.sha256`"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
