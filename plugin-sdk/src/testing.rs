//! The native test harness: unit-test a plugin with plain `cargo test`, no proxy and no Wasm.
//!
//! A [`Harness`] plays the proxy's part as closely as a unit test needs: it validates the config
//! the way the proxy does at load time, builds a fresh plugin value per request, hands bodies to
//! the hooks only if the plugin declared it reads them, answers the plugin's [`send`](crate::send)s
//! with canned upstream responses, enforces the route's egress list and the per-request send
//! limit, and records what the plugin sent and logged.
//!
//! ```
//! use bff_plugin_sdk::testing::Harness;
//! use bff_plugin_sdk::{Action, Context, Error, NoConfig, Plugin, Request, Response, Call, fan_out};
//! use serde_json::json;
//!
//! struct Profile;
//! impl Plugin for Profile {
//!     type Config = NoConfig;
//!     fn new(_: NoConfig) -> Result<Self, Error> { Ok(Profile) }
//!     fn on_request(&self, ctx: &Context, _req: Request) -> Result<Action, Error> {
//!         let id = ctx.param("id").unwrap_or("me");
//!         let user = fan_out(&[Call::get("users", format!("/users/{id}"))]).remove(0)?;
//!         let name: serde_json::Value = user.json_body()?;
//!         Ok(Action::Respond(Response::json(200, &json!({"name": name["name"]}))?))
//!     }
//! }
//!
//! let mut h = Harness::<Profile>::new(json!({})).unwrap();
//! h.context(Context::new("web").with_param("id", "42"));
//! h.upstream("users", "/users/42", Response::json(200, &json!({"name": "Ada"})).unwrap());
//! let Action::Respond(resp) = h.on_request(Request::get("/profile")).unwrap() else { panic!() };
//! assert_eq!(resp.json_body::<serde_json::Value>().unwrap(), json!({"name": "Ada"}));
//! assert_eq!(h.sent()[0].0, "users");
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::rc::Rc;

use crate::types::{Action, Capabilities, Context, Error, ErrorKind, LogLevel, Request, Response};
use crate::{Plugin, effective, plugin_from_config};

/// The proxy's default limit on `send`s per request.
pub const DEFAULT_MAX_SENDS: usize = 16;

type Responder = Box<dyn Fn(&Request) -> Result<Response, Error>>;

/// A canned upstream: requests to `service` (and `path`, if given) get `respond`'s answer.
struct Upstream {
    service: String,
    path: Option<String>,
    respond: Responder,
}

/// What the harness holds while a hook runs (the proxy's per-request state).
struct MockHost {
    config: String,
    upstreams: Vec<Upstream>,
    egress: Option<Vec<String>>,
    max_sends: usize,
    sent: Vec<(String, Request)>,
    /// Sends that passed the egress check (what the proxy counts against `max_sends`).
    started: usize,
    /// Results of calls not yet waited on, by call id.
    pending: HashMap<u32, Result<Response, Error>>,
    values: BTreeMap<String, String>,
    logs: Vec<(LogLevel, String)>,
}

thread_local! {
    /// The harness whose hook is running on this thread, if any.
    static CURRENT: RefCell<Option<Rc<RefCell<MockHost>>>> = const { RefCell::new(None) };
}

/// Makes `host` the one [`crate::host`] talks to while `f` runs.
fn with_host<R>(host: &Rc<RefCell<MockHost>>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Rc<RefCell<MockHost>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.borrow_mut().replace(host.clone())));
    f()
}

/// Runs a plugin's hooks natively, the way the proxy would. See the [module docs](self).
pub struct Harness<P: Plugin> {
    capabilities: Capabilities,
    context: Context,
    host: Rc<RefCell<MockHost>>,
    plugin: PhantomData<P>,
}

impl<P: Plugin> std::fmt::Debug for Harness<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("capabilities", &self.capabilities)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl<P: Plugin> Harness<P> {
    /// Loads the plugin with `config` (what the route's chain gives it) as the proxy does at load
    /// time: an invalid config is the `Err` the proxy would refuse to start with.
    pub fn new(config: serde_json::Value) -> Result<Self, Error> {
        let config = config.to_string();
        let host = Rc::new(RefCell::new(MockHost {
            config: config.clone(),
            upstreams: Vec::new(),
            egress: None,
            max_sends: DEFAULT_MAX_SENDS,
            sent: Vec::new(),
            started: 0,
            pending: HashMap::new(),
            values: BTreeMap::new(),
            logs: Vec::new(),
        }));
        let capabilities = with_host(&host, || {
            plugin_from_config::<P>(&config).map(|p| effective(p.capabilities()))
        })?;
        Ok(Self {
            capabilities,
            context: Context::new("test"),
            host,
            plugin: PhantomData,
        })
    }

    /// What the plugin declared when it loaded.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The context the hooks get (default: client `test`, route `test`, no params).
    pub fn context(&mut self, context: Context) -> &mut Self {
        self.context = context;
        self
    }

    /// Answers `send`s to `service` whose path (the uri without its query; the whole uri if
    /// `path` has a `?`) equals `path` with `response`. Later registrations win.
    pub fn upstream(&mut self, service: &str, path: &str, response: Response) -> &mut Self {
        self.add(service, Some(path), Box::new(move |_| Ok(response.clone())))
    }

    /// Makes `send`s to `service` at `path` fail with `error` (as if the service were down or
    /// too slow: the plugin's `wait` returns it).
    pub fn upstream_error(&mut self, service: &str, path: &str, error: Error) -> &mut Self {
        self.add(service, Some(path), Box::new(move |_| Err(error.clone())))
    }

    /// Answers every `send` to `service` with `f(request)`.
    pub fn upstream_fn(
        &mut self,
        service: &str,
        f: impl Fn(&Request) -> Result<Response, Error> + 'static,
    ) -> &mut Self {
        self.add(service, None, Box::new(f))
    }

    fn add(&mut self, service: &str, path: Option<&str>, respond: Responder) -> &mut Self {
        self.host.borrow_mut().upstreams.push(Upstream {
            service: service.to_owned(),
            path: path.map(str::to_owned),
            respond,
        });
        self
    }

    /// Allows `send` only to these services, like a route's `egress` (default: any service).
    pub fn egress(&mut self, services: &[&str]) -> &mut Self {
        self.host.borrow_mut().egress = Some(services.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// The most `send`s per request (default [`DEFAULT_MAX_SENDS`], like the proxy).
    pub fn max_sends(&mut self, n: usize) -> &mut Self {
        self.host.borrow_mut().max_sends = n;
        self
    }

    /// Sets a shared value, as an earlier plugin of the chain would.
    pub fn value(&mut self, key: &str, value: &str) -> &mut Self {
        self.host
            .borrow_mut()
            .values
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Runs the request phase on a fresh plugin value. Panics if the plugin declared
    /// `response_only` (the proxy would never call it). The body is emptied first unless the
    /// plugin declared `reads_request_body`, as the proxy does.
    pub fn on_request(&self, mut request: Request) -> Result<Action, Error> {
        assert!(
            self.capabilities.handles_request,
            "the proxy never calls on_request of this plugin: its capabilities() declare \
             response_only"
        );
        if !self.capabilities.reads_request_body {
            request.body.clear();
        }
        self.run(|p| p.on_request(&self.context, request))
    }

    /// Runs the response phase on a fresh plugin value. Panics if the plugin did not declare
    /// `handles_response` (the proxy would never call it). The body is emptied first unless the
    /// plugin declared `reads_response_body`.
    pub fn on_response(&self, mut response: Response) -> Result<Response, Error> {
        assert!(
            self.capabilities.handles_response,
            "the proxy never calls on_response of this plugin: its capabilities() do not \
             declare handles_response (or reads_response_body)"
        );
        if !self.capabilities.reads_response_body {
            response.body.clear();
        }
        self.run(|p| p.on_response(&self.context, response))
    }

    /// Runs one whole request through the plugin as the only one in its chain: the request phase
    /// if the plugin handles requests, then (if it forwarded) `upstream` with the forwarded
    /// request, then the response phase if the plugin handles responses. Both phases use one
    /// plugin value, like one instance in the proxy. Returns what the client would get.
    pub fn request(
        &self,
        mut request: Request,
        upstream: impl FnOnce(Request) -> Response,
    ) -> Result<Response, Error> {
        if !self.capabilities.reads_request_body {
            request.body.clear();
        }
        self.run(|p| {
            let action = if self.capabilities.handles_request {
                p.on_request(&self.context, request)?
            } else {
                Action::Forward(request)
            };
            let response = match action {
                Action::Respond(r) => return Ok(r),
                Action::Forward(r) => upstream(r),
            };
            if !self.capabilities.handles_response {
                return Ok(response);
            }
            let kept_body = (!self.capabilities.reads_response_body).then(|| response.body.clone());
            let mut for_plugin = response;
            if kept_body.is_some() {
                for_plugin.body.clear();
            }
            let mut out = p.on_response(&self.context, for_plugin)?;
            if let Some(body) = kept_body {
                // The proxy streams the original body when the plugin did not read it.
                out.body = body;
            }
            Ok(out)
        })
    }

    /// Runs `f` as one request: a fresh plugin value, and a fresh per-request send count.
    fn run<R>(&self, f: impl FnOnce(&P) -> Result<R, Error>) -> Result<R, Error> {
        let config = {
            let mut host = self.host.borrow_mut();
            host.started = 0;
            host.pending.clear();
            host.config.clone()
        };
        with_host(&self.host, || {
            let plugin = plugin_from_config::<P>(&config)?;
            f(&plugin)
        })
    }

    /// Every `send` so far (allowed or not), in order: `(service, request)`.
    pub fn sent(&self) -> Vec<(String, Request)> {
        self.host.borrow().sent.clone()
    }

    /// Every log line so far, in order.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.host.borrow().logs.clone()
    }

    /// The shared values now.
    pub fn values(&self) -> BTreeMap<String, String> {
        self.host.borrow().values.clone()
    }

    /// Forgets recorded sends, logs and values (canned upstreams stay).
    pub fn reset(&mut self) -> &mut Self {
        let mut host = self.host.borrow_mut();
        host.sent.clear();
        host.started = 0;
        host.logs.clear();
        host.values.clear();
        host.pending.clear();
        drop(host);
        self
    }
}

/// The limits the proxy puts on shared values.
const MAX_VALUE_BYTES: usize = 4096;
const MAX_VALUES: usize = 64;

/// [`crate::host`] in a native build: the running [`Harness`], or nothing.
pub(crate) mod backend {
    use super::*;

    const NO_HOST: &str =
        "no proxy here: in a native build, run hooks through bff_plugin_sdk::testing::Harness";

    fn current() -> Option<Rc<RefCell<MockHost>>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    pub(crate) fn log(level: LogLevel, message: &str) {
        match current() {
            Some(h) => h.borrow_mut().logs.push((level, message.to_owned())),
            None => eprintln!("[{level:?}] {message}"),
        }
    }

    pub(crate) fn config() -> String {
        current().map_or_else(|| "{}".to_owned(), |h| h.borrow().config.clone())
    }

    pub(crate) fn send(
        service: &str,
        request: &Request,
        _timeout_ms: Option<u32>,
    ) -> Result<u32, Error> {
        let host = current().ok_or_else(|| Error::internal(NO_HOST))?;
        let mut host = host.borrow_mut();
        host.sent.push((service.to_owned(), request.clone()));
        if let Some(egress) = &host.egress
            && !egress.iter().any(|s| s == service)
        {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!("this route does not allow calling service `{service}`"),
            ));
        }
        if host.started >= host.max_sends {
            return Err(Error::new(
                ErrorKind::Limit,
                format!("at most {} upstream calls per request", host.max_sends),
            ));
        }
        if !request.uri.starts_with('/') {
            return Err(Error::bad_input(format!(
                "the uri must be a path starting with `/`, got `{}`",
                request.uri
            )));
        }
        host.started += 1;
        let matches = |u: &&Upstream| {
            u.service == service
                && u.path.as_deref().is_none_or(|p| {
                    if p.contains('?') {
                        p == request.uri
                    } else {
                        p == request.path()
                    }
                })
        };
        let result = match host.upstreams.iter().rev().find(matches) {
            Some(u) => (u.respond)(request),
            None => Err(Error::upstream(format!(
                "no canned response for {} {} on service `{service}` (add one with Harness::upstream)",
                request.method, request.uri
            ))),
        };
        let id = u32::try_from(host.sent.len() - 1).unwrap_or(u32::MAX);
        host.pending.insert(id, result);
        Ok(id)
    }

    pub(crate) fn wait(id: u32) -> Result<Response, Error> {
        let host = current().ok_or_else(|| Error::internal(NO_HOST))?;
        let result = host.borrow_mut().pending.remove(&id);
        result.unwrap_or_else(|| {
            Err(Error::bad_input(format!(
                "call id {id} is unknown or was already waited on"
            )))
        })
    }

    pub(crate) fn get_value(key: &str) -> Option<String> {
        current().and_then(|h| h.borrow().values.get(key).cloned())
    }

    pub(crate) fn set_value(key: &str, value: &str) -> Result<(), Error> {
        let host = current().ok_or_else(|| Error::internal(NO_HOST))?;
        let mut host = host.borrow_mut();
        if key.len() + value.len() > MAX_VALUE_BYTES {
            return Err(Error::new(
                ErrorKind::Limit,
                format!("key and value together must be at most {MAX_VALUE_BYTES} bytes"),
            ));
        }
        if host.values.len() >= MAX_VALUES && !host.values.contains_key(key) {
            return Err(Error::new(
                ErrorKind::Limit,
                format!("at most {MAX_VALUES} values per request"),
            ));
        }
        host.values.insert(key.to_owned(), value.to_owned());
        Ok(())
    }
}
