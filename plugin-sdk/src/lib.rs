//! # bff-plugin-sdk
//!
//! Write bff-proxy plugins in Rust: implement [`Plugin`], call [`export!`], build for
//! `wasm32-wasip2`, and drop the `.wasm` file into the proxy's plugin directory.
//!
//! A plugin sits in a route's **chain**. For each request the proxy makes a fresh instance of
//! every plugin in the chain, calls [`Plugin::on_request`] in chain order (each one may change
//! the request, or answer it and skip the rest of the chain and the upstream), sends the request
//! upstream, then calls [`Plugin::on_response`] in reverse order. A plugin can call upstream
//! services itself ([`send`], [`fan_out`]), share small values with the other plugins of the
//! request ([`set_value`], [`get_value`]) and log ([`info!`] and friends).
//!
//! ```
//! use bff_plugin_sdk::{Action, Capabilities, Context, Error, Plugin, Request, Response};
//! use serde::Deserialize;
//!
//! /// Adds a header to every request and removes one from every response.
//! struct Tag { value: String }
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct TagConfig { value: String }
//!
//! impl Plugin for Tag {
//!     type Config = TagConfig;
//!
//!     // Runs when the proxy loads the plugin (a bad config stops the load), then once per
//!     // instance: per request, unless the use reuses instances.
//!     fn new(config: TagConfig) -> Result<Self, Error> {
//!         if config.value.is_empty() {
//!             return Err(Error::invalid_config("`value` must not be empty"));
//!         }
//!         Ok(Tag { value: config.value })
//!     }
//!
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities::NONE.handles_response() // headers only: no body is buffered
//!     }
//!
//!     fn on_request(&self, ctx: &Context, mut request: Request) -> Result<Action, Error> {
//!         request.headers.set("x-tag", format!("{}-{}", self.value, ctx.client));
//!         Ok(Action::Forward(request))
//!     }
//!
//!     fn on_response(&self, _ctx: &Context, mut response: Response) -> Result<Response, Error> {
//!         response.headers.remove("server");
//!         Ok(response)
//!     }
//! }
//!
//! bff_plugin_sdk::export!(Tag);
//! ```
//!
//! Unit-test plugins natively with [`testing::Harness`]; reshape JSON with [`json`]. The crate's
//! README walks through writing, testing, building and deploying a plugin.
//!
//! This crate also owns the contract between the proxy and its plugins, the WIT package in
//! `wit/` ([`WIT`]); the proxy's host bindings are generated from the same files.
#![deny(missing_docs)]

extern crate self as bff_plugin_sdk;

#[cfg(any(test, all(target_family = "wasm", feature = "allocator")))]
mod alloc;
mod host;
pub mod json;
pub mod template;
mod types;

#[cfg(target_family = "wasm")]
mod guest;

/// Every plugin built with the SDK allocates with [`alloc`]'s heap, made for one-request
/// instances (disable the default `allocator` feature to bring another).
#[cfg(all(target_family = "wasm", feature = "allocator"))]
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator::new();

#[cfg(not(target_family = "wasm"))]
pub mod testing;

use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use crate::host::{
    Call, Pending, config_json, fan_out, get_value, log, send, send_with_timeout, set_value,
};
pub use crate::types::{
    Action, Capabilities, Context, Error, ErrorKind, Headers, LogLevel, Request, Response,
};

/// The WIT package this SDK implements (`bff:plugin@CONTRACT_VERSION`).
pub const CONTRACT_PACKAGE: &str = "bff:plugin";

/// The contract version. The host rejects plugins built against another major version.
pub const CONTRACT_VERSION: &str = "0.2.0";

/// The WIT source of the contract, for tools that want to show or check it.
pub const WIT: &str = include_str!("../wit/plugin.wit");

/// A plugin: its config type, what it needs, and its hooks. Every hook has a default, so a plugin
/// implements only what it uses.
///
/// The proxy builds the plugin value with [`Plugin::new`] when it loads the plugin (to validate
/// the config and learn the [`capabilities`](Plugin::capabilities)), and again on every fresh
/// instance: by default one per request, so nothing of one request can leak into another. Keep
/// `new` cheap. An operator may let a use reuse instances (`instances = "reused"`): the value
/// then serves request after request, so keep no request data in it (or in statics) between
/// hooks.
pub trait Plugin: Sized + 'static {
    /// The plugin's config: what the route's chain gives it (`config = { ... }` in the proxy
    /// config), deserialized from JSON. Use [`NoConfig`] for none. Errors name the field.
    type Config: DeserializeOwned;

    /// Builds the plugin from its config. Return [`Error::invalid_config`] for a config that
    /// parses but makes no sense: the proxy then refuses to load it and says why.
    fn new(config: Self::Config) -> Result<Self, Error>;

    /// What the plugin needs from the proxy. Default: only `on_request`, without the request body.
    /// Declare [`Capabilities::handles_response`] (or `reads_response_body`) for `on_response`
    /// to be called at all, and [`Capabilities::response_only`] if `on_request` need not be.
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }

    /// The request phase, in chain order (not called if the plugin declared
    /// [`Capabilities::response_only`]). Return [`Action::Forward`] to pass the (possibly
    /// changed) request on, or [`Action::Respond`] to answer now. Default: forward unchanged.
    ///
    /// ```
    /// # use bff_plugin_sdk::*;
    /// # struct P;
    /// # impl Plugin for P { type Config = NoConfig; fn new(_: NoConfig) -> Result<Self, Error> { Ok(P) }
    /// fn on_request(&self, ctx: &Context, request: Request) -> Result<Action, Error> {
    ///     if ctx.client == "kiosk" && request.method != "GET" {
    ///         return Ok(Action::Respond(Response::json(403, &serde_json::json!({"error": "read_only"}))?));
    ///     }
    ///     Ok(Action::Forward(request))
    /// }
    /// # }
    /// ```
    fn on_request(&self, ctx: &Context, request: Request) -> Result<Action, Error> {
        let _ = ctx;
        Ok(Action::Forward(request))
    }

    /// The response phase, in reverse chain order; called only if
    /// [`capabilities`](Plugin::capabilities) declares it. Default: unchanged.
    ///
    /// ```
    /// # use bff_plugin_sdk::*;
    /// # struct P;
    /// # impl Plugin for P { type Config = NoConfig; fn new(_: NoConfig) -> Result<Self, Error> { Ok(P) }
    /// # fn capabilities(&self) -> Capabilities { Capabilities::NONE.reads_response_body() }
    /// fn on_response(&self, _ctx: &Context, mut response: Response) -> Result<Response, Error> {
    ///     let mut doc: serde_json::Value = response.json_body()?;
    ///     if let Some(o) = doc.as_object_mut() { o.remove("internal_debug"); }
    ///     response.set_json(&doc)?;
    ///     Ok(response)
    /// }
    /// # }
    /// ```
    fn on_response(&self, ctx: &Context, response: Response) -> Result<Response, Error> {
        let _ = ctx;
        Ok(response)
    }
}

/// The config of a plugin that takes none: only `{}` (or no `config` at all) is accepted, so
/// a typo in the proxy config is reported instead of silently ignored.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Builds a `P` from its config as JSON text, naming the field in a deserialization error.
fn plugin_from_config<P: Plugin>(json: &str) -> Result<P, Error> {
    // Runs on every fresh instance (by default one per request): the plain parse first, and
    // only if it fails the slower one that tracks the path for the error message.
    if let Ok(config) = serde_json::from_str(json) {
        return P::new(config);
    }
    let de = &mut serde_json::Deserializer::from_str(json);
    let config = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Error::invalid_config(inner.to_string())
        } else {
            Error::invalid_config(format!("{path}: {inner}"))
        }
    })?;
    P::new(config)
}

/// The capabilities as the proxy should see them: reading a body implies handling that phase.
fn effective(mut c: Capabilities) -> Capabilities {
    c.handles_request |= c.reads_request_body;
    c.handles_response |= c.reads_response_body;
    c
}

/// Exports a [`Plugin`] type as the component's `hooks`. Call it once, at the crate root of the
/// plugin (a `cdylib` built for `wasm32-wasip2`). In a native build (tests) it expands to nothing
/// but a check that the type is a plugin.
///
/// ```
/// # use bff_plugin_sdk::*;
/// struct Hello;
/// impl Plugin for Hello {
///     type Config = NoConfig;
///     fn new(_: NoConfig) -> Result<Self, Error> { Ok(Hello) }
/// }
/// bff_plugin_sdk::export!(Hello);
/// ```
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        const _: () = {
            fn __bff_assert_plugin<P: $crate::Plugin>() {}
            let _ = __bff_assert_plugin::<$plugin>;
        };
        #[cfg(target_family = "wasm")]
        #[allow(unsafe_code)]
        const _: () = {
            type __BffExported = $crate::__private::Exported<$plugin>;
            $crate::__private::bindings::__export_bff_plugin!(
                __BffExported with_types_in $crate::__private::bindings
            );
        };
    };
}

/// Formats a message and logs it at `trace` level: `bff_plugin_sdk::trace!("x = {}", x)`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Trace, &::std::format!($($arg)+)) };
}

/// Formats a message and logs it at `debug` level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Debug, &::std::format!($($arg)+)) };
}

/// Formats a message and logs it at `info` level.
///
/// ```
/// let count = 3;
/// bff_plugin_sdk::info!("merged {count} sections");
/// ```
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Info, &::std::format!($($arg)+)) };
}

/// Formats a message and logs it at `warn` level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Warn, &::std::format!($($arg)+)) };
}

/// Formats a message and logs it at `error` level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Error, &::std::format!($($arg)+)) };
}

/// Used by [`export!`]; not part of the API.
#[doc(hidden)]
#[cfg(target_family = "wasm")]
pub mod __private {
    pub use crate::guest::Exported;
    pub use crate::guest::bindings;
    pub use wit_bindgen;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_parses_and_declares_this_version() {
        let mut resolve = wit_parser::Resolve::default();
        let (pkg, _) = resolve
            .push_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/wit"))
            .expect("the WIT contract parses");
        let name = &resolve.packages[pkg].name;
        assert_eq!(
            format!("{}:{}", name.namespace, name.name),
            CONTRACT_PACKAGE
        );
        assert_eq!(
            name.version.as_ref().map(ToString::to_string).as_deref(),
            Some(CONTRACT_VERSION)
        );
        assert!(WIT.contains(&format!("package {CONTRACT_PACKAGE}@{CONTRACT_VERSION};")));
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[allow(dead_code)]
        calls: std::collections::BTreeMap<String, Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        timeout_ms: u32,
    }

    struct P;
    impl Plugin for P {
        type Config = Cfg;
        fn new(_: Cfg) -> Result<Self, Error> {
            Ok(P)
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = plugin_from_config::<P>(r#"{"calls": {"user": {"timeout_ms": "x"}}}"#)
            .err()
            .expect("invalid");
        assert_eq!(err.kind, ErrorKind::InvalidConfig);
        assert!(
            err.message.starts_with("calls.user.timeout_ms: "),
            "{}",
            err.message
        );
        let err = plugin_from_config::<P>(r#"{"cals": {}}"#)
            .err()
            .expect("unknown key");
        assert!(
            err.message.contains("unknown field `cals`"),
            "{}",
            err.message
        );
    }

    struct Q;
    impl Plugin for Q {
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, Error> {
            Ok(Q)
        }
    }

    #[test]
    fn no_config_accepts_only_an_empty_object() {
        assert!(plugin_from_config::<Q>("{}").is_ok());
        assert!(plugin_from_config::<Q>(r#"{"x": 1}"#).is_err());
    }

    /// Tags responses; would refuse every request, but declares it never sees them.
    struct ResponseOnly;
    impl Plugin for ResponseOnly {
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, Error> {
            Ok(ResponseOnly)
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::NONE.handles_response().response_only()
        }
        fn on_request(&self, _: &Context, _: Request) -> Result<Action, Error> {
            Err(Error::internal("on_request must not be called"))
        }
        fn on_response(&self, _: &Context, r: Response) -> Result<Response, Error> {
            Ok(r.with_header("x-seen", "1"))
        }
    }

    #[test]
    fn the_harness_skips_on_request_of_a_response_only_plugin() {
        let h = testing::Harness::<ResponseOnly>::new(serde_json::json!({})).expect("valid");
        assert!(!h.capabilities().handles_request);
        let out = h
            .request(Request::get("/x"), |_| Response::text(200, "hi"))
            .expect("the request phase is skipped");
        assert_eq!(out.headers.get("x-seen"), Some("1"));
        assert_eq!(out.body, b"hi");
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.on_request(Request::get("/x"))
        }));
        assert!(
            called.is_err(),
            "on_request of a response-only plugin panics in the harness"
        );
    }

    #[test]
    fn reading_a_body_implies_handling_its_phase() {
        let c = effective(Capabilities {
            reads_response_body: true,
            ..Capabilities::NONE
        });
        assert!(c.handles_response);
        let c = effective(Capabilities {
            handles_request: false,
            reads_request_body: true,
            ..Capabilities::NONE
        });
        assert!(c.handles_request);
    }
}
