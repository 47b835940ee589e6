//! The body type that flows through the proxy in both directions: a boxed stream, so upstream
//! bodies, limited client bodies and small JSON error bodies share one type without buffering.
//! `decode` reads a whole body for a plugin, undoing the content codings an upstream applied.

pub(crate) mod decode;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// Errors a body stream can end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed HTTP body.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete, in-memory body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose errors convert to [`BoxError`].
pub(crate) fn stream<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
