//! The environment file meshd writes while `mesh0` is up (`/run/meshd/env`
//! by default, `env-file` in the config): the node's overlay addresses for
//! kubelet's `--node-ip` (deploy/kubernetes/kubelet-meshd.conf reads it with
//! `EnvironmentFile=`) and for scripts (`. /run/meshd/env`).
//!
//! ```text
//! MESH_IP=100.72.0.1
//! MESH_IP6=fd5a:1f00:2b3c:0:6d65:7368:0:1
//! MESH_IFACE=mesh0
//! MESH_MTU=1380
//! ```
//!
//! [`MeshEnv`] with [`MeshEnv::render`] and [`MeshEnv::parse`] is pure;
//! [`write`] and [`remove`] do file I/O. A reader never sees a half-written
//! file: [`write`] fills a temporary file in the same directory, fsyncs it
//! and renames it over the old one (rename(2) replaces atomically within a
//! file system), then fsyncs the directory.

use std::fs;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

/// Readable by kubelet and scripts; it holds nothing secret.
pub const MODE: u32 = 0o644;

const IP: &str = "MESH_IP";
const IP6: &str = "MESH_IP6";
const IFACE: &str = "MESH_IFACE";
const MTU: &str = "MESH_MTU";

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("line {line}: expected KEY=value, found {text:?}")]
    Line { line: usize, text: String },
    #[error("line {line}: the quoted value of `{key}` has no closing quote")]
    Unterminated { line: usize, key: String },
    #[error("`{key}` is missing")]
    Missing { key: &'static str },
    #[error("`{key}`: {value:?} is not {expected}")]
    Value {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("cannot write the environment file {path}: {source}; check `env-file` in the config")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot remove the environment file {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// What the file says about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshEnv {
    /// `MESH_IP`: the overlay IPv4 address (empty when the node has none).
    pub ipv4: Option<Ipv4Addr>,
    /// `MESH_IP6`: the overlay IPv6 address (empty when the node has none).
    pub ipv6: Option<Ipv6Addr>,
    /// `MESH_IFACE`: the mesh interface (`mesh0`).
    pub interface: String,
    /// `MESH_MTU`: the mesh interface's MTU, for a CNI on top.
    pub mtu: u16,
}

impl MeshEnv {
    /// The file for an interface with `addresses`: the first IPv4 and the
    /// first IPv6 address, without their prefix lengths.
    pub fn new(addresses: &[IpNet], interface: &str, mtu: u16) -> Self {
        MeshEnv {
            ipv4: addresses.iter().find_map(|a| match a.addr() {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }),
            ipv6: addresses.iter().find_map(|a| match a.addr() {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            }),
            interface: interface.to_owned(),
            mtu,
        }
    }

    /// `KEY=value` lines as systemd's `EnvironmentFile=` and sh(1) read
    /// them; a missing address is an empty value, so the key is always set.
    pub fn render(&self) -> String {
        let opt = |ip: Option<String>| ip.unwrap_or_default();
        format!(
            "# Written by meshd while the mesh interface is up; removed when meshd stops.\n\
             {IP}={}\n{IP6}={}\n{IFACE}={}\n{MTU}={}\n",
            opt(self.ipv4.map(|a| a.to_string())),
            opt(self.ipv6.map(|a| a.to_string())),
            quote(&self.interface),
            self.mtu,
        )
    }

    /// Reads what [`MeshEnv::render`] wrote: every key must be there with a
    /// valid value; blank lines, `#`/`;` comments and other keys are skipped.
    pub fn parse(text: &str) -> Result<Self, EnvError> {
        let (mut ipv4, mut ipv6, mut interface, mut mtu) = (None, None, None, None);
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(EnvError::Line {
                    line,
                    text: raw.to_owned(),
                });
            };
            let key = key.trim();
            let value = unquote(value.trim()).ok_or_else(|| EnvError::Unterminated {
                line,
                key: key.to_owned(),
            })?;
            match key {
                IP => ipv4 = Some(parse_optional(IP, &value, "an IPv4 address")?),
                IP6 => ipv6 = Some(parse_optional(IP6, &value, "an IPv6 address")?),
                IFACE if value.is_empty() => {
                    return Err(EnvError::Value {
                        key: IFACE,
                        value,
                        expected: "an interface name",
                    })
                }
                IFACE => interface = Some(value),
                MTU => {
                    let parsed = value.parse().map_err(|_| EnvError::Value {
                        key: MTU,
                        value,
                        expected: "an MTU",
                    })?;
                    mtu = Some(parsed);
                }
                _ => {}
            }
        }
        Ok(MeshEnv {
            ipv4: ipv4.ok_or(EnvError::Missing { key: IP })?,
            ipv6: ipv6.ok_or(EnvError::Missing { key: IP6 })?,
            interface: interface.ok_or(EnvError::Missing { key: IFACE })?,
            mtu: mtu.ok_or(EnvError::Missing { key: MTU })?,
        })
    }
}

fn parse_optional<T: std::str::FromStr>(
    key: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<Option<T>, EnvError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| EnvError::Value {
        key,
        value: value.to_owned(),
        expected,
    })
}

/// Characters that mean the same to systemd and sh(1) unquoted.
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | '+' | '%' | ',')
}

/// A value as is when it is plain, else in double quotes with `"`, `\`,
/// `` ` `` and `$` escaped: the escapes both systemd's env-file parser and
/// sh(1) undo inside double quotes. Only an odd interface name needs it.
fn quote(value: &str) -> String {
    if value.chars().all(is_plain) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\' | '`' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The inverse of [`quote`]; `None` for an unterminated quote.
fn unquote(value: &str) -> Option<String> {
    let Some(inner) = value.strip_prefix('"') else {
        return Some(value.to_owned());
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                e @ ('"' | '\\' | '`' | '$') => out.push(e),
                other => {
                    out.push('\\');
                    out.push(other);
                }
            },
            c => out.push(c),
        }
    }
    None
}

/// Replaces the file at `path` with `env`, atomically, mode 0644; creates
/// its directory if needed (under systemd, `RuntimeDirectory=` has).
pub fn write(path: &Path, env: &MeshEnv) -> Result<(), EnvError> {
    let error = |source| EnvError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    fs::create_dir_all(dir).map_err(error)?;
    // Same directory, so the rename cannot cross file systems; the pid keeps
    // two meshd (on one host, different interfaces) out of each other's way.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A meshd killed mid-write with this pid left it; it holds nothing.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MODE)
            .open(&tmp)?;
        // The creation mode went through the umask; the file must be 0644.
        file.set_permissions(fs::Permissions::from_mode(MODE))?;
        file.write_all(env.render().as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(error)
}

/// Removes the file; one that is already gone is fine.
pub fn remove(path: &Path) -> Result<(), EnvError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EnvError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn dual_stack() -> MeshEnv {
        MeshEnv::new(
            &[net("100.72.0.7/16"), net("fd5a:1f00:2b3c::7/48")],
            "mesh0",
            1380,
        )
    }

    #[test]
    fn the_file_names_the_first_address_of_each_family_without_its_prefix() {
        let env = MeshEnv::new(
            &[
                net("fd5a:1f00:2b3c::7/48"),
                net("100.72.0.7/16"),
                net("100.73.0.7/16"),
            ],
            "mesh0",
            1380,
        );
        assert_eq!(env.ipv4, Some(Ipv4Addr::new(100, 72, 0, 7)));
        assert_eq!(env.ipv6, Some("fd5a:1f00:2b3c::7".parse().unwrap()));
    }

    #[test]
    fn a_dual_stack_node_renders_four_plain_lines() {
        let text = dual_stack().render();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "MESH_IP=100.72.0.7",
                "MESH_IP6=fd5a:1f00:2b3c::7",
                "MESH_IFACE=mesh0",
                "MESH_MTU=1380"
            ]
        );
    }

    #[test]
    fn a_missing_address_is_an_empty_value_that_parses_back_as_none() {
        let env = MeshEnv::new(&[net("100.72.0.7/16")], "mesh0", 1380);
        let text = env.render();
        assert!(text.contains("\nMESH_IP6=\n"), "{text}");
        assert_eq!(MeshEnv::parse(&text).unwrap(), env);
    }

    #[test]
    fn what_is_rendered_parses_back() {
        assert_eq!(
            MeshEnv::parse(&dual_stack().render()).unwrap(),
            dual_stack()
        );
    }

    #[test]
    fn an_odd_interface_name_is_quoted_and_parses_back() {
        let env = MeshEnv {
            interface: "m\"e$h`\\0".into(),
            ..dual_stack()
        };
        let text = env.render();
        assert!(
            text.contains("MESH_IFACE=\"m\\\"e\\$h\\`\\\\0\"\n"),
            "{text}"
        );
        assert_eq!(MeshEnv::parse(&text).unwrap(), env);
    }

    #[test]
    fn a_file_cut_before_its_last_key_does_not_parse() {
        let text = dual_stack().render();
        let last = text.find("MESH_MTU=").unwrap();
        for cut in 0..last {
            assert!(
                MeshEnv::parse(&text[..cut]).is_err(),
                "{:?} parses",
                &text[..cut]
            );
        }
    }

    #[test]
    fn bad_values_are_named() {
        let err =
            MeshEnv::parse("MESH_IP=100.72.0.300\nMESH_IP6=\nMESH_IFACE=mesh0\nMESH_MTU=1380\n")
                .unwrap_err();
        assert!(
            err.to_string().contains("MESH_IP") && err.to_string().contains("100.72.0.300"),
            "{err}"
        );
        let err = MeshEnv::parse("MESH_IP=\nMESH_IP6=\nMESH_IFACE=mesh0\n").unwrap_err();
        assert!(err.to_string().contains("MESH_MTU"), "{err}");
        let err = MeshEnv::parse("MESH_IP\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = MeshEnv::parse("MESH_IFACE=\"mesh0\n").unwrap_err();
        assert!(err.to_string().contains("closing quote"), "{err}");
    }

    #[test]
    fn the_written_file_is_0644_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/meshd/env");

        write(&path, &dual_stack()).unwrap();

        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(
            MeshEnv::parse(&fs::read_to_string(&path).unwrap()).unwrap(),
            dual_stack()
        );
    }

    #[test]
    fn rewriting_replaces_the_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        write(&path, &dual_stack()).unwrap();
        let moved = MeshEnv::new(&[net("100.72.0.9/16")], "mesh0", 1380);

        write(&path, &moved).unwrap();

        assert_eq!(
            MeshEnv::parse(&fs::read_to_string(&path).unwrap()).unwrap(),
            moved
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["env"]);
    }

    #[test]
    fn removing_a_file_that_is_gone_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        write(&path, &dual_stack()).unwrap();

        remove(&path).unwrap();
        remove(&path).unwrap();

        assert!(!path.exists());
    }
}
