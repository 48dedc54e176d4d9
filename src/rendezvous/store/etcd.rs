//! The shared store over etcd: [`super::kv`]'s model (revisions,
//! compare-and-swap transactions, leases, a watchable history) on a real
//! etcd cluster, for several rendezvous servers serving one mesh
//! (DESIGN.md, "Scale and HA").
//!
//! Does network I/O (etcd's gRPC API, through the `etcd-client` crate) and
//! reads the clock: this is the shell. What can be decided without etcd —
//! the configuration's checks, where a mesh's keys live, how a [`Txn`]
//! becomes etcd's compares and operations — is pure and tested here; the
//! rest is tested against a real etcd in `tests/store_etcd.rs`.
//!
//! Every key of a mesh lives under its prefix (`key-prefix`, such as
//! `/meshd/prod/`), which only this module adds and strips: the registry
//! and [`MemoryKv`](super::kv::MemoryKv) see keys relative to it, so two
//! meshes on one etcd never see each other.
//!
//! One [`EtcdStore`] is one server's session with etcd: it holds a lease
//! ([`EtcdStore::lease`]) that it renews every third of its TTL, and every
//! leased put of its transactions hangs on it, so what a server announces
//! (its presence, its nodes' presence) goes by itself when the server does.
//! When renewals fail for a whole TTL, or etcd says the lease is gone,
//! [`EtcdStore::lease_lost`] turns true; the server then stops claiming
//! presence on it and [`EtcdStore::renew_lease`] takes a fresh one.
//!
//! Each request runs under `request-timeout`; an error names the request
//! and the endpoints it was tried on. Watches ([`EtcdStore::watch`])
//! reconnect by themselves from the last revision they delivered, so a
//! member's death or an election loses no event; only a compaction past
//! that revision ends one ([`WatchItem::Compacted`]), and the caller then
//! reloads.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions,
    Identity, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn as EtcdTxn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

use super::kv::{Compare, Event, KeyValue, LeaseId, Op, Outcome, Revision, Txn};

/// The shortest lease etcd is asked for: below it, a busy etcd or one
/// election can end a healthy server's lease.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// The longest: a dead server's nodes must go offline within it.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(60);
/// How many watch batches may wait for the caller before the watch stops
/// reading from etcd (which then holds them).
pub const WATCH_CHANNEL_BOUND: usize = 64;
/// How many keys one page of [`EtcdStore::load`] reads.
const LOAD_PAGE: i64 = 1000;
/// The first and the longest wait before a broken watch is opened again.
const WATCH_RETRY_FIRST: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);
/// The pause before a request that reached no member is tried again.
const UNSENT_RETRY: Duration = Duration::from_millis(20);
/// HTTP/2 pings on idle connections, so a dead member is noticed on a
/// quiet watch. etcd answers pings more often than every 5 s with GOAWAY
/// (`--grpc-keepalive-min-time`).
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// `[store]` in `rendezvous.toml` when the mesh's state lives in etcd:
///
/// ```toml
/// [store]
/// etcd-endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
/// key-prefix = "/meshd/prod/"          # one per mesh; ends in '/'
/// etcd-ca = "/etc/mesh-rendezvous/etcd-ca.pem"
/// etcd-cert = "/etc/mesh-rendezvous/etcd-client.pem"   # with etcd-key, or neither
/// etcd-key = "/etc/mesh-rendezvous/etcd-client-key.pem"
/// lease-ttl = "10s"                    # 2s to 60s: how long a dead server's nodes stay online
/// dial-timeout = "5s"
/// request-timeout = "5s"
/// ```
///
/// Checked as it is read ([`EtcdConfig::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoreSection", into = "StoreSection")]
pub struct EtcdConfig {
    /// `http://HOST:PORT`, `https://HOST:PORT`, or `HOST:PORT` (https with
    /// `tls`, http without).
    pub endpoints: Vec<String>,
    /// Where this mesh's keys live; ends in '/'.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// The TTL of the server's lease.
    pub lease_ttl: Duration,
    /// How long connecting to one endpoint may take.
    pub dial_timeout: Duration,
    /// How long one request may take, waiting for a connection included.
    pub request_timeout: Duration,
}

/// TLS towards etcd: the CA that signed etcd's server certificates, and
/// the client certificate when etcd asks for one (`--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdConfig {
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
    pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// A config for `endpoints` and `prefix` with the default TTL and
    /// timeouts and no TLS; not yet validated.
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            tls: None,
            lease_ttl: Self::DEFAULT_LEASE_TTL,
            dial_timeout: Self::DEFAULT_DIAL_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Refuses what cannot work, naming the key and what to write instead.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        for endpoint in &self.endpoints {
            let scheme = Scheme::of(endpoint)?;
            match (scheme, &self.tls) {
                (Scheme::Http, Some(_)) => {
                    return Err(ConfigError::TlsOverHttp {
                        endpoint: endpoint.clone(),
                    })
                }
                (Scheme::Https, None) => {
                    return Err(ConfigError::HttpsWithoutCa {
                        endpoint: endpoint.clone(),
                    })
                }
                (Scheme::Http | Scheme::Bare, None) | (Scheme::Https | Scheme::Bare, Some(_)) => {}
            }
        }
        KeyPrefix::new(&self.prefix)?;
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.lease_ttl)
            || self.lease_ttl.subsec_nanos() != 0
        {
            return Err(ConfigError::LeaseTtl {
                ttl: self.lease_ttl,
            });
        }
        for (key, value) in [
            ("dial-timeout", self.dial_timeout),
            ("request-timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroTimeout { key });
            }
        }
        if let Some(tls) = &self.tls {
            match (&tls.cert, &tls.key) {
                (Some(_), None) => return Err(ConfigError::CertWithoutKey),
                (None, Some(_)) => return Err(ConfigError::KeyWithoutCert),
                (Some(_), Some(_)) | (None, None) => {}
            }
        }
        Ok(())
    }
}

/// What is wrong with `[store]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "etcd-endpoints is empty: list at least one etcd member, such as \"https://10.0.0.1:2379\""
    )]
    NoEndpoints,
    #[error("etcd-endpoints: {endpoint:?} is not an etcd endpoint: write http://HOST:PORT, https://HOST:PORT or HOST:PORT")]
    BadEndpoint { endpoint: String },
    #[error("etcd-endpoints: {endpoint:?} is plain http, but etcd-ca is set: write https://")]
    TlsOverHttp { endpoint: String },
    #[error("etcd-endpoints: {endpoint:?} is https, but etcd-ca is not set: name the CA that signed etcd's certificates")]
    HttpsWithoutCa { endpoint: String },
    #[error("key-prefix is empty: give each mesh its own prefix, such as \"/meshd/prod/\"")]
    EmptyPrefix,
    #[error("key-prefix {prefix:?} does not end in '/': write {prefix:?} + \"/\", so that no mesh's prefix starts another's")]
    PrefixWithoutSlash { prefix: String },
    #[error("lease-ttl {ttl:?} is out of range: give whole seconds from 2s to 60s")]
    LeaseTtl { ttl: Duration },
    #[error("{key} is zero: give it a duration, such as \"5s\"")]
    ZeroTimeout { key: &'static str },
    #[error("etcd-cert is set without etcd-key: give both, or neither")]
    CertWithoutKey,
    #[error("etcd-key is set without etcd-cert: give both, or neither")]
    KeyWithoutCert,
    #[error("{key} is set without etcd-ca: name the CA that signed etcd's certificates")]
    ClientCertWithoutCa { key: &'static str },
    #[error("{key}: {value:?} is not a duration ({reason}); write one such as \"5s\"")]
    BadDuration {
        key: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
    /// `HOST:PORT`: https when TLS is configured, http otherwise.
    Bare,
}

impl Scheme {
    fn of(endpoint: &str) -> Result<Scheme, ConfigError> {
        let bad = || ConfigError::BadEndpoint {
            endpoint: endpoint.to_owned(),
        };
        let (scheme, rest) = if let Some(rest) = endpoint.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = endpoint.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            (Scheme::Bare, endpoint)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host_ok = !host.is_empty()
            && !host
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@'));
        if !host_ok || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(scheme)
    }
}

/// `[store]` as written in the file: flat keys, durations as "5s".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct StoreSection {
    etcd_endpoints: Vec<String>,
    key_prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd_key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dial_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_timeout: Option<String>,
}

fn duration(
    key: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(value) => humantime::parse_duration(&value).map_err(|e| ConfigError::BadDuration {
            key,
            reason: e.to_string(),
            value,
        }),
    }
}

impl TryFrom<StoreSection> for EtcdConfig {
    type Error = ConfigError;

    fn try_from(s: StoreSection) -> Result<Self, ConfigError> {
        let tls = match (s.etcd_ca, s.etcd_cert, s.etcd_key) {
            (Some(ca), cert, key) => Some(EtcdTls { ca, cert, key }),
            (None, Some(_), _) => {
                return Err(ConfigError::ClientCertWithoutCa { key: "etcd-cert" })
            }
            (None, None, Some(_)) => {
                return Err(ConfigError::ClientCertWithoutCa { key: "etcd-key" })
            }
            (None, None, None) => None,
        };
        let config = EtcdConfig {
            endpoints: s.etcd_endpoints,
            prefix: s.key_prefix,
            tls,
            lease_ttl: duration("lease-ttl", s.lease_ttl, Self::DEFAULT_LEASE_TTL)?,
            dial_timeout: duration("dial-timeout", s.dial_timeout, Self::DEFAULT_DIAL_TIMEOUT)?,
            request_timeout: duration(
                "request-timeout",
                s.request_timeout,
                Self::DEFAULT_REQUEST_TIMEOUT,
            )?,
        };
        config.validate()?;
        Ok(config)
    }
}

impl From<EtcdConfig> for StoreSection {
    fn from(c: EtcdConfig) -> Self {
        let (etcd_ca, etcd_cert, etcd_key) = match c.tls {
            Some(tls) => (Some(tls.ca), tls.cert, tls.key),
            None => (None, None, None),
        };
        let written = |d: Duration| Some(humantime::format_duration(d).to_string());
        StoreSection {
            etcd_endpoints: c.endpoints,
            key_prefix: c.prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
            lease_ttl: written(c.lease_ttl),
            dial_timeout: written(c.dial_timeout),
            request_timeout: written(c.request_timeout),
        }
    }
}

/// A mesh's prefix: keys go in with it and come out without it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyPrefix(String);

impl KeyPrefix {
    fn new(prefix: &str) -> Result<Self, ConfigError> {
        if prefix.is_empty() {
            return Err(ConfigError::EmptyPrefix);
        }
        if !prefix.ends_with('/') {
            return Err(ConfigError::PrefixWithoutSlash {
                prefix: prefix.to_owned(),
            });
        }
        Ok(Self(prefix.to_owned()))
    }

    /// The key as stored in etcd.
    fn full(&self, key: &str) -> String {
        let mut full = String::with_capacity(self.0.len() + key.len());
        full.push_str(&self.0);
        full.push_str(key);
        full
    }

    /// The key relative to the prefix; `None` for a key outside it or one
    /// that is not UTF-8 (nothing this module wrote).
    fn strip(&self, full: &[u8]) -> Option<String> {
        let rest = full.strip_prefix(self.0.as_bytes())?;
        String::from_utf8(rest.to_vec()).ok()
    }

    /// The end of the prefix's range: the first key after every key that
    /// starts with it (the prefix with its last byte plus one; '/' is
    /// never 0xff).
    fn range_end(&self) -> Vec<u8> {
        let mut end = self.0.as_bytes().to_vec();
        while let Some(last) = end.pop() {
            if last < 0xff {
                end.push(last + 1);
                return end;
            }
        }
        // Only a prefix of 0xff bytes gets here, which KeyPrefix::new
        // refuses ('/' ends it); "\0" means "to the end" to etcd.
        vec![0]
    }
}

/// One condition as etcd checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// `create_revision == 0` (absent) or `create_revision > 0` (present).
    Exists { key: String, exists: bool },
    /// `mod_revision == revision`.
    ModRevision { key: String, revision: Revision },
}

/// One write as etcd does it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// A [`Txn`] in etcd's terms, keys prefixed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    checks: Vec<Check>,
    writes: Vec<Write>,
}

impl Plan {
    /// `None` for a transaction etcd would refuse (a key written twice).
    ///
    /// [`Compare::Revision`] is two checks: etcd compares an absent key's
    /// `mod_revision` as 0, where the model says an absent key never
    /// matches a revision; "present and last written at r" is exact.
    fn new(prefix: &KeyPrefix, txn: &Txn, lease: LeaseId) -> Option<Plan> {
        if !txn.writes_each_key_once() {
            return None;
        }
        let mut checks = Vec::with_capacity(txn.compares.len() * 2);
        for compare in &txn.compares {
            match compare {
                Compare::Absent(key) => checks.push(Check::Exists {
                    key: prefix.full(key),
                    exists: false,
                }),
                Compare::Revision(key, revision) => {
                    checks.push(Check::Exists {
                        key: prefix.full(key),
                        exists: true,
                    });
                    checks.push(Check::ModRevision {
                        key: prefix.full(key),
                        revision: *revision,
                    });
                }
            }
        }
        let writes = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, leased } => Write::Put {
                    key: prefix.full(key),
                    value: value.clone(),
                    lease: leased.then_some(lease),
                },
                Op::Delete { key } => Write::Delete {
                    key: prefix.full(key),
                },
            })
            .collect();
        Some(Plan { checks, writes })
    }

    fn into_etcd(self) -> EtcdTxn {
        let compares: Vec<EtcdCompare> = self
            .checks
            .into_iter()
            .map(|check| match check {
                Check::Exists { key, exists: false } => {
                    EtcdCompare::create_revision(key, CompareOp::Equal, 0)
                }
                Check::Exists { key, exists: true } => {
                    EtcdCompare::create_revision(key, CompareOp::Greater, 0)
                }
                Check::ModRevision { key, revision } => {
                    EtcdCompare::mod_revision(key, CompareOp::Equal, revision)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = self
            .writes
            .into_iter()
            .map(|write| match write {
                Write::Put { key, value, lease } => {
                    let options = lease.map(|LeaseId(id)| PutOptions::new().with_lease(id));
                    TxnOp::put(key, value, options)
                }
                Write::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        EtcdTxn::new().when(compares).and_then(ops)
    }
}

/// The endpoints a request was tried on, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints(Arc<[String]>);

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// What went wrong between a server and etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("[store]: {0}")]
    Config(#[from] ConfigError),
    #[error("[store]: cannot read {key} {path}: {source}")]
    ReadTls {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the connection to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: Endpoints,
        source: etcd_client::Error,
    },
    #[error("etcd did not answer {request} within {after:?} (endpoints tried: {endpoints}); check that they are up and reachable from here")]
    Timeout {
        request: &'static str,
        after: Duration,
        endpoints: Endpoints,
    },
    #[error("etcd {request} failed (endpoints tried: {endpoints}): {source}")]
    Request {
        request: &'static str,
        endpoints: Endpoints,
        source: etcd_client::Error,
    },
    #[error("etcd's answer to {request} had no header (endpoints: {endpoints})")]
    NoHeader {
        request: &'static str,
        endpoints: Endpoints,
    },
    #[error("etcd's answer to {request} did not match the request (endpoints: {endpoints})")]
    UnexpectedAnswer {
        request: &'static str,
        endpoints: Endpoints,
    },
    #[error("etcd granted no lease (endpoints: {endpoints}): {reason}")]
    LeaseRefused {
        endpoints: Endpoints,
        reason: String,
    },
    #[error("the mesh record under {prefix} in etcd is missing or not one this version reads")]
    BadMesh { prefix: String },
}

impl EtcdError {
    /// Whether trying again later may work: the cluster was unreachable,
    /// slow or without a leader, not a request etcd will always refuse.
    pub fn is_transient(&self) -> bool {
        match self {
            EtcdError::Timeout { .. } => true,
            EtcdError::Request { source, .. } | EtcdError::Connect { source, .. } => {
                transient(source)
            }
            EtcdError::Config(_)
            | EtcdError::ReadTls { .. }
            | EtcdError::NoHeader { .. }
            | EtcdError::UnexpectedAnswer { .. }
            | EtcdError::LeaseRefused { .. }
            | EtcdError::BadMesh { .. } => false,
        }
    }
}

fn transient(error: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic::Code;
    match error {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
                | Code::ResourceExhausted
        ),
        _ => false,
    }
}

/// What a watch delivers, in revision order.
#[derive(Debug)]
pub enum WatchItem {
    /// The changes of one or more revisions, keys without the prefix.
    Events(Vec<Event>),
    /// etcd forgot the history the watch needed (compacted up to
    /// `revision`): the watch has ended; load again, then watch from the
    /// revision loaded.
    Compacted { revision: Revision },
    /// The watch has ended on an error that retrying will not cure.
    Failed(EtcdError),
}

/// Aborts its task when dropped: the keep-alive lives as long as the store.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One server's session with etcd: a client, a prefix and a lease.
pub struct EtcdStore {
    client: Client,
    prefix: KeyPrefix,
    endpoints: Endpoints,
    lease_ttl: Duration,
    request_timeout: Duration,
    lease: LeaseId,
    lost: watch::Sender<bool>,
    keep_alive_task: AbortOnDrop,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix.0)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects, takes a lease of `lease-ttl` and starts renewing it.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, EtcdError> {
        cfg.validate()?;
        let prefix = KeyPrefix::new(&cfg.prefix)?;
        let endpoints = Endpoints(cfg.endpoints.clone().into());
        let mut options = ConnectOptions::new()
            .with_connect_timeout(cfg.dial_timeout)
            .with_keep_alive(HTTP2_PING_INTERVAL, cfg.request_timeout)
            // A member cut off from the others refuses requests (and ends
            // watches) instead of serving stale reads or hanging, so the
            // client goes to one that has a leader.
            .with_require_leader(true);
        if let Some(tls) = &cfg.tls {
            options = options.with_tls(tls_options(tls).await?);
        }
        let client = Client::connect(&cfg.endpoints, Some(options))
            .await
            .map_err(|source| EtcdError::Connect {
                endpoints: endpoints.clone(),
                source,
            })?;
        let (lost, _) = watch::channel(false);
        let mut store = EtcdStore {
            client,
            prefix,
            endpoints,
            lease_ttl: cfg.lease_ttl,
            request_timeout: cfg.request_timeout,
            lease: LeaseId(0),
            lost,
            keep_alive_task: AbortOnDrop(tokio::spawn(async {})),
        };
        store.renew_lease().await?;
        Ok(store)
    }

    /// The lease this store's leased puts hang on.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Turns true when the lease is gone: renewals failed for a whole TTL,
    /// or etcd said it no longer has it. Back to false after
    /// [`EtcdStore::renew_lease`].
    pub fn lease_lost(&self) -> watch::Receiver<bool> {
        self.lost.subscribe()
    }

    /// Takes a fresh lease (after a loss) and renews that one from now on;
    /// the old one, if etcd still has it, is revoked.
    pub async fn renew_lease(&mut self) -> Result<(), EtcdError> {
        let ttl = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let granted = self
            .request("lease grant", |client| async move {
                client.lease_client().grant(ttl, None).await
            })
            .await?;
        if !granted.error().is_empty() || granted.id() == 0 {
            return Err(EtcdError::LeaseRefused {
                endpoints: self.endpoints.clone(),
                reason: granted.error().to_owned(),
            });
        }
        let lease = granted.id();
        let keeper = self
            .request("lease keep-alive", |client| async move {
                client.lease_client().keep_alive(lease).await
            })
            .await?;
        let old = std::mem::replace(&mut self.lease, LeaseId(lease));
        self.keep_alive_task = AbortOnDrop(tokio::spawn(keep_alive(KeepAlive {
            client: self.client.clone(),
            lease,
            ttl: self.lease_ttl,
            request_timeout: self.request_timeout,
            stream: Some(keeper),
            lost: self.lost.clone(),
        })));
        self.lost.send_replace(false);
        if old.0 != 0 {
            // Best effort: keys still on the old lease would otherwise
            // linger until it expires.
            let _ = self
                .request("lease revoke", |client| async move {
                    client.lease_client().revoke(old.0).await
                })
                .await;
        }
        Ok(())
    }

    /// Revokes the lease, so every leased key of this server goes now
    /// rather than a TTL later (a clean shutdown).
    pub async fn revoke_lease(self) -> Result<(), EtcdError> {
        let LeaseId(lease) = self.lease;
        self.request("lease revoke", |client| async move {
            client.lease_client().revoke(lease).await
        })
        .await
        .map(drop)
    }

    /// Every key under the prefix, without it, in key order, and the
    /// revision they were all read at.
    pub async fn load(&self) -> Result<(Vec<KeyValue>, Revision), EtcdError> {
        let end = self.prefix.range_end();
        let mut from = self.prefix.0.as_bytes().to_vec();
        let mut revision: Revision = 0;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = self
                .request("load", |client| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { client.kv_client().get(from, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = self.header_revision("load", response.header())?;
            }
            for kv in response.kvs() {
                if let Some(key) = self.prefix.strip(kv.key()) {
                    out.push(KeyValue {
                        key,
                        value: kv.value().to_vec(),
                        revision: kv.mod_revision(),
                    });
                }
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                Some(_) | None => break,
            }
        }
        Ok((out, revision))
    }

    /// `keys` (without the prefix), read at one revision; `None` for each
    /// that is absent.
    pub async fn get(&self, keys: &[String]) -> Result<Vec<Option<KeyValue>>, EtcdError> {
        Ok(self.read(keys).await?.0)
    }

    /// What `keys` hold now, as [`MemoryKv::current`] gives it: a put at
    /// the revision that wrote each, or a delete at the read's revision
    /// for one that is absent — what a registry reads after its
    /// transaction lost a race.
    ///
    /// [`MemoryKv::current`]: super::kv::MemoryKv::current
    pub async fn current(&self, keys: &[String]) -> Result<Vec<Event>, EtcdError> {
        let (values, revision) = self.read(keys).await?;
        Ok(keys
            .iter()
            .zip(values)
            .map(|(key, value)| match value {
                Some(kv) => Event::Put(kv),
                None => Event::Delete {
                    key: key.clone(),
                    revision,
                },
            })
            .collect())
    }

    /// `keys` read at one revision, and that revision.
    async fn read(&self, keys: &[String]) -> Result<(Vec<Option<KeyValue>>, Revision), EtcdError> {
        if keys.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let reads: Vec<TxnOp> = keys
            .iter()
            .map(|key| TxnOp::get(self.prefix.full(key), None))
            .collect();
        let read = EtcdTxn::new().and_then(reads);
        let response = self
            .request("get", |client| {
                let read = read.clone();
                async move { client.kv_client().txn(read).await }
            })
            .await?;
        let answers = response.op_responses();
        if answers.len() != keys.len() {
            return Err(self.unexpected("get"));
        }
        let mut out = Vec::with_capacity(keys.len());
        for (key, answer) in keys.iter().zip(answers) {
            let TxnOpResponse::Get(got) = answer else {
                return Err(self.unexpected("get"));
            };
            out.push(got.kvs().first().map(|kv| KeyValue {
                key: key.clone(),
                value: kv.value().to_vec(),
                revision: kv.mod_revision(),
            }));
        }
        let revision = self.header_revision("get", response.header())?;
        Ok((out, revision))
    }

    /// Commits `txn` if every compare holds, as [`MemoryKv::txn`]
    /// (super::kv::MemoryKv::txn) does; leased puts hang on this store's
    /// lease. A malformed transaction is refused without asking etcd.
    pub async fn txn(&self, txn: &Txn) -> Result<Outcome, EtcdError> {
        let Some(plan) = Plan::new(&self.prefix, txn, self.lease) else {
            return Ok(Outcome::Malformed);
        };
        let etcd_txn = plan.into_etcd();
        let response = self
            .request("txn", |client| {
                let etcd_txn = etcd_txn.clone();
                async move { client.kv_client().txn(etcd_txn).await }
            })
            .await?;
        if !response.succeeded() {
            return Ok(Outcome::Conflict);
        }
        let revision = self.header_revision("txn", response.header())?;
        Ok(Outcome::Committed { revision })
    }

    /// The changes under the prefix after revision `after`, in order,
    /// from now on until the receiver is dropped. Reconnects by itself
    /// (from the last revision delivered) when a member dies or loses its
    /// leader; ends with [`WatchItem::Compacted`] when etcd no longer has
    /// the history, or [`WatchItem::Failed`] on an error retrying will not
    /// cure.
    pub async fn watch(&self, after: Revision) -> Result<mpsc::Receiver<WatchItem>, EtcdError> {
        let watcher = Watcher {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            endpoints: self.endpoints.clone(),
            request_timeout: self.request_timeout,
            last: after,
        };
        let stream = watcher.open().await?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_BOUND);
        tokio::spawn(watcher.run(stream, tx));
        Ok(rx)
    }

    /// Runs `request` under the request timeout ([`call`]).
    async fn request<T, Fut>(
        &self,
        request: &'static str,
        attempt: impl FnMut(Client) -> Fut,
    ) -> Result<T, EtcdError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        call(
            request,
            &self.client,
            &self.endpoints,
            self.request_timeout,
            attempt,
        )
        .await
    }

    fn header_revision(
        &self,
        request: &'static str,
        header: Option<&etcd_client::ResponseHeader>,
    ) -> Result<Revision, EtcdError> {
        header
            .map(etcd_client::ResponseHeader::revision)
            .ok_or_else(|| EtcdError::NoHeader {
                request,
                endpoints: self.endpoints.clone(),
            })
    }

    fn unexpected(&self, request: &'static str) -> EtcdError {
        EtcdError::UnexpectedAnswer {
            request,
            endpoints: self.endpoints.clone(),
        }
    }
}

/// Runs one request under `within`, trying again while it fails before
/// reaching etcd; errors name it and the endpoints.
///
/// The client balances requests over every endpoint and keeps choosing a
/// dead member's now and then (its connection fails at once, or after
/// dial-timeout): such a request was never sent, so trying it again is
/// safe even for a transaction, and a dead member out of three costs no
/// failed request. Any other failure is returned as it is: a transaction
/// whose answer was lost may have committed, which only its caller can
/// find out (by reading).
async fn call<T, Fut>(
    request: &'static str,
    client: &Client,
    endpoints: &Endpoints,
    within: Duration,
    mut attempt: impl FnMut(Client) -> Fut,
) -> Result<T, EtcdError>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + within;
    let mut unsent = None;
    loop {
        let failed = match timeout_at(deadline, attempt(client.clone())).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(source)) if never_sent(&source) => source,
            Ok(Err(source)) => {
                return Err(EtcdError::Request {
                    request,
                    endpoints: endpoints.clone(),
                    source,
                })
            }
            Err(_) => break,
        };
        tracing::trace!("etcd {request} did not reach a member, trying again: {failed}");
        unsent = Some(failed);
        if timeout_at(deadline, tokio::time::sleep(UNSENT_RETRY))
            .await
            .is_err()
        {
            break;
        }
    }
    Err(match unsent {
        // The member it last tried says best what is wrong (refused,
        // unreachable).
        Some(source) => EtcdError::Request {
            request,
            endpoints: endpoints.clone(),
            source,
        },
        None => EtcdError::Timeout {
            request,
            after: within,
            endpoints: endpoints.clone(),
        },
    })
}

/// Whether the request failed before a connection to a member existed, so
/// that no member can have seen it: a refused or unreachable connect, at
/// the bottom of the error's chain.
fn never_sent(error: &etcd_client::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = match error {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        etcd_client::Error::TransportError(e) => Some(e),
        _ => None,
    };
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
            );
        }
        cause = e.source();
    }
    false
}

async fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, EtcdError> {
    async fn read(key: &'static str, path: &PathBuf) -> Result<Vec<u8>, EtcdError> {
        tokio::fs::read(path)
            .await
            .map_err(|source| EtcdError::ReadTls {
                key,
                path: path.clone(),
                source,
            })
    }
    let ca = read("etcd-ca", &tls.ca).await?;
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        let cert = read("etcd-cert", cert).await?;
        let key = read("etcd-key", key).await?;
        options = options.identity(Identity::from_pem(cert, key));
    }
    Ok(options)
}

/// The lease's renewal: every third of the TTL, one keep-alive and its
/// answer. A failed renewal is tried again on the next tick (on a new
/// stream); once none has succeeded for a whole TTL the lease counts as
/// lost, as it does at once when etcd answers that it has expired.
struct KeepAlive {
    client: Client,
    lease: i64,
    ttl: Duration,
    request_timeout: Duration,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    lost: watch::Sender<bool>,
}

enum Renewal {
    Alive,
    Gone,
}

async fn keep_alive(mut k: KeepAlive) {
    let period = k.ttl / 3;
    let mut last_renewed = Instant::now();
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match k.renew().await {
            Ok(Renewal::Alive) => last_renewed = Instant::now(),
            Ok(Renewal::Gone) => {
                tracing::warn!(lease = k.lease, "etcd says this server's lease has expired");
                k.lost.send_replace(true);
                return;
            }
            Err(e) => {
                k.stream = None;
                let since = last_renewed.elapsed();
                if since >= k.ttl {
                    tracing::warn!(
                        lease = k.lease,
                        "this server's lease was not renewed for {since:?}: counting it as lost ({e})"
                    );
                    k.lost.send_replace(true);
                    return;
                }
                tracing::debug!(lease = k.lease, "lease renewal failed, trying again: {e}");
            }
        }
    }
}

impl KeepAlive {
    async fn renew(&mut self) -> Result<Renewal, String> {
        // Within one tick, so that a hung member cannot stall the renewals.
        let within = self.request_timeout.min(self.ttl / 3);
        let (keeper, stream) = match &mut self.stream {
            Some(open) => open,
            None => {
                let mut leases = self.client.lease_client();
                match timeout(within, leases.keep_alive(self.lease)).await {
                    Err(_) => return Err(format!("no answer within {within:?}")),
                    // keep_alive() reads etcd's first answer itself and
                    // says this when its TTL is 0: the lease is gone.
                    Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                        return Ok(Renewal::Gone)
                    }
                    Ok(Err(e)) => return Err(e.to_string()),
                    Ok(Ok(opened)) => {
                        // Opening the stream was itself a renewal.
                        self.stream = Some(opened);
                        return Ok(Renewal::Alive);
                    }
                }
            }
        };
        let sent = timeout(within, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match sent {
            Err(_) => Err(format!("no answer within {within:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(None)) => Err("etcd closed the keep-alive stream".into()),
            Ok(Ok(Some(answer))) if answer.ttl() <= 0 => Ok(Renewal::Gone),
            Ok(Ok(Some(_))) => Ok(Renewal::Alive),
        }
    }
}

/// One watch of the prefix, reopened from `last + 1` after each failure.
struct Watcher {
    client: Client,
    prefix: KeyPrefix,
    endpoints: Endpoints,
    request_timeout: Duration,
    /// The last revision delivered (or the one the watch started after).
    last: Revision,
}

impl Watcher {
    async fn open(&self) -> Result<etcd_client::WatchStream, EtcdError> {
        let options = WatchOptions::new()
            .with_range(self.prefix.range_end())
            .with_start_revision(self.last.saturating_add(1));
        let prefix = self.prefix.0.clone();
        call(
            "watch",
            &self.client,
            &self.endpoints,
            self.request_timeout,
            |client| {
                let (prefix, options) = (prefix.clone(), options.clone());
                async move { client.watch_client().watch(prefix, Some(options)).await }
            },
        )
        .await
    }

    async fn run(mut self, first: etcd_client::WatchStream, tx: mpsc::Sender<WatchItem>) {
        let mut stream = Some(first);
        let mut retry = WATCH_RETRY_FIRST;
        loop {
            let current = match stream.take() {
                Some(open) => open,
                None => {
                    tokio::select! {
                        () = tx.closed() => return,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(WATCH_RETRY_MAX);
                    match self.open().await {
                        Ok(open) => open,
                        Err(e) if e.is_transient() => {
                            tracing::debug!(
                                after = self.last,
                                "cannot reopen the etcd watch yet: {e}"
                            );
                            continue;
                        }
                        Err(e) => {
                            let _ = tx.send(WatchItem::Failed(e)).await;
                            return;
                        }
                    }
                }
            };
            match self.follow(current, &tx, &mut retry).await {
                Ended::ReceiverGone => return,
                Ended::Compacted(revision) => {
                    let _ = tx.send(WatchItem::Compacted { revision }).await;
                    return;
                }
                Ended::Broken(reason) => {
                    tracing::debug!(after = self.last, "etcd watch broke, reopening: {reason}");
                }
                Ended::Failed(e) => {
                    let _ = tx.send(WatchItem::Failed(e)).await;
                    return;
                }
            }
        }
    }

    /// Delivers what `stream` brings until it ends.
    async fn follow(
        &mut self,
        mut stream: etcd_client::WatchStream,
        tx: &mpsc::Sender<WatchItem>,
        retry: &mut Duration,
    ) -> Ended {
        loop {
            let message = tokio::select! {
                () = tx.closed() => return Ended::ReceiverGone,
                message = stream.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Ended::Broken("etcd closed the watch stream".into()),
                Err(source) if transient(&source) => return Ended::Broken(source.to_string()),
                Err(source) => {
                    return Ended::Failed(EtcdError::Request {
                        request: "watch",
                        endpoints: self.endpoints.clone(),
                        source,
                    })
                }
            };
            if response.compact_revision() > 0 {
                return Ended::Compacted(response.compact_revision());
            }
            if response.canceled() {
                // Without a compaction, a cancel is the member losing its
                // leader (require-leader) or shutting down: elsewhere, or
                // later, the watch can go on.
                return Ended::Broken(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                ));
            }
            let events = self.events(&response);
            if events.is_empty() {
                continue;
            }
            *retry = WATCH_RETRY_FIRST;
            if let Some(last) = events.last() {
                self.last = last.revision();
            }
            if tx.send(WatchItem::Events(events)).await.is_err() {
                return Ended::ReceiverGone;
            }
        }
    }

    /// The response's events under the prefix, past what was delivered
    /// (a reopened watch never repeats one).
    fn events(&self, response: &etcd_client::WatchResponse) -> Vec<Event> {
        response
            .events()
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                let key = self.prefix.strip(kv.key())?;
                let revision = kv.mod_revision();
                if revision <= self.last {
                    return None;
                }
                Some(match event.event_type() {
                    EventType::Put => Event::Put(KeyValue {
                        key,
                        value: kv.value().to_vec(),
                        revision,
                    }),
                    EventType::Delete => Event::Delete { key, revision },
                })
            })
            .collect()
    }
}

enum Ended {
    ReceiverGone,
    Compacted(Revision),
    Broken(String),
    Failed(EtcdError),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn prefix() -> KeyPrefix {
        KeyPrefix::new("/meshd/m1/").unwrap()
    }

    fn config() -> EtcdConfig {
        EtcdConfig::new(vec!["http://127.0.0.1:2379".into()], "/meshd/m1/")
    }

    #[test]
    fn a_good_config_passes() {
        config().validate().unwrap();
        let mut tls = config();
        tls.endpoints = vec!["https://10.0.0.1:2379".into(), "10.0.0.2:2379".into()];
        tls.tls = Some(EtcdTls {
            ca: "/ca.pem".into(),
            cert: Some("/c.pem".into()),
            key: Some("/k.pem".into()),
        });
        tls.validate().unwrap();
    }

    #[test]
    fn a_config_without_endpoints_is_refused() {
        let mut c = config();
        c.endpoints.clear();
        assert_eq!(c.validate(), Err(ConfigError::NoEndpoints));
        assert!(ConfigError::NoEndpoints
            .to_string()
            .contains("etcd-endpoints"));
    }

    #[test]
    fn an_endpoint_that_is_no_address_is_refused() {
        for bad in [
            "",
            "localhost",
            "http://",
            "http://host:port",
            "ftp://x:1/a",
            "a b:1",
        ] {
            let mut c = config();
            c.endpoints = vec![bad.into()];
            assert_eq!(
                c.validate(),
                Err(ConfigError::BadEndpoint {
                    endpoint: bad.into()
                }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tls_and_the_endpoints_scheme_must_agree() {
        let mut c = config();
        c.endpoints = vec!["https://10.0.0.1:2379".into()];
        assert!(matches!(
            c.validate(),
            Err(ConfigError::HttpsWithoutCa { .. })
        ));
        c.endpoints = vec!["http://10.0.0.1:2379".into()];
        c.tls = Some(EtcdTls {
            ca: "/ca.pem".into(),
            cert: None,
            key: None,
        });
        assert!(matches!(c.validate(), Err(ConfigError::TlsOverHttp { .. })));
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_a_key_its_certificate() {
        let mut c = config();
        c.endpoints = vec!["https://10.0.0.1:2379".into()];
        let tls = |cert: Option<&str>, key: Option<&str>| EtcdTls {
            ca: "/ca.pem".into(),
            cert: cert.map(Into::into),
            key: key.map(Into::into),
        };
        c.tls = Some(tls(Some("/c.pem"), None));
        assert_eq!(c.validate(), Err(ConfigError::CertWithoutKey));
        c.tls = Some(tls(None, Some("/k.pem")));
        assert_eq!(c.validate(), Err(ConfigError::KeyWithoutCert));
    }

    #[test]
    fn the_prefix_must_be_non_empty_and_end_in_a_slash() {
        let mut c = config();
        c.prefix = String::new();
        assert_eq!(c.validate(), Err(ConfigError::EmptyPrefix));
        c.prefix = "/meshd/m1".into();
        let err = c.validate().unwrap_err();
        assert_eq!(
            err,
            ConfigError::PrefixWithoutSlash {
                prefix: "/meshd/m1".into()
            }
        );
        assert!(err.to_string().contains("\"/meshd/m1\""), "{err}");
    }

    #[test]
    fn the_lease_ttl_is_whole_seconds_from_2_to_60() {
        for (secs, millis, ok) in [
            (1, 0, false),
            (2, 0, true),
            (60, 0, true),
            (61, 0, false),
            (5, 500, false),
        ] {
            let mut c = config();
            c.lease_ttl = Duration::from_secs(secs) + Duration::from_millis(millis);
            assert_eq!(c.validate().is_ok(), ok, "{:?}", c.lease_ttl);
        }
    }

    #[test]
    fn zero_timeouts_are_refused_by_name() {
        let mut c = config();
        c.request_timeout = Duration::ZERO;
        assert_eq!(
            c.validate(),
            Err(ConfigError::ZeroTimeout {
                key: "request-timeout"
            })
        );
    }

    #[test]
    fn the_store_section_reads_flat_keys_with_defaults() {
        let c: EtcdConfig = toml::from_str(
            r#"
            etcd-endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
            key-prefix = "/meshd/prod/"
            etcd-ca = "/etc/ca.pem"
            etcd-cert = "/etc/c.pem"
            etcd-key = "/etc/k.pem"
            lease-ttl = "15s"
            "#,
        )
        .unwrap();
        assert_eq!(c.prefix, "/meshd/prod/");
        assert_eq!(c.lease_ttl, Duration::from_secs(15));
        assert_eq!(c.request_timeout, EtcdConfig::DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(
            c.tls,
            Some(EtcdTls {
                ca: "/etc/ca.pem".into(),
                cert: Some("/etc/c.pem".into()),
                key: Some("/etc/k.pem".into()),
            })
        );
        let written = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<EtcdConfig>(&written).unwrap(), c);
    }

    #[test]
    fn the_store_section_refuses_unknown_keys_and_bad_values() {
        let unknown = toml::from_str::<EtcdConfig>(
            "etcd-endpoints = [\"127.0.0.1:2379\"]\nkey-prefix = \"/m/\"\netcd-endpoint = \"x\"\n",
        )
        .unwrap_err();
        assert!(unknown.to_string().contains("etcd-endpoint"), "{unknown}");
        let no_slash = toml::from_str::<EtcdConfig>(
            "etcd-endpoints = [\"127.0.0.1:2379\"]\nkey-prefix = \"/m\"\n",
        )
        .unwrap_err();
        assert!(no_slash.to_string().contains("key-prefix"), "{no_slash}");
        let ttl = toml::from_str::<EtcdConfig>(
            "etcd-endpoints = [\"127.0.0.1:2379\"]\nkey-prefix = \"/m/\"\nlease-ttl = \"soon\"\n",
        )
        .unwrap_err();
        assert!(ttl.to_string().contains("lease-ttl"), "{ttl}");
        let cert = toml::from_str::<EtcdConfig>(
            "etcd-endpoints = [\"127.0.0.1:2379\"]\nkey-prefix = \"/m/\"\netcd-cert = \"/c\"\n",
        )
        .unwrap_err();
        assert!(cert.to_string().contains("etcd-ca"), "{cert}");
    }

    #[test]
    fn keys_are_prefixed_going_in_and_stripped_coming_out() {
        let p = prefix();
        assert_eq!(p.full("nodes/a"), "/meshd/m1/nodes/a");
        assert_eq!(p.strip(b"/meshd/m1/nodes/a").as_deref(), Some("nodes/a"));
        assert_eq!(p.strip(b"/meshd/m2/nodes/a"), None);
        assert_eq!(p.strip(b"/meshd/m1"), None);
        assert_eq!(p.strip(b"/meshd/m1/\xff"), None);
    }

    #[test]
    fn the_prefix_range_covers_its_keys_and_no_other_mesh() {
        let p = prefix();
        let end = p.range_end();
        assert_eq!(end, b"/meshd/m10");
        let inside = |k: &[u8]| k >= p.0.as_bytes() && k < end.as_slice();
        assert!(inside(b"/meshd/m1/"));
        assert!(inside(b"/meshd/m1/\xff\xff"));
        assert!(!inside(b"/meshd/m10/nodes/a"));
        assert!(!inside(b"/meshd/m1"));
    }

    #[test]
    fn absent_is_create_revision_zero_and_unchanged_is_present_at_that_revision() {
        let txn = Txn::new().absent("addrs/1").unchanged("tokens/t", 7);
        let plan = Plan::new(&prefix(), &txn, LeaseId(9)).unwrap();
        assert_eq!(
            plan.checks,
            [
                Check::Exists {
                    key: "/meshd/m1/addrs/1".into(),
                    exists: false
                },
                Check::Exists {
                    key: "/meshd/m1/tokens/t".into(),
                    exists: true
                },
                Check::ModRevision {
                    key: "/meshd/m1/tokens/t".into(),
                    revision: 7
                },
            ]
        );
    }

    #[test]
    fn leased_puts_carry_the_stores_lease_and_plain_ones_none() {
        let txn = Txn::new()
            .put("nodes/a", b"1".to_vec())
            .put_leased("presence/a", b"rv1".to_vec())
            .delete("names/old");
        let plan = Plan::new(&prefix(), &txn, LeaseId(9)).unwrap();
        assert_eq!(
            plan.writes,
            [
                Write::Put {
                    key: "/meshd/m1/nodes/a".into(),
                    value: b"1".to_vec(),
                    lease: None
                },
                Write::Put {
                    key: "/meshd/m1/presence/a".into(),
                    value: b"rv1".to_vec(),
                    lease: Some(LeaseId(9))
                },
                Write::Delete {
                    key: "/meshd/m1/names/old".into()
                },
            ]
        );
        // And etcd's transaction is built without panicking.
        let _ = plan.into_etcd();
    }

    #[test]
    fn a_txn_writing_one_key_twice_has_no_plan() {
        let txn = Txn::new().put("a", vec![]).delete("a");
        assert_eq!(Plan::new(&prefix(), &txn, LeaseId(1)), None);
    }

    #[test]
    fn timeouts_and_unavailability_are_transient_and_config_errors_are_not() {
        let endpoints = Endpoints(vec!["http://127.0.0.1:1".to_owned()].into());
        let timeout = EtcdError::Timeout {
            request: "txn",
            after: Duration::from_secs(1),
            endpoints: endpoints.clone(),
        };
        assert!(timeout.is_transient());
        assert!(
            timeout.to_string().contains("http://127.0.0.1:1"),
            "{timeout}"
        );
        let unavailable = EtcdError::Request {
            request: "txn",
            endpoints,
            source: etcd_client::Error::GRpcStatus(tonic::Status::unavailable("no leader")),
        };
        assert!(unavailable.is_transient());
        assert!(!EtcdError::Config(ConfigError::NoEndpoints).is_transient());
    }
}
