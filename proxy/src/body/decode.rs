//! Reading a whole body for a plugin, decoded (request path: the response phase of a plugin
//! that reads the upstream's body, and the response to a plugin's `send`).
//!
//! The chain asks the upstream for `accept-encoding: identity` when a plugin reads the body,
//! and a plugin's `send` without its own `accept-encoding` accepts any coding (RFC 9110,
//! 12.5.3). An upstream may still encode: a store serving objects saved compressed, a server
//! that compresses whatever it is asked. Such a body is decoded here (`gzip`, `x-gzip`,
//! `deflate`, `br`, `zstd`, in the order they were applied) so the plugin sees what the upstream
//! meant; a coding the proxy cannot decode, or a body that does not decode, is an error the
//! caller reports. The limit applies to the encoded and to the decoded size, so a small body
//! that inflates beyond it (a decompression bomb) stops at the limit.

use std::io::Read;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::BodyExt;

/// The codings [`read_decoded`] undoes, as an `accept-encoding` value.
pub(crate) const DECODED_CODINGS: &str = "gzip, deflate, br, zstd";

/// Bodies whose encoded size is above this are decoded on the blocking pool, not the thread
/// serving requests (a MiB of gzip takes a few ms).
const INLINE_DECODE_BYTES: usize = 64 * 1024;

/// zstd frames may ask for a window up to this (2^23 = 8 MiB, what RFC 8878 has HTTP
/// decoders support), so a frame cannot make the decoder reserve more.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Why a body could not be read for a plugin.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// Larger than the limit, encoded or decoded.
    #[error("larger than the limit")]
    TooLarge,
    /// Encoded with a coding the proxy does not decode (the header's value).
    #[error("encoded as `{0}`, which the proxy does not decode")]
    Unsupported(String),
    /// The stream broke, or the bytes are not valid for their coding.
    #[error("broken: {0}")]
    Broken(String),
}

/// A content coding the proxy decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

/// The codings of a `content-encoding` value, in the order they were applied (`identity`
/// and empty items dropped).
fn codings(value: &HeaderValue) -> Result<Vec<Coding>, ReadError> {
    let unsupported = || ReadError::Unsupported(String::from_utf8_lossy(value.as_bytes()).into());
    let text = value.to_str().map_err(|_| unsupported())?;
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim) {
        match item.to_ascii_lowercase().as_str() {
            "" | "identity" => {}
            "gzip" | "x-gzip" => out.push(Coding::Gzip),
            "deflate" => out.push(Coding::Deflate),
            "br" => out.push(Coding::Brotli),
            "zstd" => out.push(Coding::Zstd),
            _ => return Err(unsupported()),
        }
    }
    Ok(out)
}

/// Reads `body` whole, at most `limit` bytes, decoded as its `content-encoding` in `headers`
/// says. When it decoded, it drops `content-encoding` and `content-length` from `headers`: they
/// described the encoded body.
pub(crate) async fn read_decoded<B>(
    body: B,
    headers: &mut HeaderMap,
    limit: usize,
) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<super::BoxError>,
{
    // Checked before reading, so a coding the proxy cannot decode costs no transfer.
    let codings = match headers.get(header::CONTENT_ENCODING) {
        Some(value) => codings(value)?,
        None => Vec::new(),
    };
    let raw = read_whole(body, limit).await?;
    if codings.is_empty() {
        return Ok(raw);
    }
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    // No body (a HEAD answer, a 204 or 304 that still names its coding): nothing to decode,
    // and an empty stream is not a valid one in most codings.
    if raw.is_empty() {
        return Ok(raw);
    }
    let decoded = if raw.len() <= INLINE_DECODE_BYTES {
        decode_all(&raw, &codings, limit)?
    } else {
        tokio::task::spawn_blocking(move || decode_all(&raw, &codings, limit))
            .await
            .map_err(|e| ReadError::Broken(e.to_string()))??
    };
    Ok(decoded.into())
}

/// Reads `body` whole, at most `limit` bytes, as it is (no decoding).
pub(crate) async fn read_whole<B>(body: B, limit: usize) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<super::BoxError>,
{
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ReadError::TooLarge
            } else {
                ReadError::Broken(e.to_string())
            }
        })
}

/// Undoes `codings` (applied in this order) on `bytes`, each step at most `limit` bytes.
fn decode_all(bytes: &[u8], codings: &[Coding], limit: usize) -> Result<Vec<u8>, ReadError> {
    let mut current: Option<Vec<u8>> = None;
    for &coding in codings.iter().rev() {
        current = Some(decode(current.as_deref().unwrap_or(bytes), coding, limit)?);
    }
    Ok(current.unwrap_or_else(|| bytes.to_vec()))
}

/// Undoes one coding, reading at most `limit` bytes of output.
fn decode(input: &[u8], coding: Coding, limit: usize) -> Result<Vec<u8>, ReadError> {
    let broken = |e: std::io::Error| ReadError::Broken(format!("{coding:?}: {e}").to_lowercase());
    match coding {
        Coding::Gzip => read_limited(flate2::read::MultiGzDecoder::new(input), limit),
        // HTTP's `deflate` is the zlib format; some servers send raw deflate instead.
        Coding::Deflate if is_zlib_header(input) => {
            read_limited(flate2::read::ZlibDecoder::new(input), limit)
        }
        Coding::Deflate => read_limited(flate2::read::DeflateDecoder::new(input), limit),
        Coding::Brotli => read_limited(brotli_decompressor::Decompressor::new(input, 4096), limit),
        Coding::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(input).map_err(broken)?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(broken)?;
            read_limited(decoder, limit)
        }
    }
    .map_err(|e| match e {
        Limited::TooLarge => ReadError::TooLarge,
        Limited::Io(e) => broken(e),
    })
}

/// Whether `input` starts with a zlib header (RFC 1950: deflate method, check bits).
fn is_zlib_header(input: &[u8]) -> bool {
    match input {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

enum Limited {
    TooLarge,
    Io(std::io::Error),
}

/// Reads `reader` to its end, or fails as soon as it yields more than `limit` bytes.
fn read_limited(reader: impl Read, limit: usize) -> Result<Vec<u8>, Limited> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(Limited::Io)?;
    if out.len() > limit {
        return Err(Limited::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const DOC: &[u8] =
        br#"{"name":"ada","langs":["en","fr"],"pad":"aaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).expect("in memory");
        e.finish().expect("in memory")
    }

    /// Reads `body` labelled with `encoding`; returns the bytes and whether the headers say it
    /// was decoded (no `content-encoding` left, and no stale `content-length`).
    async fn read(
        body: Vec<u8>,
        encoding: Option<&str>,
        limit: usize,
    ) -> Result<(Bytes, bool), ReadError> {
        let mut headers = HeaderMap::new();
        if let Some(coding) = encoding {
            headers.insert(header::CONTENT_ENCODING, coding.parse().expect("valid"));
            headers.insert(header::CONTENT_LENGTH, body.len().into());
        }
        let bytes = read_decoded(
            http_body_util::Full::new(Bytes::from(body)),
            &mut headers,
            limit,
        )
        .await?;
        let decoded = !headers.contains_key(header::CONTENT_ENCODING);
        assert_eq!(decoded, !headers.contains_key(header::CONTENT_LENGTH));
        Ok((bytes, encoding.is_some() && decoded))
    }

    /// `DOC` compressed by Python's `brotli.compress` (the crate only decodes).
    const DOC_BR: &[u8] = &[
        0x1b, 0x46, 0x00, 0xf8, 0x8d, 0xd3, 0x15, 0xf3, 0x23, 0x84, 0x75, 0x8f, 0xf8, 0xf7, 0x96,
        0xfa, 0xd5, 0x2a, 0xbd, 0xed, 0xa3, 0x98, 0x19, 0x51, 0xb3, 0xe8, 0x74, 0xf5, 0x2d, 0x49,
        0xc8, 0x2a, 0x04, 0x9e, 0xf0, 0x2d, 0x95, 0x54, 0xb0, 0xb2, 0xe7, 0x53, 0xd3, 0x37, 0xc6,
        0x35, 0x4e, 0x4a, 0x82, 0x03,
    ];

    /// 4 MiB of `a`, brotli-compressed to 14 bytes (`brotli.compress(b"a" * (4 << 20))`).
    const BOMB_BR: &[u8] = &[
        0x9b, 0xff, 0xff, 0x3f, 0xf8, 0x25, 0xc2, 0xe2, 0xb1, 0x40, 0x20, 0xf7, 0xfe, 0x07,
    ];

    #[tokio::test]
    async fn each_coding_decodes_and_stacked_ones_in_reverse() {
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(DOC).expect("in memory");
        let zlib = zlib.finish().expect("in memory");
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(DOC).expect("in memory");
        let raw = raw.finish().expect("in memory");
        let zstd = zstd::encode_all(DOC, 3).expect("in memory");
        let cases = [
            (gzip(DOC), "gzip"),
            (gzip(DOC), "X-Gzip"),
            (zlib, "deflate"),
            (raw, "deflate"),
            (zstd.clone(), "zstd"),
            (DOC_BR.to_vec(), "br"),
            (gzip(DOC_BR), "br, gzip"),
            (gzip(&zstd), "zstd, gzip"),
            (DOC.to_vec(), "identity"),
        ];
        for (body, coding) in cases {
            let (bytes, decoded) = read(body, Some(coding), 1 << 20).await.expect(coding);
            assert_eq!(&bytes[..], DOC, "{coding}");
            assert_eq!(decoded, coding != "identity", "{coding}");
        }
        let (bytes, decoded) = read(DOC.to_vec(), None, 1 << 20).await.expect("plain");
        assert_eq!((&bytes[..], decoded), (DOC, false));
        for coding in ["gzip", "deflate", "br", "zstd"] {
            let (bytes, _) = read(Vec::new(), Some(coding), 1 << 20)
                .await
                .expect("an empty body decodes to nothing");
            assert!(bytes.is_empty(), "{coding}");
        }
    }

    #[tokio::test]
    async fn the_limit_holds_before_and_after_decoding() {
        // 4 MiB of zeros gzip to a few KiB: the decoded size is what stops it.
        let bomb = gzip(&vec![0; 4 << 20]);
        assert!(bomb.len() < 64 * 1024);
        assert!(matches!(
            read(bomb, Some("gzip"), 1 << 20).await,
            Err(ReadError::TooLarge)
        ));
        assert!(matches!(
            read(BOMB_BR.to_vec(), Some("br"), 1 << 20).await,
            Err(ReadError::TooLarge)
        ));
        assert!(matches!(
            read(vec![b'x'; 2048], None, 1024).await,
            Err(ReadError::TooLarge)
        ));
        // Exactly the limit is fine.
        let (bytes, _) = read(gzip(&[7; 1024]), Some("gzip"), 1024)
            .await
            .expect("at the limit");
        assert_eq!(bytes.len(), 1024);
    }

    #[tokio::test]
    async fn unknown_codings_and_broken_bodies_are_errors() {
        let err = read(DOC.to_vec(), Some("compress"), 1 << 20)
            .await
            .expect_err("compress is not decoded");
        assert_eq!(
            err.to_string(),
            "encoded as `compress`, which the proxy does not decode"
        );
        let err = read(DOC.to_vec(), Some("gzip"), 1 << 20)
            .await
            .expect_err("not gzip");
        assert!(matches!(err, ReadError::Broken(_)), "{err}");
        let mut cut = gzip(DOC);
        cut.truncate(cut.len() / 2);
        let err = read(cut, Some("gzip"), 1 << 20)
            .await
            .expect_err("truncated");
        assert!(matches!(err, ReadError::Broken(_)), "{err}");
    }

    #[tokio::test]
    async fn big_bodies_decode_off_the_serving_thread_alike() {
        let text: Vec<u8> = (0..400_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let body = gzip(&text);
        assert!(body.len() > INLINE_DECODE_BYTES);
        let (bytes, decoded) = read(body, Some("gzip"), 4 << 20).await.expect("decodes");
        assert!(decoded);
        assert_eq!(&bytes[..], &text[..]);
    }
}
