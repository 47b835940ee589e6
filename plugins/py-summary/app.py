"""`py-summary`: a bff-proxy plugin written in Python, built with componentize-py.

It shows that the plugin contract is WIT, not Rust: any toolchain that builds a component of the
`bff:plugin` world (`plugin-sdk/wit/`) makes a plugin. This one adds a `summary` to a JSON answer:
a label from its config, the document's top-level keys, the client, and how many requests this
instance has served (always 1 with the default fresh instance per request).
"""
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

# Module state lives as long as the instance: one request, unless the use reuses instances.
_served = 0


def _invalid_config(message: str) -> Err:
    return Err(types.PluginError(types.ErrorKind.INVALID_CONFIG, message))


def _label() -> str:
    return json.loads(host.config()).get("label", "summary")


class Hooks(exports.Hooks):
    def init(self, config: str) -> types.Capabilities:
        try:
            parsed = json.loads(config)
        except ValueError as e:
            raise _invalid_config(f"not JSON: {e}")
        unknown = sorted(set(parsed) - {"label", "fail"})
        if unknown:
            raise _invalid_config(f"unknown field `{unknown[0]}`, expected `label` or `fail`")
        if not isinstance(parsed.get("label", ""), str):
            raise _invalid_config("label: must be a string")
        # Response only: the proxy creates the instance when the upstream's body is in.
        return types.Capabilities(
            handles_request=False,
            reads_request_body=False,
            reads_response_body=True,
            handles_response=True,
        )

    def on_request(self, ctx: types.Context, request: types.Request) -> types.Action:
        return types.Action_Forward(request)

    def on_response(self, ctx: types.Context, response: types.Response) -> types.Response:
        global _served
        _served += 1
        if json.loads(host.config()).get("fail"):
            raise RuntimeError("py-summary was told to fail")
        try:
            doc = json.loads(response.body)
        except ValueError:
            raise Err(types.PluginError(types.ErrorKind.BAD_INPUT, "the answer is not JSON"))
        if not isinstance(doc, dict):
            return response
        doc["summary"] = {
            "label": _label(),
            "keys": sorted(doc.keys()),
            "client": ctx.client,
            "served_by_this_instance": _served,
        }
        host.log(types.LogLevel.DEBUG, f"summarized {len(response.body)} bytes")
        response.body = json.dumps(doc, separators=(",", ":")).encode()
        response.headers = [(k, v) for k, v in response.headers if k != "content-type"]
        response.headers.append(("content-type", "application/json"))
        return response
