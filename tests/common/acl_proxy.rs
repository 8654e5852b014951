//! A broker that refuses to create topics, as a cluster does to a principal without the CREATE
//! ACL: a private tansu behind a TCP proxy that, while refusing, answers every CreateTopics
//! request with TOPIC_AUTHORIZATION_FAILED, and passes everything else through. Granting the
//! permission turns the refusal off. tansu itself has no ACLs and
//! creates any topic it is asked for, so the refusal has to come from in front of it.
//!
//! The private tansu advertises the proxy's address, so every connection a client opens after
//! bootstrapping goes through the proxy too.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CREATE_TOPICS: i16 = 19;
const TOPIC_AUTHORIZATION_FAILED: i16 = 29;

pub struct RefusingBroker {
    tansu: Child,
    /// What clients connect to (the proxy).
    pub brokers: String,
    /// tansu itself, for producing and reading back without the proxy.
    pub direct: String,
    refusing: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
    proxy: tokio::task::JoinHandle<()>,
}

impl RefusingBroker {
    pub async fn start() -> Self {
        let tansu = std::env::var("STRATA_TEST_TANSU")
            .expect("STRATA_TEST_TANSU is not set: run with `make test`");
        let dir = tempfile::tempdir().expect("dir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy_port = listener.local_addr().expect("addr").port();
        let tansu_port = super::free_port();
        let child = Command::new(tansu)
            .current_dir(dir.path())
            .arg("broker")
            .arg(format!("--listener-url=tcp://127.0.0.1:{tansu_port}"))
            .arg(format!(
                "--advertised-listener-url=tcp://127.0.0.1:{proxy_port}"
            ))
            .arg("--storage-engine=sqlite://tansu.db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", tansu_port)).await.is_err() {
            assert!(Instant::now() < deadline, "private tansu did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let refusing = Arc::new(AtomicBool::new(false));
        let flag = refusing.clone();
        let proxy = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, tansu_port, flag.clone()));
            }
        });
        Self {
            tansu: child,
            brokers: format!("127.0.0.1:{proxy_port}"),
            direct: format!("127.0.0.1:{tansu_port}"),
            refusing,
            _dir: dir,
            proxy,
        }
    }
}

impl RefusingBroker {
    /// From now on, CreateTopics is refused (as without the CREATE ACL).
    pub fn revoke_create(&self) {
        self.refusing.store(true, Ordering::SeqCst);
    }

    /// An operator grants the permission: CreateTopics works again.
    pub fn grant_create(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for RefusingBroker {
    fn drop(&mut self) {
        self.proxy.abort();
        let _ = self.tansu.kill();
        let _ = self.tansu.wait();
    }
}

/// Passes requests to tansu frame by frame, except CreateTopics, which it answers itself.
async fn relay(client: TcpStream, tansu_port: u16, refusing: Arc<AtomicBool>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", tansu_port)).await else {
        return;
    };
    let (mut client_read, client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let client_write = std::sync::Arc::new(tokio::sync::Mutex::new(client_write));
    let back = client_write.clone();
    let downstream = tokio::spawn(async move {
        // Whole response frames, so a refusal written in between never splits one.
        let mut server_read = server_read;
        while let Some(frame) = read_frame(&mut server_read).await {
            if back.lock().await.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    while let Some(frame) = read_frame(&mut client_read).await {
        let answer = if refusing.load(Ordering::SeqCst) {
            refusal(&frame)
        } else {
            None
        };
        match answer {
            Some(answer) => {
                if client_write.lock().await.write_all(&answer).await.is_err() {
                    break;
                }
            }
            None => {
                if server_write.write_all(&frame).await.is_err() {
                    break;
                }
            }
        }
    }
    downstream.abort();
}

/// One length-prefixed Kafka frame, prefix included.
pub(super) async fn read_frame(stream: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).await.ok()?;
    let len = i32::from_be_bytes(size);
    let mut frame = size.to_vec();
    frame.resize(4 + usize::try_from(len).ok()?, 0);
    stream.read_exact(&mut frame[4..]).await.ok()?;
    Some(frame)
}

/// The answer to a CreateTopics request (v0 to v4, what librdkafka sends): every topic refused
/// with TOPIC_AUTHORIZATION_FAILED. `None` for any other request.
fn refusal(frame: &[u8]) -> Option<Vec<u8>> {
    let body = &frame[4..];
    let api_key = i16::from_be_bytes(body.get(0..2)?.try_into().ok()?);
    let version = i16::from_be_bytes(body.get(2..4)?.try_into().ok()?);
    if api_key != CREATE_TOPICS || version > 4 {
        return None;
    }
    let correlation = body.get(4..8)?;
    let client_len = i16::from_be_bytes(body.get(8..10)?.try_into().ok()?);
    let mut at = 10 + usize::try_from(client_len.max(0)).ok()?;
    let count = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    // librdkafka sends one topic per request here; only its name is needed (a second topic's
    // offset would need the rest of the entry parsed).
    let mut names = Vec::new();
    if count >= 1 {
        let len =
            usize::try_from(i16::from_be_bytes(body.get(at..at + 2)?.try_into().ok()?)).ok()?;
        names.push(body.get(at + 2..at + 2 + len)?.to_vec());
    }
    let mut out = correlation.to_vec();
    if version >= 2 {
        out.extend_from_slice(&0i32.to_be_bytes()); // throttle_time_ms
    }
    out.extend_from_slice(&(names.len() as i32).to_be_bytes());
    let message = b"Authorization failed (CREATE on the topic or cluster)";
    for name in names {
        out.extend_from_slice(&(name.len() as i16).to_be_bytes());
        out.extend_from_slice(&name);
        out.extend_from_slice(&TOPIC_AUTHORIZATION_FAILED.to_be_bytes());
        if version >= 1 {
            out.extend_from_slice(&(message.len() as i16).to_be_bytes());
            out.extend_from_slice(message);
        }
    }
    let mut framed = (out.len() as i32).to_be_bytes().to_vec();
    framed.extend_from_slice(&out);
    Some(framed)
}
