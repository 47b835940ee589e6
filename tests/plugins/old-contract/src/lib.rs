//! `old-contract`: a plugin built against `bff:plugin@0.1.0` (the contract before
//! `handles-request`), which the host must refuse at load time with an error naming both
//! versions.

wit_bindgen::generate!({ path: "wit", world: "plugin" });

use bff::plugin::types::{Action, Capabilities, Context, PluginError, Request, Response};

struct Old;

impl exports::bff::plugin::hooks::Guest for Old {
    fn init(_config: String) -> Result<Capabilities, PluginError> {
        Ok(Capabilities {
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

export!(Old);
