//! `meshd join`: enrols a node by writing its state directory.
//!
//! Does file I/O and draws a key. Nothing is sent yet: `meshd run` presents
//! the token on its first connection, so a token is spent only by a node
//! that actually comes up. The directory's files are named in
//! [`crate::paths::NodeDir`]; the key is created if missing, the token is
//! deleted once the node is admitted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use rand::{CryptoRng, RngCore};

use crate::config::{self, RendezvousConfig};
use crate::identity::keyfile::{read_private_key, write_atomic, write_private_key, KeyFileError};
use crate::identity::{CertHash, JoinToken, JoinTokenError, PrivateKey};
use crate::paths::NodeDir;

#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The mesh's servers, `HOST:PORT`, comma-separated.
    pub server: String,
    pub token: JoinToken,
    pub ca_hash: CertHash,
    pub state_dir: PathBuf,
    pub name: Option<String>,
    pub listen_port: u16,
    pub advertise_endpoint: Option<SocketAddr>,
    pub interface: String,
    pub socket: PathBuf,
    /// Prefixes behind this node to advertise (`--advertise-routes`),
    /// written as `routes` in the config so that `meshd run` sends them.
    pub routes: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("--token: {0}")]
    Token(#[from] JoinTokenError),
    #[error("--token-file: {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: JoinTokenError,
    },
}

/// The longest token file read: a token is well under 256 bytes.
const MAX_TOKEN_FILE: u64 = 4096;

/// The join token from `--token-file FILE`: its first line, without the
/// line end or surrounding blanks; `-` reads standard input.
pub fn read_token(file: &Path) -> Result<JoinToken, JoinError> {
    use std::io::Read as _;
    let stdin = file == Path::new("-");
    let path = if stdin {
        PathBuf::from("standard input")
    } else {
        file.to_owned()
    };
    let io = |source| JoinError::Io {
        path: path.clone(),
        source,
    };
    let mut text = Vec::new();
    if stdin {
        std::io::stdin()
            .lock()
            .take(MAX_TOKEN_FILE)
            .read_to_end(&mut text)
            .map_err(io)?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_TOKEN_FILE).read_to_end(&mut text))
            .map_err(io)?;
    }
    let text = String::from_utf8_lossy(&text);
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(JoinError::Invalid(format!(
            "--token-file: {} holds no token; put the token from `mesh-rendezvous token create` on its first line",
            path.display()
        )));
    }
    token
        .parse()
        .map_err(|source| JoinError::TokenFile { path, source })
}

/// Writes the state directory; returns the config path.
pub fn join<R: RngCore + CryptoRng>(
    options: &JoinOptions,
    rng: &mut R,
) -> Result<PathBuf, JoinError> {
    let JoinOptions {
        server,
        token,
        ca_hash,
        state_dir: dir,
        name,
        listen_port,
        advertise_endpoint,
        interface,
        socket,
        routes,
    } = options;
    let bad = server.split(',').find(|one| {
        one.trim()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
    });
    if let Some(bad) = bad {
        return Err(JoinError::Invalid(format!(
            "{bad:?} is not HOST:PORT (several servers: HOST:PORT,HOST:PORT)"
        )));
    }
    if let Some(name) = name {
        config::validate_node_name(name).map_err(|m| JoinError::Invalid(format!("--name: {m}")))?;
    }
    let bad_routes = |m| JoinError::Invalid(format!("--advertise-routes: {m}"));
    for net in routes {
        config::validate_route(net).map_err(bad_routes)?;
    }
    config::validate_routes(routes).map_err(bad_routes)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| JoinError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io(dir))?;

    let layout = NodeDir::new(dir);
    let key_path = layout.private_key();
    if key_path.exists() {
        read_private_key(&key_path)?;
    } else {
        write_private_key(&key_path, &PrivateKey::generate(rng))?;
    }
    let token_path = layout.join_token();
    let line = format!("{}\n", token.expose());
    write_atomic(&token_path, line.as_bytes(), 0o600).map_err(io(&token_path))?;

    let config_path = layout.config();
    let rendezvous = RendezvousConfig {
        address: server.clone(),
        ca_hash: *ca_hash,
    };
    // A different mesh: what was cached about the old one is wrong now.
    if let Ok(old) = config::Config::load(&config_path) {
        if old.rendezvous.as_ref() != Some(&rendezvous) {
            let _ = std::fs::remove_file(layout.cache());
        }
    }
    let mut table = toml::Table::new();
    let mut set = |k: &str, v: toml::Value| {
        table.insert(k.to_owned(), v);
    };
    set("private-key-file", key_path.display().to_string().into());
    set("state-dir", dir.display().to_string().into());
    if let Some(name) = name {
        set("name", name.clone().into());
    }
    set("listen-port", i64::from(*listen_port).into());
    set("interface", interface.clone().into());
    set("socket", socket.display().to_string().into());
    if let Some(endpoint) = advertise_endpoint {
        set("advertise-endpoint", endpoint.to_string().into());
    }
    if !routes.is_empty() {
        let list = routes.iter().map(|r| r.to_string().into()).collect();
        set("routes", toml::Value::Array(list));
    }
    set(
        "rendezvous",
        toml::Value::try_from(&rendezvous).map_err(|e| JoinError::Invalid(e.to_string()))?,
    );
    let text = format!(
        "# Written by `meshd join`; `meshd run --state-dir {}` reads it.\n{}",
        dir.display(),
        toml::to_string(&table).map_err(|e| JoinError::Invalid(e.to_string()))?
    );
    write_atomic(&config_path, text.as_bytes(), 0o644).map_err(io(&config_path))?;
    // Prove the file is what `meshd run` will accept.
    config::Config::load(&config_path).map_err(|e| JoinError::Invalid(e.to_string()))?;
    Ok(config_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> JoinOptions {
        JoinOptions {
            server: "203.0.113.1:7443".into(),
            token: "abcd.secret".parse().unwrap(),
            ca_hash: CertHash::of(b"cert"),
            state_dir: dir.to_owned(),
            name: Some("node-a".into()),
            listen_port: 51820,
            advertise_endpoint: Some("198.51.100.7:51820".parse().unwrap()),
            interface: "mesh0".into(),
            socket: "/run/meshd/meshd.sock".into(),
            routes: vec!["10.244.3.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn join_writes_a_config_that_run_accepts_and_keeps_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let path = join(&options(&state), &mut rand::rngs::OsRng).unwrap();
        let config = config::Config::load(&path).unwrap();
        assert_eq!(config.name.as_deref(), Some("node-a"));
        assert_eq!(config.rendezvous.unwrap().address, "203.0.113.1:7443");
        assert_eq!(
            config.advertise_endpoint,
            Some("198.51.100.7:51820".parse().unwrap())
        );
        assert_eq!(
            config.routes,
            vec!["10.244.3.0/24".parse::<IpNet>().unwrap()]
        );
        let layout = NodeDir::new(&state);
        let key = std::fs::read_to_string(layout.private_key()).unwrap();
        join(&options(&state), &mut rand::rngs::OsRng).unwrap();
        assert_eq!(
            std::fs::read_to_string(layout.private_key()).unwrap(),
            key,
            "key kept on re-join"
        );
        assert_eq!(
            std::fs::read_to_string(layout.join_token()).unwrap(),
            "abcd.secret\n"
        );
    }

    #[test]
    fn advertised_routes_are_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        for (routes, words) in [
            (vec!["10.244.3.1/24"], "host bits"),
            (vec!["0.0.0.0/0"], "default route"),
            (vec!["10.244.3.0/24", "10.244.3.0/24"], "twice"),
        ] {
            let options = JoinOptions {
                routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
                ..options(&state)
            };
            let err = join(&options, &mut rand::rngs::OsRng)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("--advertise-routes: ") && err.contains(words),
                "{routes:?}: {err}"
            );
            assert!(!state.exists(), "nothing written for {routes:?}");
        }
        let none = JoinOptions {
            routes: Vec::new(),
            ..options(&state)
        };
        let path = join(&none, &mut rand::rngs::OsRng).unwrap();
        assert!(config::Config::load(&path).unwrap().routes.is_empty());
    }

    #[test]
    fn a_token_file_gives_its_first_line_trimmed_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "abcd.secret\r\nignored\n").unwrap();
        assert_eq!(read_token(&file).unwrap().expose(), "abcd.secret");
        std::fs::write(&file, "  \n").unwrap();
        let empty = read_token(&file).unwrap_err().to_string();
        assert!(
            empty.contains("holds no token") && empty.contains(&file.display().to_string()),
            "{empty}"
        );
        let missing = read_token(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("absent"), "{missing}");
    }

    #[test]
    fn a_token_file_that_holds_no_join_token_is_refused_naming_the_file_not_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "abcd.sec ret-in-the-middle\n").unwrap();
        let err = read_token(&file).unwrap_err().to_string();
        assert!(
            err.contains("token create") && err.contains(&file.display().to_string()),
            "{err}"
        );
        assert!(!err.contains("ret-in-the-middle"), "{err}");
    }

    #[test]
    fn bad_servers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = options(dir.path());
        for bad in ["no-port", "rv1:7443,no-port", "rv1:7443,"] {
            o.server = bad.into();
            assert!(
                join(&o, &mut rand::rngs::OsRng)
                    .unwrap_err()
                    .to_string()
                    .contains("HOST:PORT"),
                "{bad}"
            );
        }
    }
}
