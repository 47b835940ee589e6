//! W3C Trace Context (`traceparent`, `tracestate`) for the request path.
//!
//! The proxy records no spans of its own to a tracing backend, so it passes a valid incoming
//! `traceparent` through unchanged: the upstream's span stays the child of the caller's, and no
//! trace gets a parent that was never exported. A request without one (or with an invalid one)
//! starts a trace: every upstream call of the request, plugin fan-out included, carries the same
//! new trace id, which the access log records next to the request id.

use http::{HeaderMap, HeaderName, HeaderValue};

pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The trace a request belongs to.
#[derive(Debug, Clone)]
pub(crate) struct TraceContext {
    /// The `traceparent` sent upstream (`00-<trace id>-<parent id>-<flags>`).
    traceparent: HeaderValue,
    /// True when it came from the client (then `tracestate` is forwarded with it).
    propagated: bool,
}

impl TraceContext {
    /// The client's trace context if its `traceparent` is valid, else a new trace.
    pub(crate) fn from_request(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(TRACEPARENT).iter();
        if let (Some(v), None) = (values.next(), values.next())
            && is_valid(v.as_bytes())
        {
            return Self {
                traceparent: v.clone(),
                propagated: true,
            };
        }
        Self::new_trace()
    }

    fn new_trace() -> Self {
        // Random ids from the v4 UUID generator already used for request ids, hex-encoded in
        // place: this runs for most requests.
        let trace = uuid::Uuid::new_v4();
        let parent = uuid::Uuid::new_v4().as_u64_pair().1.max(1).to_be_bytes();
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex::encode_to_slice(trace.as_bytes(), &mut buf[3..35]).expect("32 hex digits fit");
        hex::encode_to_slice(parent, &mut buf[36..52]).expect("16 hex digits fit");
        Self {
            traceparent: HeaderValue::from_bytes(&buf).expect("hex is a valid header value"),
            propagated: false,
        }
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
        if !self.propagated {
            headers.remove(TRACESTATE);
        }
    }
}

/// `traceparent` as W3C Trace Context level 1 defines it for version `00` (and, for later
/// versions, its first four fields): lowercase hex, neither id all zeros, version not `ff`.
fn is_valid(v: &[u8]) -> bool {
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
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
        TraceContext::from_request(&h)
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
        let a = TraceContext::from_request(&HeaderMap::new());
        let b = TraceContext::from_request(&HeaderMap::new());
        assert_ne!(a.trace_id(), b.trace_id());
        assert_eq!(a.trace_id().len(), 32);
    }
}
