//! The Wasm side of the SDK: the wit-bindgen bindings of the contract, the conversions between
//! WIT types and the SDK's, the `hooks` export for a [`Plugin`] type (used by
//! [`export!`](crate::export)), and the host backend of [`crate::host`].
//!
//! The plugin value is built from the config on the first hook call of an instance and serves
//! every later call of that instance: both phases of one request by default (a fresh instance
//! per request), or request after request for a use with `instances = "reused"`.
#![allow(unsafe_code, missing_docs, unreachable_pub)]

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;

use crate::types::{
    Action, Capabilities, Context, Error, ErrorKind, Headers, LogLevel, Request, Response,
};
use crate::{Plugin, plugin_from_config};

/// Generated from `wit/` (the same files the proxy's bindings come from).
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_bff_plugin",
        default_bindings_module: "::bff_plugin_sdk::__private::bindings",
        runtime_path: "::bff_plugin_sdk::__private::wit_bindgen::rt",
    });
}

use bindings::bff::plugin::{host as wit_host, types as wit};
use bindings::exports::bff::plugin::hooks::Guest;

/// The `hooks` export for plugin type `P`.
#[derive(Debug)]
pub struct Exported<P>(PhantomData<P>);

thread_local! {
    /// This instance's plugin value, built from the config on first use.
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Runs `f` on this instance's plugin, building it from the config the first time.
fn with_plugin<P: Plugin, R>(f: impl FnOnce(&P) -> Result<R, Error>) -> Result<R, Error> {
    INSTANCE.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            *slot = Some(Box::new(plugin_from_config::<P>(&wit_host::config())?));
        }
        let plugin = slot
            .as_ref()
            .and_then(|p| p.downcast_ref::<P>())
            .ok_or_else(|| Error::internal("one component exports one plugin type"))?;
        f(plugin)
    })
}

impl<P: Plugin> Guest for Exported<P> {
    fn init(config: String) -> Result<wit::Capabilities, wit::PluginError> {
        install_panic_hook();
        let plugin = plugin_from_config::<P>(&config).map_err(to_wit_error)?;
        Ok(capabilities_to_wit(crate::effective(plugin.capabilities())))
    }

    fn on_request(
        ctx: wit::Context,
        request: wit::Request,
    ) -> Result<wit::Action, wit::PluginError> {
        install_panic_hook();
        let ctx = context_from_wit(ctx);
        let request = request_from_wit(request);
        with_plugin::<P, _>(|p| p.on_request(&ctx, request))
            .map(|action| match action {
                Action::Forward(r) => wit::Action::Forward(request_to_wit(r)),
                Action::Respond(r) => wit::Action::Respond(response_to_wit(r)),
            })
            .map_err(to_wit_error)
    }

    fn on_response(
        ctx: wit::Context,
        response: wit::Response,
    ) -> Result<wit::Response, wit::PluginError> {
        install_panic_hook();
        let ctx = context_from_wit(ctx);
        let response = response_from_wit(response);
        with_plugin::<P, _>(|p| p.on_response(&ctx, response))
            .map(response_to_wit)
            .map_err(to_wit_error)
    }
}

/// Panics go to stderr as one `panicked at <location>:` line and the message (without the
/// default hook's backtrace hint); the proxy logs them with the plugin's name and request id and
/// answers with its `plugin_panic` error.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic payload)".to_owned());
            match info.location() {
                Some(at) => eprintln!("plugin panicked at {at}:\n{message}"),
                None => eprintln!("plugin panicked at (unknown location):\n{message}"),
            }
        }));
    });
}

fn context_from_wit(c: wit::Context) -> Context {
    Context {
        client: c.client,
        attributes: c.attributes,
        route: c.route,
        params: c.params,
        request_id: c.request_id,
    }
}

fn request_from_wit(r: wit::Request) -> Request {
    Request {
        method: r.method,
        uri: r.uri,
        headers: Headers(r.headers),
        body: r.body,
    }
}

fn request_to_wit(r: Request) -> wit::Request {
    wit::Request {
        method: r.method,
        uri: r.uri,
        headers: r.headers.0,
        body: r.body,
    }
}

fn response_from_wit(r: wit::Response) -> Response {
    Response {
        status: r.status,
        headers: Headers(r.headers),
        body: r.body,
    }
}

fn response_to_wit(r: Response) -> wit::Response {
    wit::Response {
        status: r.status,
        headers: r.headers.0,
        body: r.body,
    }
}

fn capabilities_to_wit(c: Capabilities) -> wit::Capabilities {
    wit::Capabilities {
        handles_request: c.handles_request,
        reads_request_body: c.reads_request_body,
        reads_response_body: c.reads_response_body,
        handles_response: c.handles_response,
    }
}

fn to_wit_error(e: Error) -> wit::PluginError {
    wit::PluginError {
        kind: match e.kind {
            ErrorKind::InvalidConfig => wit::ErrorKind::InvalidConfig,
            ErrorKind::BadInput => wit::ErrorKind::BadInput,
            ErrorKind::Upstream => wit::ErrorKind::Upstream,
            ErrorKind::Forbidden => wit::ErrorKind::Forbidden,
            ErrorKind::Limit => wit::ErrorKind::Limit,
            ErrorKind::Internal => wit::ErrorKind::Internal,
        },
        message: e.message,
    }
}

fn from_wit_error(e: wit::PluginError) -> Error {
    Error {
        kind: match e.kind {
            wit::ErrorKind::InvalidConfig => ErrorKind::InvalidConfig,
            wit::ErrorKind::BadInput => ErrorKind::BadInput,
            wit::ErrorKind::Upstream => ErrorKind::Upstream,
            wit::ErrorKind::Forbidden => ErrorKind::Forbidden,
            wit::ErrorKind::Limit => ErrorKind::Limit,
            wit::ErrorKind::Internal => ErrorKind::Internal,
        },
        message: e.message,
    }
}

/// [`crate::host`] on the real proxy.
pub(crate) mod backend {
    use super::*;

    pub(crate) fn log(level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => wit::LogLevel::Trace,
            LogLevel::Debug => wit::LogLevel::Debug,
            LogLevel::Info => wit::LogLevel::Info,
            LogLevel::Warn => wit::LogLevel::Warn,
            LogLevel::Error => wit::LogLevel::Error,
        };
        wit_host::log(level, message);
    }

    pub(crate) fn config() -> String {
        wit_host::config()
    }

    pub(crate) fn send(
        service: &str,
        request: &Request,
        timeout_ms: Option<u32>,
    ) -> Result<u32, Error> {
        wit_host::send(service, &request_to_wit(request.clone()), timeout_ms)
            .map_err(from_wit_error)
    }

    pub(crate) fn wait(id: u32) -> Result<Response, Error> {
        wit_host::wait(id)
            .map(response_from_wit)
            .map_err(from_wit_error)
    }

    pub(crate) fn get_value(key: &str) -> Option<String> {
        wit_host::get_value(key)
    }

    pub(crate) fn set_value(key: &str, value: &str) -> Result<(), Error> {
        wit_host::set_value(key, value).map_err(from_wit_error)
    }
}
