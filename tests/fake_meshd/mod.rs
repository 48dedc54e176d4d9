//! A meshd that only answers its local API: one thread on a Unix socket
//! that reads each request line and writes the answer `answer` gives, so
//! that meshctl's side can be tested without root, a TUN device or a mesh.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread::JoinHandle;

use meshd::control::{Envelope, Request, Response};

/// Listens on `socket` and answers `connections` connections, one request
/// each, then stops. Join the handle: an assertion in `answer` fails there.
pub fn serve(
    socket: &Path,
    connections: usize,
    answer: impl Fn(Request) -> Response + Send + 'static,
) -> JoinHandle<()> {
    let listener = UnixListener::bind(socket)
        .unwrap_or_else(|e| panic!("cannot bind the fake meshd at {}: {e}", socket.display()));
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let mut stream = stream.expect("accept meshctl's connection");
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .expect("read meshctl's request");
            let request: Envelope<Request> =
                serde_json::from_str(&line).expect("meshctl's request is API JSON");
            let response = Envelope::new(answer(request.body));
            let line = serde_json::to_string(&response).expect("serialize the answer") + "\n";
            // meshctl may be gone already; that is its test's business.
            let _ = stream.write_all(line.as_bytes());
        }
    })
}
