//! An S3 endpoint that fails the way real object stores do: a proxy in front of moto that passes
//! HTTP requests through, or, while a fault is on and a request matches it, answers
//! `503 SlowDown` itself, resets the connection, or applies the request and never returns the
//! answer. The replica under test is pointed at the proxy with `AWS_ENDPOINT_URL`.
//!
//! HTTP/1.1 clients send a request only after the answer to the previous one, so the proxy can
//! read requests one at a time (head, then `Content-Length` bytes of body) and answer one itself
//! without the server's answers getting out of step.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to a request matching the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `503 SlowDown`, as S3 throttles.
    SlowDown,
    /// The connection is reset (TCP RST) before an answer.
    Reset,
    /// The request reaches the store and is applied; its answer never arrives (connection reset).
    AnswerLost,
}

/// Which requests a fault hits: a method (`PUT`) and a part of the path (`_delta_log`), or all.
#[derive(Debug, Clone, Default)]
pub struct Matching {
    pub method: Option<&'static str>,
    pub path_contains: Option<&'static str>,
}

impl Matching {
    pub fn all() -> Self {
        Self::default()
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.method.is_none_or(|m| m == method)
            && self.path_contains.is_none_or(|p| path.contains(p))
    }
}

#[derive(Default)]
struct State {
    fault: Mutex<Option<(Fault, Matching)>>,
    /// The fault that takes over once `fault` has hit a request.
    then: Mutex<Option<(Fault, Matching)>>,
    /// Requests the fault hit.
    hits: AtomicU64,
    /// Of those, connections reset (`Fault::Reset`).
    resets: AtomicU64,
    /// Requests passed to the store.
    passed: AtomicU64,
    stopped: AtomicBool,
}

pub struct FaultyS3 {
    /// `http://127.0.0.1:<port>`: the endpoint to give the replica.
    pub endpoint: String,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultyS3 {
    /// A proxy in front of the S3 endpoint of the test services (`AWS_ENDPOINT_URL`).
    pub async fn start() -> Self {
        let upstream = std::env::var("AWS_ENDPOINT_URL")
            .expect("AWS_ENDPOINT_URL is not set: run with `make test`");
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream.clone(), shared.clone()));
            }
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            state,
            accept,
        }
    }

    /// From now on, requests matching `matching` meet `fault`.
    pub fn fail(&self, fault: Fault, matching: Matching) {
        *self.state.fault.lock().expect("fault") = Some((fault, matching));
    }

    /// From now on, the first request matching `matching` meets `fault`; every request after it
    /// matching `after` meets `then` (an answer lost as the store goes away).
    pub fn fail_then(&self, fault: Fault, matching: Matching, then: Fault, after: Matching) {
        *self.state.then.lock().expect("fault") = Some((then, after));
        self.fail(fault, matching);
    }

    /// The store answers everything again.
    pub fn heal(&self) {
        *self.state.then.lock().expect("fault") = None;
        *self.state.fault.lock().expect("fault") = None;
    }

    /// Requests a fault has hit so far.
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Connections reset so far (`Fault::Reset`).
    pub fn resets(&self) -> u64 {
        self.state.resets.load(Ordering::SeqCst)
    }

    /// Requests passed to the store so far.
    pub fn passed(&self) -> u64 {
        self.state.passed.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyS3 {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.accept.abort();
    }
}

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
<Message>Please reduce your request rate.</Message></Error>";

/// Serves one client connection, request by request.
async fn relay(client: TcpStream, upstream: String, state: Arc<State>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
    // Set while an answer must not reach the client (`AnswerLost`).
    let swallow = Arc::new(AtomicBool::new(false));
    let (answered_tx, mut answered) = tokio::sync::mpsc::channel::<()>(1);
    let back = client_write.clone();
    let swallowing = swallow.clone();
    let downstream = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if swallowing.load(Ordering::SeqCst) {
                let _ = answered_tx.try_send(());
                continue;
            }
            if back.lock().await.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    });
    let mut reader = BufReader::new(client_read);
    while let Some((head, body)) = read_request(&mut reader).await {
        if state.stopped.load(Ordering::SeqCst) {
            break;
        }
        let mut words = head.split(' ');
        let method = words.next().unwrap_or_default().to_string();
        let path = words.next().unwrap_or_default().to_string();
        let fault = {
            let mut current = state.fault.lock().expect("fault");
            let hit = current
                .as_ref()
                .filter(|(_, m)| m.matches(&method, &path))
                .map(|(f, _)| *f);
            if hit.is_some() {
                if let Some(next) = state.then.lock().expect("fault").take() {
                    *current = Some(next);
                }
            }
            hit
        };
        match fault {
            None => {
                state.passed.fetch_add(1, Ordering::SeqCst);
                if server_write.write_all(head.as_bytes()).await.is_err()
                    || server_write.write_all(&body).await.is_err()
                {
                    break;
                }
            }
            Some(Fault::SlowDown) => {
                state.hits.fetch_add(1, Ordering::SeqCst);
                let answer = format!(
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n\
                     Content-Length: {}\r\n\r\n{SLOW_DOWN}",
                    SLOW_DOWN.len()
                );
                if client_write
                    .lock()
                    .await
                    .write_all(answer.as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Some(Fault::Reset) => {
                state.hits.fetch_add(1, Ordering::SeqCst);
                state.resets.fetch_add(1, Ordering::SeqCst);
                // A TCP reset, not an orderly close: the connection ends with RST.
                let _ = client_write.lock().await.as_ref().set_zero_linger();
                break;
            }
            Some(Fault::AnswerLost) => {
                state.hits.fetch_add(1, Ordering::SeqCst);
                swallow.store(true, Ordering::SeqCst);
                let _ = server_write.write_all(head.as_bytes()).await;
                let _ = server_write.write_all(&body).await;
                // The store applied it once its answer starts; then the connection goes.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(10), answered.recv()).await;
                break;
            }
        }
    }
    downstream.abort();
    // Dropping both halves closes the connection.
}

/// One request: its head (request line and headers, up to the blank line) and its body.
async fn read_request(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> Option<(String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await.ok()?;
    Some((head, body))
}
