//! The on-disk cache of compiled plugins, so a restart (or a reload back to an earlier version)
//! deserializes machine code in milliseconds instead of compiling for hundreds.
//!
//! Part of loading (`load.rs`), never on the request path. An entry is named by the SHA-256 of
//! the plugin file and a hash of the engine's compatibility hash (wasmtime version, compiler
//! settings, enabled features), so an artifact of another wasmtime build or config is simply
//! never looked up. Each entry ends with the SHA-256 of the artifact, checked before wasmtime
//! sees a byte: a truncated or corrupted entry is ignored and replaced, never loaded. Entries are
//! written to a temporary file and renamed into place, so a crash never leaves half an entry.
//!
//! The directory is created `0700`: deserializing trusts the artifact to be machine code this
//! engine produced, so only the proxy's own user may write there. Every I/O problem is logged
//! once and the plugin is compiled as if there were no cache.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Entries kept at most; the least recently written beyond this are removed.
const MAX_ENTRIES: usize = 256;
const CHECKSUM_LEN: usize = 32;

/// A directory of precompiled components for one engine.
#[derive(Debug, Clone)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    /// Hex hash of the engine's compatibility hash: part of every entry name.
    engine_key: String,
}

impl DiskCache {
    /// Opens (creating if needed) the cache directory for `engine`. `None`, after a warning,
    /// if it cannot be created.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Option<Self> {
        if let Err(e) = create_private_dir(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the plugin compile cache; compiling without it");
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Some(Self {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", h.finish()),
        })
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The cached component for a plugin file with this SHA-256, if a valid entry exists.
    pub(crate) fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.entry(sha256);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a compile cache entry");
                return None;
            }
        };
        let Some(artifact) = verified(&bytes) else {
            tracing::warn!(path = %path.display(), "corrupt compile cache entry ignored");
            let _ = std::fs::remove_file(&path);
            return None;
        };
        match deserialize(engine, artifact) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable compile cache entry ignored");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the precompiled artifact of a plugin file with this SHA-256.
    pub(crate) fn put(&self, sha256: &str, artifact: &[u8]) {
        let path = self.entry(sha256);
        // Unique per writer: two loads in one process may store the same entry at once.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{sha256}.{}.{n}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(artifact)?;
            f.write_all(&Sha256::digest(artifact))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), error = %e, "cannot write a compile cache entry");
            return;
        }
        self.prune();
    }

    /// Removes the oldest entries beyond [`MAX_ENTRIES`].
    fn prune(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = dir
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= MAX_ENTRIES {
            return;
        }
        entries.sort();
        for (_, path) in &entries[..entries.len() - MAX_ENTRIES] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The artifact part of an entry whose trailing checksum matches.
fn verified(entry: &[u8]) -> Option<&[u8]> {
    let split = entry.len().checked_sub(CHECKSUM_LEN)?;
    let (artifact, sum) = entry.split_at(split);
    (Sha256::digest(artifact).as_slice() == sum).then_some(artifact)
}

/// Loads an artifact `put` wrote (or `precompile_component` just produced) for `engine`.
#[allow(unsafe_code)]
pub(crate) fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `Component::deserialize` requires bytes produced by `precompile_component` of a
    // compatible engine. The entry's name carries this engine's compatibility hash, its
    // checksum was just verified (so it is the exact artifact `put` wrote), and the directory
    // is private to this user. wasmtime additionally checks the artifact's version and
    // settings header and refuses a mismatch.
    unsafe { Component::deserialize(engine, artifact) }
}

/// Compiles `bytes` with `engine`; with a cache, through a precompiled artifact that is stored
/// under `sha256` first, so the next process deserializes it instead of compiling.
pub(crate) fn compile(
    engine: &Engine,
    bytes: &[u8],
    sha256: &str,
    disk: Option<&DiskCache>,
) -> wasmtime::Result<Component> {
    match disk {
        Some(d) => {
            let artifact = engine.precompile_component(bytes)?;
            d.put(sha256, &artifact);
            deserialize(engine, &artifact)
        }
        None => Component::new(engine, bytes),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Where the cache goes unless `[plugins] cache_dir` says otherwise: the user's cache
/// directory (`$XDG_CACHE_HOME/bff-proxy`, else `$HOME/.cache/bff-proxy`); `None` without either.
pub(crate) fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("bff-proxy").join("plugins"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_guards_the_artifact() {
        let artifact = b"not really machine code".to_vec();
        let mut entry = artifact.clone();
        entry.extend_from_slice(&Sha256::digest(&artifact));
        assert_eq!(verified(&entry), Some(&artifact[..]));
        let mut flipped = entry.clone();
        flipped[3] ^= 1;
        assert_eq!(verified(&flipped), None);
        assert_eq!(verified(&entry[..entry.len() - 1]), None);
        assert_eq!(verified(&entry[..10]), None);
    }
}
