//! `slow-start`: a hostile plugin whose component runs code while it is instantiated, before any
//! hook is called (wit-component calls a module's `_initialize` from the component's start). Its
//! config picks what that code does: `{"start": "spin"}` loops forever, `{"start": "sleep"}`
//! blocks on the monotonic clock (using no CPU), `{"start": "sleep-on-request"}` does so only when
//! instantiated for a request (so the plugin loads), anything else returns at once. The proxy
//! must bound them, at load time and on requests, like a hook call.

wit_bindgen::generate!({ path: "../../../plugin-sdk/wit", world: "plugin" });

use bff::plugin::host;
use bff::plugin::types::{Action, Capabilities, Context, PluginError, Request, Response};

struct SlowStart;

impl exports::bff::plugin::hooks::Guest for SlowStart {
    fn init(_config: String) -> Result<Capabilities, PluginError> {
        Ok(Capabilities {
            handles_request: true,
            reads_request_body: false,
            reads_response_body: false,
            handles_response: false,
        })
    }

    fn on_request(_ctx: Context, req: Request) -> Result<Action, PluginError> {
        Ok(Action::Forward(req))
    }

    fn on_response(_ctx: Context, resp: Response) -> Result<Response, PluginError> {
        Ok(resp)
    }
}

/// Runs when the component is instantiated.
#[unsafe(export_name = "_initialize")]
pub extern "C" fn initialize() {
    let config = host::config();
    if config.contains(r#""start":"spin""#) {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
    // Values exist only on the request path: this one loads, then waits on every request.
    let on_request = host::set_value("slow-start", "started").is_ok();
    if config.contains(r#""start":"sleep""#)
        || (on_request && config.contains(r#""start":"sleep-on-request""#))
    {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

export!(SlowStart);
