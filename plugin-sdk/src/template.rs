//! `{placeholder}` templates, as plugin configs use them for paths (`/users/{param.id}`) and
//! text (`Hi {user.name}.`): split once, when the plugin loads, into literal text and
//! placeholders; the plugin decides what a placeholder means.
//!
//! ```
//! use bff_plugin_sdk::template::{Part, parse};
//! assert_eq!(
//!     parse("/users/{param.id}/orders").unwrap(),
//!     [Part::Text("/users/"), Part::Placeholder("param.id"), Part::Text("/orders")]
//! );
//! assert!(parse("/users/{param.id").is_err());
//! ```

use crate::types::Error;

/// A piece of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part<'a> {
    /// Literal text.
    Text(&'a str),
    /// What is between `{` and `}`, trimmed.
    Placeholder(&'a str),
}

/// Splits `template` into text and placeholders. An unclosed `{`, a stray `}` or an empty
/// placeholder is an [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) error
/// quoting the template.
pub fn parse(template: &str) -> Result<Vec<Part<'_>>, Error> {
    let bad = |why: &str| Error::invalid_config(format!("{why} in `{template}`"));
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(bad("stray `}`"));
        }
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        let close = rest[open..].find('}').ok_or_else(|| bad("unclosed `{`"))?;
        let inner = rest[open + 1..open + close].trim();
        if inner.is_empty() || inner.contains('{') {
            return Err(bad("empty or nested `{}`"));
        }
        parts.push(Part::Placeholder(inner));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_reports_malformed_templates() {
        assert_eq!(parse("").expect("ok"), []);
        assert_eq!(
            parse("{ a }{b}c").expect("ok"),
            [
                Part::Placeholder("a"),
                Part::Placeholder("b"),
                Part::Text("c")
            ]
        );
        for (bad, why) in [
            ("a{b", "unclosed"),
            ("a}b", "stray"),
            ("a{}b", "empty"),
            ("{a{b}}", "nested"),
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.message.contains(why), "{bad}: {}", err.message);
            assert!(err.message.contains(bad), "{}", err.message);
        }
    }
}
