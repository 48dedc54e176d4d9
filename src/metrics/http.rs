//! The metrics endpoint: `GET /metrics` over HTTP/1 on `hyper`, with the
//! limits a listener open to a network needs. The only module here that
//! does I/O.
//!
//! One request per connection, a head of at most [`MAX_REQUEST_HEAD`]
//! bytes (hyper's read buffer; 431 past it) within [`HEAD_DEADLINE`],
//! [`CONNECTION_DEADLINE`] for the whole exchange, at most
//! [`MAX_PER_SOURCE`] connections from one source and [`MAX_CONNECTIONS`]
//! in all (more are closed at once, so idle connections from one client
//! can't starve the scrapes of another); 404 for any other path, 405 for any
//! other method than GET, 400 for what does not parse.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A request head (request line and headers) longer than this is refused
/// with 431. hyper's smallest read buffer, which holds the head.
pub const MAX_REQUEST_HEAD: usize = 8 << 10;
/// Connections served at once, all sources together; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections served at once from one source (an IPv4 address or an IPv6
/// /64); more from it are closed at once. A Prometheus server needs one.
pub const MAX_PER_SOURCE: usize = 4;
/// A client has this long to send its request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// A client has this long to send its request and read the answer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// The pause after a failed accept (out of file descriptors, mostly).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// What is read and discarded after the answer, so that a client that sent
/// more than a head (a body nobody asked for, a head past the limit) is not
/// reset before it has read the answer.
const DRAIN_LIMIT: u64 = 64 << 10;
/// The path metrics are served on.
pub const METRICS_PATH: &str = "/metrics";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}{hint}", hint = bind_hint(source))]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there; choose another metrics address)"
        }
        std::io::ErrorKind::AddrNotAvailable => " (not an address of this host)",
        _ => "",
    }
}

/// A refusal, and what the client should do instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An absolute-form or authority-form target: not for this server.
    BadRequest,
    NotFound,
    MethodNotAllowed,
    /// The process could not gather its numbers (it is shutting down).
    Unavailable,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn explanation(self) -> &'static str {
        match self {
            Refusal::BadRequest => "not a request for this server\n",
            Refusal::NotFound => "metrics are at /metrics\n",
            Refusal::MethodNotAllowed => "only GET is served\n",
            Refusal::Unavailable => "metrics unavailable: the process is shutting down\n",
        }
    }
}

/// What a parsed request asks for: the metrics, or a refusal. The path is
/// judged first, so a POST elsewhere is a 404.
pub fn judge(method: &Method, target: &Uri) -> Result<(), Refusal> {
    if target.scheme().is_some() || target.authority().is_some() {
        return Err(Refusal::BadRequest);
    }
    if target.path() != METRICS_PATH {
        Err(Refusal::NotFound)
    } else if method != Method::GET {
        Err(Refusal::MethodNotAllowed)
    } else {
        Ok(())
    }
}

/// Where a connection comes from, as the connection caps count it: an
/// IPv4 address, or an IPv6 /64 (one host usually has a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(std::net::Ipv4Addr),
    V6Prefix(u64),
}

impl Source {
    pub fn of(peer: SocketAddr) -> Self {
        match peer.ip().to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => Source::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

/// The connections being served: at most [`MAX_PER_SOURCE`] per source,
/// [`MAX_CONNECTIONS`] in all.
#[derive(Debug, Default)]
pub struct Serving {
    per_source: HashMap<Source, usize>,
    total: usize,
}

impl Serving {
    /// Takes a slot for a connection from `source`, if one is free.
    pub fn admit(&mut self, source: Source) -> bool {
        let held = self.per_source.get(&source).copied().unwrap_or(0);
        if held >= MAX_PER_SOURCE || self.total >= MAX_CONNECTIONS {
            return false;
        }
        self.per_source.insert(source, held + 1);
        self.total += 1;
        true
    }

    /// Gives back a slot [`Serving::admit`] took.
    pub fn done(&mut self, source: Source) {
        if let Some(held) = self.per_source.get_mut(&source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.per_source.remove(&source);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// The bound metrics listener.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections for ever, answering each scrape with what
    /// `render` returns; `None` answers 503. A connection past
    /// [`MAX_PER_SOURCE`] or [`MAX_CONNECTIONS`] is closed unanswered.
    pub async fn serve<F, Fut>(self, render: F)
    where
        F: Fn() -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Option<String>> + Send + 'static,
    {
        let mut serving = Serving::default();
        let (done_tx, mut done) = mpsc::unbounded_channel::<Source>();
        loop {
            let (stream, peer) = tokio::select! {
                // Slots given back first, so that a client that saw its
                // connection closed finds its slot free.
                biased;
                Some(source) = done.recv() => {
                    serving.done(source);
                    continue;
                }
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let source = Source::of(peer);
            if !serving.admit(source) {
                tracing::trace!(%peer, "metrics connection refused: too many from its source or in all");
                continue;
            }
            let (render, done_tx) = (render.clone(), done_tx.clone());
            tokio::spawn(async move {
                let mut stream = stream;
                if tokio::time::timeout(CONNECTION_DEADLINE, serve_one(&mut stream, render))
                    .await
                    .is_err()
                {
                    tracing::debug!(%peer, "metrics client timed out");
                }
                let _ = done_tx.send(source);
            });
        }
    }
}

/// Serves one request on `io` and closes it: the answer, then the write
/// side shut and what the client still sends read and discarded (up to
/// [`DRAIN_LIMIT`]), so that it reads the answer rather than a reset. A
/// client that sent no head within [`HEAD_DEADLINE`] gets no answer. The
/// caller bounds the time it all takes.
pub async fn serve_one<IO, F, Fut>(io: &mut IO, render: F)
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<String>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let render = render.clone();
        async move { Ok::<_, Infallible>(answer(request, render).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_DEADLINE)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(false)
        // "Content-Type", as the hand-written server wrote it.
        .title_case_headers(true)
        .serve_connection(TokioIo::new(&mut *io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "metrics request not served");
        if e.is_timeout() {
            // No head within the deadline: nothing was answered, nothing
            // to drain; closing frees the slot at once.
            return;
        }
    }
    let _ = io.shutdown().await;
    let _ = tokio::io::copy(&mut (&mut *io).take(DRAIN_LIMIT), &mut tokio::io::sink()).await;
}

async fn answer<F, Fut>(request: Request<Incoming>, render: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    if let Err(refusal) = judge(request.method(), request.uri()) {
        tracing::debug!(status = %refusal.status(), "metrics request refused");
        // Read (a bounded part of) a body nobody asked for, so that the
        // client is not reset before it reads the refusal.
        let _ = Limited::new(request.into_body(), DRAIN_LIMIT as usize)
            .collect()
            .await;
        return refused(refusal);
    }
    match render().await {
        Some(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(super::CONTENT_TYPE));
            response
        }
        None => refused(Refusal::Unavailable),
    }
}

fn refused(refusal: Refusal) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(
        refusal.explanation().as_bytes(),
    )));
    *response.status_mut() = refusal.status();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if refusal == Refusal::MethodNotAllowed {
        headers.insert(ALLOW, HeaderValue::from_static("GET"));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use tokio::net::TcpStream;

    use super::*;

    #[test]
    fn only_get_of_the_metrics_path_is_served_and_everything_else_gets_its_refusal() {
        let cases = [
            ("GET", "/metrics", Ok(())),
            ("GET", "/metrics?name[]=x", Ok(())),
            ("GET", "/", Err(Refusal::NotFound)),
            ("GET", "/metrics/", Err(Refusal::NotFound)),
            ("POST", "/secrets", Err(Refusal::NotFound)),
            ("POST", "/metrics", Err(Refusal::MethodNotAllowed)),
            ("HEAD", "/metrics", Err(Refusal::MethodNotAllowed)),
            ("get", "/metrics", Err(Refusal::MethodNotAllowed)),
            ("GET", "http://x/metrics", Err(Refusal::BadRequest)),
            ("CONNECT", "x:80", Err(Refusal::BadRequest)),
        ];
        for (method, target, expected) in cases {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let target: Uri = target.parse().unwrap();
            assert_eq!(judge(&method, &target), expected, "{method} {target}");
        }
    }

    #[test]
    fn a_source_gets_four_connections_and_all_sources_thirty_two() {
        let mut serving = Serving::default();
        let one = Source::of("192.0.2.1:1000".parse().unwrap());
        for _ in 0..MAX_PER_SOURCE {
            assert!(serving.admit(one));
        }
        assert!(!serving.admit(one), "a fifth from one source is refused");
        // The same host over IPv4-mapped IPv6 is the same source.
        assert!(!serving.admit(Source::of("[::ffff:192.0.2.1]:1".parse().unwrap())));
        // One IPv6 /64 is one source.
        let v6 = |host: u16| Source::of(format!("[2001:db8::{host:x}]:1").parse().unwrap());
        for host in 0..MAX_PER_SOURCE as u16 {
            assert!(serving.admit(v6(host + 1)));
        }
        assert!(!serving.admit(v6(0xff)));
        let mut last = 2;
        while serving.len() < MAX_CONNECTIONS {
            assert!(serving.admit(Source::of(format!("192.0.2.{last}:1").parse().unwrap())));
            last += 1;
        }
        let fresh = Source::of("198.51.100.1:1".parse().unwrap());
        assert!(!serving.admit(fresh), "the 33rd connection is refused");
        serving.done(one);
        assert!(serving.admit(fresh), "a slot given back is free again");
        assert!(!serving.admit(one));
    }

    /// One request over TCP; the whole answer, read to its end.
    async fn request(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    async fn serving(
        render: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let render = Arc::new(render);
        let task = tokio::spawn(server.serve(move || {
            let text = render();
            async move { text }
        }));
        (addr, task)
    }

    #[tokio::test]
    async fn the_server_answers_a_scrape_refuses_the_rest_and_says_when_it_has_no_numbers() {
        let scrapes = Arc::new(AtomicU64::new(0));
        let counter = scrapes.clone();
        let (addr, task) = serving(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            (n == 0).then(|| "x 1\n".to_owned())
        })
        .await;
        let ok = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nx 1\n"),
            "{ok}"
        );
        assert!(
            ok.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{ok}"
        );
        assert!(ok.contains("\r\nConnection: close\r\n"), "{ok}");
        let unavailable = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(unavailable.starts_with("HTTP/1.1 503 "), "{unavailable}");
        let post = request(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("\r\nAllow: GET\r\n"), "{post}");
        assert!(post.ends_with("\r\n\r\nonly GET is served\n"), "{post}");
        let elsewhere = request(addr, b"GET /secrets HTTP/1.1\r\n\r\n").await;
        assert!(elsewhere.starts_with("HTTP/1.1 404 "), "{elsewhere}");
        assert!(
            elsewhere.ends_with("metrics are at /metrics\n"),
            "{elsewhere}"
        );
        let garbage = request(addr, b"hello\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
        let huge = request(addr, &[b'A'; 3 * MAX_REQUEST_HEAD]).await;
        assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
        let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_REQUEST_HEAD + 1, b'a');
        long.extend_from_slice(b"\r\n\r\n");
        let long = request(addr, &long).await;
        assert!(long.starts_with("HTTP/1.1 431 "), "{long}");
        assert_eq!(
            scrapes.load(Ordering::SeqCst),
            2,
            "only the two scrapes rendered"
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_head_is_closed_at_the_head_deadline_and_frees_its_slot() {
        let (addr, task) = serving(|| Some("x 1\n".to_owned())).await;
        let started = tokio::time::Instant::now();
        let mut silent = Vec::new();
        for _ in 0..MAX_PER_SOURCE {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        for stream in &mut silent {
            let mut rest = Vec::new();
            // The server closes without an answer.
            let _ = stream.read_to_end(&mut rest).await;
            assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        }
        // Simulated time: the head deadline closed them, not the
        // connection's.
        let waited = started.elapsed();
        assert!(
            (HEAD_DEADLINE..CONNECTION_DEADLINE).contains(&waited),
            "closed after {waited:?}"
        );
        drop(silent);
        let ok = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 "),
            "the source's slots were given back: {ok}"
        );
        task.abort();
    }
}
