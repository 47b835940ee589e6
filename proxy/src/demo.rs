//! `bff-proxy demo`: the one-command tour. Starts the demo retail microservices on loopback and
//! the real [`Proxy`] with `config/demo.toml`, prints curl commands that show a different route
//! per client for the same URL, and stops everything on Ctrl-C.
//!
//! Sits beside `main.rs` (which calls [`run`]) and the end-to-end tests (which use
//! [`start_services`] and [`config_for`] on OS-assigned ports). The services themselves live in
//! `demo/services.rs`; their JSON in `demo/data/`.

mod services;

use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, Problem};
use crate::server::Proxy;

pub use self::services::{DemoServices, SERVICE_NAMES, start_services};

/// The demo config, as built into the binary (a copy of `config/demo.toml`).
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

/// Where [`run`] looks for the demo config when none is given (relative to the working directory).
pub const DEMO_CONFIG_PATH: &str = "config/demo.toml";

/// What to do when the demo's plugins do not load (usually: not built yet).
const BUILD_PLUGINS: &str = "the demo's example plugins did not load; build them with \
    `cd plugins && cargo build --release --target wasm32-wasip2` (scripts/demo.sh does this)";

/// The partner API key the demo config accepts (stored there as its SHA-256).
pub const PARTNER_API_KEY: &str = "demo-partner-key";

/// One request the demo banner suggests, and what it answers.
#[derive(Debug, Clone, Copy)]
pub struct Example {
    /// Request path on the data plane (always `GET`).
    pub path: &'static str,
    /// Request headers.
    pub headers: &'static [(&'static str, &'static str)],
    /// The status it gets.
    pub status: u16,
    /// What it shows, for the banner.
    pub shows: &'static str,
}

/// Groups of example requests, in banner order: the heading, then its requests. The demo test
/// sends each one and checks its status, so the banner cannot drift from the config.
pub const EXAMPLES: &[(&str, &[Example])] = &[
    (
        "Same URL, one backend per client (the x-client header or an API key picks the client):",
        &[
            Example {
                path: "/api/home",
                headers: &[("x-client", "web")],
                status: 200,
                shows: "web: users + orders + recommendations in one response (aggregate plugin)",
            },
            Example {
                path: "/api/home",
                headers: &[("x-client", "mobile")],
                status: 200,
                shows: "mobile: the same aggregate trimmed to what the app shows (fields plugin)",
            },
            Example {
                path: "/api/home",
                headers: &[("x-client", "voice")],
                status: 200,
                shows: "voice: one spoken sentence made from it (voice plugin)",
            },
            Example {
                path: "/api/home",
                headers: &[("x-api-key", PARTNER_API_KEY)],
                status: 200,
                shows: "partner: product feed, plainly proxied from catalog",
            },
        ],
    ),
    (
        "Path params and rewrites (/api/users/{id} -> users /users/{id}):",
        &[
            Example {
                path: "/api/users/u-1001",
                headers: &[],
                status: 200,
                shows: "no x-client: served as web, the default client",
            },
            Example {
                path: "/api/users/u-1001",
                headers: &[("x-client", "mobile")],
                status: 200,
                shows: "mobile's own route: /users/u-1001/summary",
            },
            Example {
                path: "/api/users/u-1001/orders",
                headers: &[],
                status: 200,
                shows: "her orders: o-5002, o-5001",
            },
            Example {
                path: "/api/orders/o-5002",
                headers: &[],
                status: 200,
                shows: "line items, totals, shipping status",
            },
            Example {
                path: "/api/products/p-2001",
                headers: &[("x-api-key", PARTNER_API_KEY)],
                status: 200,
                shows: "catalog: /v1 base path + rewrite, over h2c",
            },
        ],
    ),
    (
        "Errors are JSON with a stable code:",
        &[
            Example {
                path: "/api/home",
                headers: &[("x-api-key", "wrong-key")],
                status: 401,
                shows: "401 invalid_api_key: a bad key is never served as web",
            },
            Example {
                path: "/api/users/u-1001",
                headers: &[("x-api-key", PARTNER_API_KEY)],
                status: 404,
                shows: "404 route_not_found: partners get no shopper data",
            },
            Example {
                path: "/api/products/p-9999",
                headers: &[],
                status: 404,
                shows: "404 not_found from the catalog service, passed through",
            },
        ],
    ),
];

/// Runs the demo until `shutdown` resolves: loads the config (`config`, else
/// `config/demo.toml` if it exists, else the built-in copy), starts the demo services at each
/// service's first URL, binds the proxy, prints the banner, serves, then stops everything.
///
/// Config problems come back as a [`ConfigError`] inside the `anyhow::Error`.
pub async fn run(
    config: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (mut config, origin) = load(config.as_deref())?;
    let addrs = service_addrs(&config, &origin)?;
    let services = DemoServices::start_at(&addrs).await?;
    // Port 0 in a service URL means "any port": point the proxy at the one actually bound.
    point_at(&mut config, &services);
    let proxy = Proxy::bind(&config).await.map_err(|e| {
        let hint = matches!(e, crate::server::StartError::Plugins(_)).then_some(BUILD_PLUGINS);
        let e = anyhow::Error::from(e);
        match hint {
            Some(hint) => e.context(hint),
            None => e,
        }
    })?;
    tracing::info!(
        config = %origin,
        listen = %proxy.local_addr(),
        admin = %proxy.admin_addr(),
        "demo serving"
    );
    println!(
        "{}",
        banner(proxy.local_addr(), proxy.admin_addr(), &services)
    );
    proxy.run(shutdown).await;
    services.stop().await;
    tracing::info!("demo stopped");
    Ok(())
}

/// The demo config ([`DEMO_CONFIG`]) pointed at `services` and at the example plugins built in
/// `plugins_dir`, with the data-plane and admin listeners on `127.0.0.1:0`. For tests: nothing
/// in it uses a fixed port.
pub fn config_for(services: &DemoServices, plugins_dir: &Path) -> Config {
    let mut config = Config::from_toml(DEMO_CONFIG, "built-in config/demo.toml")
        .expect("the built-in demo config is valid (checked by tests)");
    let any_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config.listen = any_port;
    config.admin.listen = any_port;
    config.plugins.dir = plugins_dir.to_path_buf();
    point_at(&mut config, services);
    config
}

/// What [`run`] prints once everything listens: the services and the curl commands to try.
pub fn banner(data: SocketAddr, admin: SocketAddr, services: &DemoServices) -> String {
    let base = format!("http://{}", reachable(data));
    let mut out = format!(
        "\nbff-proxy demo: proxy on {base} (admin http://{}); Ctrl-C stops everything.\n\
         Demo services:",
        reachable(admin)
    );
    for (name, addr) in services.addrs() {
        let _ = write!(out, " {name} {addr},");
    }
    out.pop();
    out.push('\n');
    // Each command under its own comment line: lines stay short, and a pasted block still runs.
    for (heading, examples) in EXAMPLES {
        let _ = write!(out, "\n{heading}\n");
        for e in *examples {
            let _ = writeln!(out, "  # {}\n  {}", e.shows, curl(&base, e));
        }
    }
    let admin = reachable(admin);
    let _ = write!(
        out,
        "\nReadiness: curl -s http://{admin}/readyz\n\
         Loaded plugins and their versions: curl -s http://{admin}/admin/plugins\n\
         Per-client traffic and what each client's BFF saves on the wire (after a few requests):\n  \
         curl -s http://{admin}/metrics | grep -E '^bff_(requests|response_body_bytes|upstream_response_body_bytes)_total'\n\
         Ship a new plugin version by copying its .wasm into the plugin directory: it goes live \
         without a restart (README, \"Shipping a plugin\").\n\
         Responses end with \"meta\": the service that answered and the client the proxy \
         told it about (x-bff-client).\n"
    );
    out
}

/// The curl command for one example: `-s` for successes, `-si` (show the status) for errors.
fn curl(base: &str, e: &Example) -> String {
    let mut c = format!(
        "curl -s{} {base}{}",
        if e.status >= 400 { "i" } else { "" },
        e.path
    );
    for (name, value) in e.headers {
        let _ = write!(c, " -H '{name}: {value}'");
    }
    c
}

/// An address a local curl can reach: a wildcard listener is reached over loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// Loads the config to use, and names where it came from.
fn load(path: Option<&Path>) -> Result<(Config, String), ConfigError> {
    if let Some(path) = path {
        return Ok((Config::load(path)?, path.display().to_string()));
    }
    let default = Path::new(DEMO_CONFIG_PATH);
    if default.is_file() {
        return Ok((Config::load(default)?, DEMO_CONFIG_PATH.to_owned()));
    }
    let origin = format!("built-in {DEMO_CONFIG_PATH}");
    let mut config = Config::from_toml(DEMO_CONFIG, &origin)?;
    // As if the file were where it belongs: its plugin dir is relative to `config/`.
    if let Some(parent) = default.parent() {
        config.plugins.dir = parent.join(&config.plugins.dir);
    }
    Ok((config, origin))
}

/// Where each demo service listens: the first URL of its `[services.NAME]`, which must be
/// `http://IP:PORT[/base]`. Problems are reported like any other config problem.
fn service_addrs(
    config: &Config,
    origin: &str,
) -> Result<Vec<(&'static str, SocketAddr)>, ConfigError> {
    let mut addrs = Vec::with_capacity(SERVICE_NAMES.len());
    let mut problems = Vec::new();
    for name in SERVICE_NAMES {
        let Some(url) = config.services.get(name).and_then(|s| s.urls.first()) else {
            problems.push(Problem {
                path: format!("services.{name}"),
                line_col: None,
                message: format!(
                    "the demo needs a `{name}` service (it serves {})",
                    SERVICE_NAMES.join(", ")
                ),
            });
            continue;
        };
        let addr = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority()?.as_str().parse::<SocketAddr>().ok());
        match addr {
            Some(addr) => addrs.push((name, addr)),
            None => problems.push(Problem {
                path: format!("services.{name}.urls[0]"),
                line_col: None,
                message: format!(
                    "`{url}`: the demo listens here, so it must be http://IP:PORT \
                     (like http://127.0.0.1:7101)"
                ),
            }),
        }
    }
    if problems.is_empty() {
        Ok(addrs)
    } else {
        Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }
}

/// Points each demo service's URLs at the address it actually listens on, keeping the base path.
fn point_at(config: &mut Config, services: &DemoServices) {
    for &(name, addr) in services.addrs() {
        if let Some(service) = config.services.get_mut(name) {
            let base = service
                .urls
                .first()
                .and_then(|u| u.parse::<http::Uri>().ok())
                .map(|u| u.path().trim_end_matches('/').to_owned())
                .unwrap_or_default();
            service.urls = vec![format!("http://{addr}{base}")];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_config_is_valid_and_has_every_service() {
        let config = Config::from_toml(DEMO_CONFIG, "demo").expect("valid");
        let addrs = service_addrs(&config, "demo").expect("every service has an IP:PORT URL");
        let ports: Vec<u16> = addrs.iter().map(|(_, a)| a.port()).collect();
        assert_eq!(ports, [7101, 7102, 7103, 7104]);
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:9901");
    }

    #[test]
    fn service_urls_must_be_ip_and_port() {
        let text = DEMO_CONFIG.replace("http://127.0.0.1:7102", "http://localhost:7102");
        let config = Config::from_toml(&text, "demo").expect("still a valid proxy config");
        let err = service_addrs(&config, "demo").expect_err("not an IP");
        assert_eq!(err.problems()[0].path, "services.orders.urls[0]");
    }

    #[test]
    fn curls_quote_headers_and_show_status_for_errors() {
        let base = "http://127.0.0.1:8080";
        assert_eq!(
            curl(base, &EXAMPLES[0].1[0]),
            "curl -s http://127.0.0.1:8080/api/home -H 'x-client: web'"
        );
        assert_eq!(
            curl(base, &EXAMPLES[2].1[0]),
            "curl -si http://127.0.0.1:8080/api/home -H 'x-api-key: wrong-key'"
        );
    }
}
