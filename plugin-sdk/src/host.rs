//! What a plugin can ask of the proxy while a hook runs: upstream calls (one, or several at
//! once), values shared with the other plugins of the request's chain, and the log.
//!
//! Inside the proxy these are the WIT `host` imports; in a native build (`cargo test`) they go to
//! the [`testing::Harness`](crate::testing::Harness) that runs the hook, so plugin code is the
//! same in both.

use std::time::Duration;

use crate::types::{Error, LogLevel, Request, Response};

#[cfg(target_family = "wasm")]
use crate::guest::backend;
#[cfg(not(target_family = "wasm"))]
use crate::testing::backend;

/// Writes `message` to the proxy's log, tagged with the plugin's name and the request id.
/// The macros [`info!`](crate::info) and friends format and call this.
pub fn log(level: LogLevel, message: &str) {
    backend::log(level, message);
}

/// This use of the plugin's config as the proxy holds it (JSON, `{}` if none). The SDK already
/// parses it into [`Plugin::Config`](crate::Plugin::Config); this is for tools that want the raw text.
pub fn config_json() -> String {
    backend::config()
}

/// An upstream call in flight, started by [`send`]. Wait for it with [`Pending::wait`]; a call
/// that is never waited on is cancelled when the request ends.
#[derive(Debug)]
#[must_use = "a call is only useful once waited on"]
pub struct Pending {
    id: u32,
}

impl Pending {
    /// Blocks the plugin until the call finishes (the proxy keeps serving other requests, and the
    /// time waited does not count against the plugin's CPU budget).
    ///
    /// Any status the service answers with is `Ok`; `Err` means no response (the service is not
    /// allowed, unreachable, too slow, or its body too large).
    pub fn wait(self) -> Result<Response, Error> {
        backend::wait(self.id)
    }
}

/// Starts a call to upstream service `service` (a name from the proxy config, which the route
/// must list in `egress`) and returns at once. `request.uri` is a path on that service.
///
/// ```no_run
/// # fn f() -> Result<(), bff_plugin_sdk::Error> {
/// use bff_plugin_sdk::{Request, send};
/// let user = send("users", &Request::get("/users/42"))?;
/// let orders = send("orders", &Request::get("/users/42/orders"))?;
/// // Both calls are in flight now.
/// let (user, orders) = (user.wait()?, orders.wait()?);
/// # Ok(()) }
/// ```
pub fn send(service: &str, request: &Request) -> Result<Pending, Error> {
    backend::send(service, request, None).map(|id| Pending { id })
}

/// Like [`send`], with a bound on the wait for the response head (the service's own timeout
/// still applies if shorter).
pub fn send_with_timeout(
    service: &str,
    request: &Request,
    timeout: Duration,
) -> Result<Pending, Error> {
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    backend::send(service, request, Some(ms)).map(|id| Pending { id })
}

/// One call for [`fan_out`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The upstream service's name.
    pub service: String,
    /// The request; `uri` is a path on the service.
    pub request: Request,
    /// Bound on the wait for the response head, if any.
    pub timeout: Option<Duration>,
}

impl Call {
    /// A call of `request` to `service`.
    pub fn new(service: impl Into<String>, request: Request) -> Self {
        Self {
            service: service.into(),
            request,
            timeout: None,
        }
    }

    /// A `GET` of `uri` on `service`.
    pub fn get(service: impl Into<String>, uri: impl Into<String>) -> Self {
        Self::new(service, Request::get(uri))
    }

    /// Sets the timeout (builder style).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// Starts every call at once, then waits for all of them: the total time is that of the slowest
/// call, not the sum. Returns one result per call, in order, so a partial failure is explicit.
///
/// ```no_run
/// use bff_plugin_sdk::{Call, fan_out};
/// let results = fan_out(&[Call::get("users", "/users/42"), Call::get("orders", "/users/42/orders")]);
/// for result in &results {
///     match result {
///         Ok(resp) if resp.is_success() => { /* use it */ }
///         Ok(resp) => { /* the service answered with an error status */ }
///         Err(e) => { /* no response: e.kind says why */ }
///     }
/// }
/// ```
pub fn fan_out(calls: &[Call]) -> Vec<Result<Response, Error>> {
    let started: Vec<Result<Pending, Error>> = calls
        .iter()
        .map(|c| match c.timeout {
            Some(t) => send_with_timeout(&c.service, &c.request, t),
            None => send(&c.service, &c.request),
        })
        .collect();
    started
        .into_iter()
        .map(|p| p.and_then(Pending::wait))
        .collect()
}

/// Reads a value set earlier in this request's chain (by this plugin or another one).
pub fn get_value(key: &str) -> Option<String> {
    backend::get_value(key)
}

/// Sets a small value (key and value at most 4 KiB together, 64 per request) that later plugins
/// of the same request, and the response phase, can read with [`get_value`].
pub fn set_value(key: &str, value: &str) -> Result<(), Error> {
    backend::set_value(key, value)
}
