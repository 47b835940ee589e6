//! Path normalization, done once before routing; the upstream gets the same normalized path
//! that was routed, so a route can never be bypassed by spelling a path differently.
//!
//! Rules (RFC 3986 §6.2.2 plus the usual proxy hardening):
//! - percent-escapes of unreserved characters are decoded (`%7E` → `~`, `%2e` → `.`), other
//!   escapes are kept with uppercase hex;
//! - an escaped `/` or `\` (`%2F`, `%5C`) or an escaped NUL is rejected: it is ambiguous
//!   whether it separates segments, and backends disagree;
//! - a raw `\` is treated as `/` (what browsers do);
//! - empty segments (`//`) and `.` segments are removed and `..` removes the segment before it,
//!   never climbing above the root.

use std::borrow::Cow;

/// Why a path was refused (always a client error: `400 invalid_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("the path contains an escaped `/` or `\\`")]
    EncodedSeparator,
    #[error("the path contains an escaped NUL byte")]
    EncodedNul,
    #[error("the path contains a malformed percent-escape")]
    BadEscape,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes the path part of a request target (no query).
pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    rebuild(path).map(Cow::Owned)
}

/// [`normalize`] the long way: decode, then resolve segments (`path` starts with `/`).
fn rebuild(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    // Pass 1: decode escapes and backslashes into a byte string of segments.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (hi, lo) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(h), Some(l)) => (hex_val(*h), hex_val(*l)),
                    _ => (None, None),
                };
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadEscape);
                };
                let b = hi << 4 | lo;
                match b {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0 => return Err(PathError::EncodedNul),
                    b if is_unreserved(b) => decoded.push(b as char),
                    b => {
                        decoded.push('%');
                        decoded.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
                        decoded.push(char::from(b"0123456789ABCDEF"[usize::from(b & 0xF)]));
                    }
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            _ => {
                // Copy the run up to the next special byte in one go (keeps UTF-8 intact).
                let start = i;
                while i < bytes.len() && bytes[i] != b'%' && bytes[i] != b'\\' {
                    i += 1;
                }
                decoded.push_str(&path[start..i]);
            }
        }
    }

    // Pass 2: resolve segments.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded.split('/') {
        trailing_slash = false;
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        result.push('/');
    }
    Ok(result)
}

/// True when [`normalize`] would return the path unchanged (the common case: no allocation).
fn is_normal(bytes: &[u8]) -> bool {
    let mut prev_slash = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' | b'\\' => return false,
            b'/' => {
                if prev_slash {
                    return false;
                }
                prev_slash = true;
            }
            b'.' if prev_slash => {
                // "/." followed by end, "/" or ".": a dot segment.
                match bytes.get(i + 1) {
                    None | Some(b'/') => return false,
                    Some(b'.') if matches!(bytes.get(i + 2), None | Some(b'/')) => return false,
                    _ => prev_slash = false,
                }
            }
            _ => prev_slash = false,
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        let cases = [
            ("/", "/"),
            ("/api/home", "/api/home"),
            ("/api//home", "/api/home"),
            ("//api///home//", "/api/home/"),
            ("/api/./home", "/api/home"),
            ("/api/x/../home", "/api/home"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E/home", "/api/home"),
            ("/%7Euser/%41", "/~user/A"),
            ("/a/%c3%a9", "/a/%C3%A9"),
            ("/a\\b", "/a/b"),
            ("/a/..", "/"),
            ("/a/.", "/a/"),
            ("/a/.hidden", "/a/.hidden"),
            ("/a/..b", "/a/..b"),
            ("/é", "/é"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), Ok(want), "input {input}");
        }
    }

    #[test]
    fn rejects_ambiguous() {
        assert_eq!(normalize("/a%2fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%5cb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%00"), Err(PathError::EncodedNul));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(normalize("/api/users/42"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/a/.b/c..d"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn normalizing_is_idempotent() {
        for input in [
            "/a//b/../c/./d/",
            "/%7e/%2e%2e/x",
            "/a\\..\\b",
            "/x/%e2%82%ac",
        ] {
            let once = normalize(input).expect("valid").into_owned();
            assert_eq!(
                normalize(&once).as_deref(),
                Ok(once.as_str()),
                "input {input}"
            );
        }
    }

    /// Random paths over the characters that matter (fixed seed, so a failure reproduces): a
    /// normalized path is a fixed point, has no empty, `.` or `..` segment, no `\\`, no escaped
    /// separator or NUL and only uppercase escapes of reserved bytes; and the no-allocation fast
    /// path only passes paths the long way would leave unchanged.
    #[test]
    fn random_paths_normalize_safely() {
        const PIECES: [&str; 14] = [
            "/", "/", ".", "..", "a", "%2e", "%2E", "%2f", "%5C", "%00", "%7e", "%c3%a9", "\\", "%",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for case in 0..20_000 {
            let mut path = String::from("/");
            for _ in 0..next(10) {
                path.push_str(PIECES[next(PIECES.len())]);
            }
            if is_normal(path.as_bytes()) {
                assert_eq!(
                    rebuild(&path).as_deref(),
                    Ok(path.as_str()),
                    "case {case}: {path}"
                );
            }
            let Ok(out) = normalize(&path) else { continue };
            assert_eq!(
                normalize(&out).as_deref(),
                Ok(&*out),
                "case {case}: {path} -> {out} is not a fixed point"
            );
            let body = out.strip_prefix('/').expect("absolute");
            let segments: Vec<&str> = body.split('/').collect();
            let last = segments.len() - 1;
            for (i, seg) in segments.iter().enumerate() {
                assert!(
                    !matches!(*seg, "." | "..") && (!seg.is_empty() || i == last),
                    "case {case}: {path} -> {out}"
                );
            }
            assert!(!out.contains('\\'), "case {case}: {path} -> {out}");
            let upper = out.to_ascii_uppercase();
            for bad in ["%2F", "%5C", "%00", "%2E", "%7E"] {
                assert!(!upper.contains(bad), "case {case}: {path} -> {out}");
            }
            for (at, _) in out.match_indices('%') {
                let hex = &out.as_bytes()[at + 1..at + 3];
                assert!(
                    hex.iter()
                        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)),
                    "case {case}: {path} -> {out}"
                );
            }
        }
    }
}
