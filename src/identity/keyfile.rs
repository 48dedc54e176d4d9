//! Private key files: read with a permission check, written 0600 atomically.
//!
//! Does file I/O; the only part of `identity` that does.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{KeyError, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read private key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write private key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "private key file {path} is readable by group or others (mode {mode:04o}); \
         fix it with `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("private key file {path}: {source}")]
    Invalid { path: PathBuf, source: KeyError },
}

/// Reads a private key file, refusing one that group or others can read: a
/// WireGuard key that leaked once is leaked for good.
pub fn read_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(read_err)?;
    text.trim().parse().map_err(|source| KeyFileError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Writes `key` to `path` with mode 0600: into a temporary file in the same
/// directory, synced, then renamed over `path`, so a crash leaves either the
/// old file or the new one, never a torn or world-readable one.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), KeyFileError> {
    write_atomic(path, format!("{}\n", key.to_base64()).as_bytes(), 0o600).map_err(|source| {
        KeyFileError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

/// Atomic write with a fixed mode (the file never exists with a wider one).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_key_is_0600_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let key = PrivateKey::generate(&mut rand::rngs::OsRng);
        write_private_key(&path, &key).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            read_private_key(&path).unwrap().to_base64(),
            key.to_base64()
        );
    }

    #[test]
    fn group_readable_key_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        write_private_key(&path, &PrivateKey::generate(&mut rand::rngs::OsRng)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_private_key(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn garbage_key_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        write_atomic(&path, b"hello\n", 0o600).unwrap();
        let err = read_private_key(&path).unwrap_err().to_string();
        assert!(
            err.contains("private.key") && err.contains("base64"),
            "{err}"
        );
    }
}
