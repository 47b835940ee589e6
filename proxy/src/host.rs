//! Host names as a config writes them: an exact name, or `*.parent` for one label under
//! `parent`. One definition for the two places that match them: picking a TLS certificate by
//! the SNI name (`listener::tls`), and the `host` identification rule (`identity`).

use http::{HeaderMap, Uri};

/// A host name or a one-label wildcard, lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// This name (`m.shop.example`).
    Exact(String),
    /// Any one label under this parent (`*.kiosk.shop.example` is `OneLabelUnder("kiosk.shop.example")`).
    OneLabelUnder(String),
}

impl HostPattern {
    /// Parses `m.shop.example` or `*.shop.example` (any case); an error says why not.
    pub(crate) fn parse(pattern: &str) -> Result<Self, String> {
        let lower = pattern.to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(parent) => (true, parent),
            None => (false, lower.as_str()),
        };
        if rustls::pki_types::DnsName::try_from(name).is_err() || name.contains('*') {
            return Err(format!(
                "`{lower}` is not a host name, or `*.` and a host name"
            ));
        }
        Ok(if wildcard {
            Self::OneLabelUnder(name.to_owned())
        } else {
            Self::Exact(name.to_owned())
        })
    }

    /// True if `host` (any case) is this name, or one label under this parent.
    pub(crate) fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host.eq_ignore_ascii_case(name),
            Self::OneLabelUnder(parent) => host.split_once('.').is_some_and(|(label, rest)| {
                !label.is_empty() && label != "*" && rest.eq_ignore_ascii_case(parent)
            }),
        }
    }
}

/// The host a request is for: the URI's authority (HTTP/2, absolute-form), else the `host`
/// header, without the port.
pub(crate) fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let authority = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers.get(http::header::HOST)?.to_str().ok()?,
    };
    // `[::1]:8080`, `host:8080`, `host`.
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => authority,
    };
    Some(host.rsplit_once('@').map_or(host, |(_, h)| h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exactly_or_one_label_under() {
        let exact = HostPattern::parse("Shop.Example").expect("a name");
        assert!(exact.matches("shop.example"));
        assert!(exact.matches("SHOP.example"));
        assert!(!exact.matches("www.shop.example"));
        let wild = HostPattern::parse("*.kiosk.example").expect("a wildcard");
        assert!(wild.matches("a.kiosk.example"));
        assert!(wild.matches("A.Kiosk.Example"));
        for not in [
            "kiosk.example",
            "a.b.kiosk.example",
            ".kiosk.example",
            "*.kiosk.example",
        ] {
            assert!(!wild.matches(not), "{not}");
        }
        for bad in ["bad name", "*.*.example", "a.*.example", "*"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
