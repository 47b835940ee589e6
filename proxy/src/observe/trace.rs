//! W3C Trace Context (`traceparent`, `tracestate`) for the request path.
//!
//! Without `[tracing]` the proxy records no spans of its own, so it passes a valid incoming
//! `traceparent` through unchanged: the upstream's span stays the child of the caller's, and no
//! trace gets a parent that was never exported. With it, the request's span ([`super::otel`])
//! is [adopted](TraceContext::adopt): upstream calls carry its ids instead. A request without one (or with an invalid one)
//! starts a trace: every upstream call of the request, plugin fan-out included, carries the same
//! new trace id, which the access log records next to the request id (when the proxy generated
//! the request id, the new trace id is that same value).

use http::{HeaderMap, HeaderName, HeaderValue};

pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The trace a request belongs to.
#[derive(Debug, Clone)]
pub(crate) struct TraceContext {
    /// The `traceparent` sent upstream (`00-<trace id>-<parent id>-<flags>`).
    traceparent: HeaderValue,
    /// The client sent a `tracestate` that must not go upstream (it belongs to a trace
    /// context we did not accept).
    strip_tracestate: bool,
    /// The `traceparent` is the client's.
    from_client: bool,
}

impl TraceContext {
    /// The client's trace context if its `traceparent` is valid, else a new trace. When the
    /// proxy generated the request id (`generated_id`: 32 random lowercase hex digits), the new
    /// trace id is that same value, so the two correlate at a glance and no more randomness
    /// is drawn.
    pub(crate) fn from_request(headers: &HeaderMap, generated_id: Option<&HeaderValue>) -> Self {
        let mut values = headers.get_all(TRACEPARENT).iter();
        if let (Some(v), None) = (values.next(), values.next())
            && is_valid(v.as_bytes())
        {
            return Self {
                traceparent: v.clone(),
                strip_tracestate: false,
                from_client: true,
            };
        }
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        match generated_id.map(HeaderValue::as_bytes) {
            Some(id) if id.len() == 32 && id.iter().any(|&c| c != b'0') => {
                buf[3..35].copy_from_slice(id);
            }
            _ => hex::encode_to_slice(uuid::Uuid::new_v4().as_bytes(), &mut buf[3..35])
                .expect("32 hex digits fit"),
        }
        // The parent id only has to be a valid, non-zero id (nothing exports a span by it):
        // the trace id's second half, mixed.
        let mut half = [0u8; 8];
        half.copy_from_slice(&buf[27..35]);
        let parent = splitmix64(u64::from_le_bytes(half)).max(1);
        hex::encode_to_slice(parent.to_be_bytes(), &mut buf[36..52]).expect("16 hex digits fit");
        Self {
            traceparent: HeaderValue::from_bytes(&buf).expect("hex is a valid header value"),
            strip_tracestate: headers.contains_key(TRACESTATE),
            from_client: false,
        }
    }

    /// The client's `traceparent`, if it sent a valid one: the parent of the request's span.
    pub(crate) fn client_traceparent(&self) -> Option<&HeaderValue> {
        self.from_client.then_some(&self.traceparent)
    }

    /// Makes the request's own span (`traceparent` for it) the parent of its upstream calls.
    pub(crate) fn adopt(&mut self, traceparent: HeaderValue) {
        self.traceparent = traceparent;
    }

    /// The 32-hex trace id.
    pub(crate) fn trace_id(&self) -> &str {
        self.traceparent
            .to_str()
            .ok()
            .and_then(|s| s.get(3..35))
            .unwrap_or_default()
    }

    /// The `traceparent` value upstream calls carry.
    pub(crate) fn traceparent(&self) -> &HeaderValue {
        &self.traceparent
    }

    /// Sets the trace headers of an upstream request: ours for `traceparent`; the client's
    /// `tracestate` only with the client's own `traceparent`.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent.clone());
        if self.strip_tracestate {
            headers.remove(TRACESTATE);
        }
    }
}

fn is_lower_hex(s: &[u8]) -> bool {
    s.iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// A 64-bit mix (splitmix64's finalizer): spreads the trace id's low bits into a parent id.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `traceparent` as W3C Trace Context level 1 defines it for version `00` (and, for later
/// versions, its first four fields): lowercase hex, neither id all zeros, version not `ff`.
fn is_valid(v: &[u8]) -> bool {
    let hex = is_lower_hex;
    let zeros = |s: &[u8]| s.iter().all(|&c| c == b'0');
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return false;
    }
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    let rest_ok = match version {
        b"00" => v.len() == 55,
        _ => v.len() == 55 || v[55] == b'-',
    };
    hex(version)
        && version != b"ff"
        && hex(trace)
        && !zeros(trace)
        && hex(parent)
        && !zeros(parent)
        && hex(flags)
        && rest_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn ctx(v: &str) -> TraceContext {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_str(v).expect("value"));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
        TraceContext::from_request(&h, None)
    }

    #[test]
    fn valid_traceparent_passes_through() {
        let c = ctx(VALID);
        assert_eq!(c.traceparent(), VALID);
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut h = HeaderMap::new();
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
        c.apply(&mut h);
        assert_eq!(h[TRACESTATE], "vendor=1");
    }

    #[test]
    fn invalid_traceparent_starts_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let c = ctx(bad);
            assert_ne!(c.traceparent(), bad);
            assert!(
                is_valid(c.traceparent().as_bytes()),
                "{:?}",
                c.traceparent()
            );
            let mut h = HeaderMap::new();
            h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
            c.apply(&mut h);
            assert!(h.get(TRACESTATE).is_none());
        }
        // A future version may append fields.
        assert!(is_valid(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"
        ));
    }

    #[test]
    fn new_traces_differ() {
        let a = TraceContext::from_request(&HeaderMap::new(), None);
        let b = TraceContext::from_request(&HeaderMap::new(), None);
        assert_ne!(a.trace_id(), b.trace_id());
        assert_eq!(a.trace_id().len(), 32);
        assert!(is_valid(a.traceparent().as_bytes()));
    }

    #[test]
    fn a_generated_request_id_is_the_new_trace_id() {
        let id = HeaderValue::from_static("0af7651916cd43dd8448eb211c80319c");
        let c = TraceContext::from_request(&HeaderMap::new(), Some(&id));
        assert_eq!(c.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert!(
            is_valid(c.traceparent().as_bytes()),
            "{:?}",
            c.traceparent()
        );
        let zeros = HeaderValue::from_static("00000000000000000000000000000000");
        let c = TraceContext::from_request(&HeaderMap::new(), Some(&zeros));
        assert_ne!(c.trace_id(), "00000000000000000000000000000000");
        assert!(is_valid(c.traceparent().as_bytes()));
    }
}
