//! Paths into the config document (`routes[2].chain[0].plugin`), used to point problems at a line.

use std::fmt;

/// A position in the config tree: table keys and array indices from the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ConfigPath(Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

impl ConfigPath {
    pub(crate) fn root() -> Self {
        Self::default()
    }

    pub(crate) fn key(&self, key: impl Into<String>) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.into()));
        Self(segs)
    }

    pub(crate) fn index(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        Self(segs)
    }

    pub(crate) fn segments(&self) -> &[Seg] {
        &self.0
    }

    /// Appends the path serde reported inside one decoded section.
    pub(crate) fn join_serde(&self, inner: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment;
        let mut out = self.clone();
        for seg in inner.iter() {
            out = match seg {
                Segment::Seq { index } => out.index(*index),
                Segment::Map { key } => out.key(key.clone()),
                Segment::Enum { variant } => out.key(variant.clone()),
                Segment::Unknown => out,
            };
        }
        out
    }
}

impl fmt::Display for ConfigPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k) => {
                    let bare = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    if bare {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}
