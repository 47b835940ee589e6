//! The values a plugin works with: requests, responses, the request's context, what a hook
//! decides, and errors. These mirror the WIT types but are plain Rust, so the same plugin code
//! runs inside the proxy and in the native test harness.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Header fields in order, names lowercase. A name may appear more than once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first value of `name` (case-insensitive).
    ///
    /// ```
    /// # use bff_plugin_sdk::Headers;
    /// let mut h = Headers::new();
    /// h.append("Accept", "application/json");
    /// assert_eq!(h.get("accept"), Some("application/json"));
    /// ```
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name` (case-insensitive), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Replaces every value of `name` with `value`.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.remove(name);
        self.append(name, value);
    }

    /// Adds a value for `name`, keeping the ones already there.
    pub fn append(&mut self, name: &str, value: impl Into<String>) {
        self.0.push((name.to_ascii_lowercase(), value.into()));
    }

    /// Removes every value of `name`; true if there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.0.len() != before
    }

    /// All fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.append(&k.into(), v);
        }
        h
    }
}

const JSON: &str = "application/json";

/// Parses `body` as JSON into `T`; a [`ErrorKind::BadInput`] error says why not.
fn parse_json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Error> {
    serde_json::from_slice(body)
        .map_err(|e| Error::bad_input(format!("{what} body is not the expected JSON: {e}")))
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::internal(format!("cannot encode JSON: {e}")))
}

/// An HTTP request: the one being proxied (request phase) or one a plugin sends upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query. In the request phase: what the upstream will get (the route's rewrite
    /// already applied). In [`send`](crate::send): a path on the named service.
    pub uri: String,
    /// Header fields.
    pub headers: Headers,
    /// Empty unless the plugin declared [`Capabilities::reads_request_body`] (the proxy then
    /// streams the original body upstream untouched when the plugin forwards an empty body).
    pub body: Vec<u8>,
}

impl Request {
    /// A request with no headers and no body.
    pub fn new(method: impl Into<String>, uri: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            uri: uri.into(),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// A `GET` request for `uri`.
    ///
    /// ```
    /// # use bff_plugin_sdk::Request;
    /// let req = Request::get("/users/42?fields=name").with_header("accept", "application/json");
    /// assert_eq!(req.path(), "/users/42");
    /// assert_eq!(req.query_param("fields").as_deref(), Some("name"));
    /// ```
    pub fn get(uri: impl Into<String>) -> Self {
        Self::new("GET", uri)
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Sets a JSON body and its `content-type` (builder style).
    pub fn with_json(mut self, value: &impl Serialize) -> Result<Self, Error> {
        self.set_json(value)?;
        Ok(self)
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.uri.split_once('?').map_or(&self.uri, |(p, _)| p)
    }

    /// The query string without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.uri.split_once('?').map(|(_, q)| q)
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        parse_json(&self.body, "request")
    }

    /// Replaces the body with `value` as JSON and sets `content-type: application/json`.
    pub fn set_json(&mut self, value: &impl Serialize) -> Result<(), Error> {
        self.body = to_json(value)?;
        self.headers.set("content-type", JSON);
        Ok(())
    }
}

/// An HTTP response: the upstream's (response phase), one a plugin answers with, or the result
/// of a [`send`](crate::send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (100-999; the proxy rejects anything else).
    pub status: u16,
    /// Header fields.
    pub headers: Headers,
    /// Empty in the response phase unless the plugin declared
    /// [`Capabilities::reads_response_body`].
    pub body: Vec<u8>,
}

impl Response {
    /// A response with no headers and no body.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// A JSON response.
    ///
    /// ```
    /// # use bff_plugin_sdk::Response;
    /// let resp = Response::json(200, &serde_json::json!({"ok": true})).unwrap();
    /// assert_eq!(resp.headers.get("content-type"), Some("application/json"));
    /// assert_eq!(resp.body, br#"{"ok":true}"#);
    /// ```
    pub fn json(status: u16, value: &impl Serialize) -> Result<Self, Error> {
        let mut resp = Self::new(status);
        resp.set_json(value)?;
        Ok(resp)
    }

    /// A `text/plain` response.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        let mut resp = Self::new(status);
        resp.headers
            .set("content-type", "text/plain; charset=utf-8");
        resp.body = text.into().into_bytes();
        resp
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.append(name, value);
        self
    }

    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON.
    pub fn json_body<T: DeserializeOwned>(&self) -> Result<T, Error> {
        parse_json(&self.body, "response")
    }

    /// Replaces the body with `value` as JSON and sets `content-type: application/json` (the
    /// proxy fixes `content-length`).
    pub fn set_json(&mut self, value: &impl Serialize) -> Result<(), Error> {
        self.body = to_json(value)?;
        self.headers.set("content-type", JSON);
        Ok(())
    }
}

/// Who the request comes from and where it was routed, as the proxy resolved it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The client's configured name (`web`, `mobile`, ...).
    pub client: String,
    /// The client's configured attributes.
    pub attributes: Vec<(String, String)>,
    /// The id of the route that matched.
    pub route: String,
    /// Values captured by the route's path pattern (`{id}` → `("id", "42")`).
    pub params: Vec<(String, String)>,
    /// The request id the proxy logs and echoes.
    pub request_id: String,
}

impl Context {
    /// A context for `client` (for tests; the proxy builds the real one).
    ///
    /// ```
    /// # use bff_plugin_sdk::Context;
    /// let ctx = Context::new("mobile").with_param("id", "u-1").with_attribute("tier", "gold");
    /// assert_eq!(ctx.param("id"), Some("u-1"));
    /// assert_eq!(ctx.attribute("tier"), Some("gold"));
    /// ```
    pub fn new(client: impl Into<String>) -> Self {
        Self {
            client: client.into(),
            route: "test".into(),
            request_id: "test-request".into(),
            ..Self::default()
        }
    }

    /// Sets the route id (builder style).
    pub fn with_route(mut self, route: impl Into<String>) -> Self {
        self.route = route.into();
        self
    }

    /// Adds a path parameter (builder style).
    pub fn with_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// Adds a client attribute (builder style).
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.push((name.into(), value.into()));
        self
    }

    /// The value of path parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        lookup(&self.params, name)
    }

    /// The value of client attribute `name`.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        lookup(&self.attributes, name)
    }
}

fn lookup<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// What the request phase decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Continue down the chain (and to the upstream) with this request.
    Forward(Request),
    /// Answer now: the rest of the chain and the upstream are skipped; the response phase runs
    /// for the plugins before this one.
    Respond(Response),
}

/// What a plugin needs from the proxy, declared once when it loads, so that bodies are buffered
/// and hooks called only when needed. Start from [`Capabilities::NONE`] (what a plugin gets by
/// default: `on_request` without the request body, no `on_response`) and add what you use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Call [`Plugin::on_request`](crate::Plugin::on_request) at all. On by default; turn it off
    /// with [`response_only`](Capabilities::response_only) in a plugin that only works on
    /// responses, so the proxy skips it in the request phase.
    pub handles_request: bool,
    /// Hand the request body to [`Plugin::on_request`](crate::Plugin::on_request) (implies
    /// `handles_request`).
    pub reads_request_body: bool,
    /// Hand the response body to [`Plugin::on_response`](crate::Plugin::on_response) (implies
    /// `handles_response`).
    pub reads_response_body: bool,
    /// Call [`Plugin::on_response`](crate::Plugin::on_response) at all.
    pub handles_response: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::NONE
    }
}

impl Capabilities {
    /// The default: only `on_request` is called, without the request body.
    pub const NONE: Self = Self {
        handles_request: true,
        reads_request_body: false,
        reads_response_body: false,
        handles_response: false,
    };

    /// Also hand the request body to `on_request`.
    pub const fn reads_request_body(mut self) -> Self {
        self.reads_request_body = true;
        self.handles_request = true;
        self
    }

    /// Call `on_response`, with the response body.
    pub const fn reads_response_body(mut self) -> Self {
        self.reads_response_body = true;
        self.handles_response = true;
        self
    }

    /// Call `on_response`, without the response body (headers and status only).
    pub const fn handles_response(mut self) -> Self {
        self.handles_response = true;
        self
    }

    /// Do not call `on_request`: the plugin only works on responses (it also declares
    /// `handles_response` or `reads_response_body`). The proxy then skips it in the request
    /// phase and creates its instance only when the response phase reaches it, which saves the
    /// request's head crossing into the plugin and back.
    ///
    /// ```
    /// # use bff_plugin_sdk::Capabilities;
    /// let trims_json = Capabilities::NONE.reads_response_body().response_only();
    /// assert!(!trims_json.handles_request && trims_json.reads_response_body);
    /// ```
    pub const fn response_only(mut self) -> Self {
        self.handles_request = false;
        self.reads_request_body = false;
        self
    }
}

/// The kind of a plugin error; the proxy logs it and maps it to its error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The plugin's config is invalid (reported when the plugin loads).
    InvalidConfig,
    /// The input was not what the plugin can handle.
    BadInput,
    /// An upstream call failed (connect, timeout, status).
    Upstream,
    /// The route does not allow calling that service.
    Forbidden,
    /// A limit was reached (sends per request, body size, ...).
    Limit,
    /// Anything else.
    Internal,
}

/// An error a hook returns, or a host call reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What went wrong.
    pub kind: ErrorKind,
    /// For the log; clients never see it.
    pub message: String,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// [`ErrorKind::InvalidConfig`].
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidConfig, message)
    }

    /// [`ErrorKind::BadInput`].
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadInput, message)
    }

    /// [`ErrorKind::Upstream`].
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Upstream, message)
    }

    /// [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {}

/// Log levels for [`log`](crate::log()) and the logging macros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Very detailed.
    Trace,
    /// For debugging.
    Debug,
    /// Normal events.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something failed.
    Error,
}

/// Decodes `%XX` escapes and `+` (as space) in a query component; invalid escapes stay as is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_case_insensitive_and_ordered() {
        let mut h: Headers = [("X-A", "1"), ("x-b", "2"), ("x-a", "3")]
            .into_iter()
            .collect();
        assert_eq!(h.get_all("x-a").collect::<Vec<_>>(), ["1", "3"]);
        h.set("X-A", "4");
        assert_eq!(h.iter().collect::<Vec<_>>(), [("x-b", "2"), ("x-a", "4")]);
        assert!(h.remove("x-b"));
        assert!(!h.remove("x-b"));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn query_params_are_decoded() {
        let r = Request::get("/s?q=trail+shoes&x=%2Fa%ZZ&flag");
        assert_eq!(r.query_param("q").as_deref(), Some("trail shoes"));
        assert_eq!(r.query_param("x").as_deref(), Some("/a%ZZ"));
        assert_eq!(r.query_param("flag").as_deref(), Some(""));
        assert_eq!(r.query_param("nope"), None);
        assert_eq!(Request::get("/s").query(), None);
    }

    #[test]
    fn json_bodies_round_trip_and_report_bad_input() {
        let mut resp = Response::new(200);
        resp.set_json(&serde_json::json!({"a": 1})).expect("ok");
        let v: serde_json::Value = resp.json_body().expect("ok");
        assert_eq!(v["a"], 1);
        resp.body = b"{".to_vec();
        let err = resp.json_body::<serde_json::Value>().expect_err("fails");
        assert_eq!(err.kind, ErrorKind::BadInput);
    }

    #[test]
    fn capabilities_builders() {
        let c = Capabilities::NONE.reads_response_body();
        assert!(c.handles_response && c.reads_response_body && !c.reads_request_body);
        assert!(
            c.handles_request,
            "on_request is called unless a plugin opts out"
        );
        assert_eq!(Capabilities::default(), Capabilities::NONE);
        let r = Capabilities::NONE.reads_request_body().response_only();
        assert!(!r.handles_request && !r.reads_request_body);
    }
}
