//! A secured cluster, registry and store on this machine, made of real parts:
//! - certificates made with the `openssl` command: a CA, a server certificate for 127.0.0.1,
//!   a client certificate, and a second CA that signed nothing of ours;
//! - stunnel (Debian's `stunnel4`) terminating TLS in front of a plain service, optionally
//!   requiring a client certificate the CA signed (mutual TLS);
//! - a private tansu behind it, with SASL/SCRAM users (tansu 0.6.0 has SCRAM; its own TLS options
//!   are not wired up, hence stunnel). tansu advertises stunnel's port, so every connection a
//!   client opens after bootstrapping is TLS too.
//!
//! A test-broker workaround: tansu 0.6.0 tells clients their SASL session lasts 60 s (KIP-368),
//! but refuses the re-authentication that librdkafka then starts on the same connection
//! ("Unsupported SASL mechanism"), so every connection of a client would drop each minute. A
//! small relay between stunnel and tansu sets the announced lifetime to 0 (no re-authentication),
//! as brokers without `connections.max.reauth.ms` announce. Brokers that do announce a lifetime
//! also accept the re-authentication.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::acl_proxy::read_frame;

const SASL_AUTHENTICATE: i16 = 36;

/// Test certificates, made fresh for each test.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed none of the certificates above.
    pub rogue_ca: PathBuf,
    pub dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command (Debian package openssl; scripts/install-tools.sh)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path();
        for (name, subject) in [
            ("ca", "/CN=strata-test-ca"),
            ("rogue", "/CN=strata-rogue-ca"),
        ] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    subject,
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
        }
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            std::fs::write(
                d.join(format!("{name}.ext")),
                format!(
                    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                     extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                ),
            )
            .expect("write ext");
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN=strata-test-{name}"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        }
        Self {
            ca: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
            rogue_ca: d.join("rogue.pem"),
            dir,
        }
    }
}

/// stunnel accepting TLS on `port` and passing the plain stream to a backend port.
pub struct Tunnel {
    child: Child,
    pub port: u16,
}

impl Tunnel {
    /// With `require_client_certificate`, a client without a certificate the CA signed is refused.
    pub async fn start(pki: &Pki, backend: u16, require_client_certificate: bool) -> Self {
        let stunnel = std::env::var("STRATA_TEST_STUNNEL")
            .ok()
            .filter(|s| !s.is_empty())
            .expect("STRATA_TEST_STUNNEL is not set: run with `make test` (Debian stunnel4)");
        let port = super::free_port();
        let mut config = format!(
            "foreground = yes\npid =\ndebug = 3\n[tunnel]\naccept = 127.0.0.1:{port}\n\
             connect = 127.0.0.1:{backend}\ncert = {}\nkey = {}\n",
            pki.server_cert.display(),
            pki.server_key.display()
        );
        if require_client_certificate {
            config.push_str(&format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                pki.ca.display()
            ));
        }
        let path = pki.dir.path().join(format!("stunnel-{port}.conf"));
        std::fs::write(&path, config).expect("write stunnel config");
        let child = Command::new(stunnel)
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start stunnel");
        wait_port(port).await;
        Self { child, port }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on 127.0.0.1:{port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How clients authenticate to a [`SecuredBroker`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// SASL_SSL with SCRAM-SHA-512 (the user exists in tansu).
    Scram,
    /// SSL with a client certificate stunnel requires; no SASL.
    MutualTls,
}

pub const USER: &str = "strata-svc";
pub const PASSWORD: &str = "scram-pw-9f4c1e7a";

/// A private tansu behind stunnel.
pub struct SecuredBroker {
    tansu: Child,
    tunnel: Tunnel,
    relay: tokio::task::JoinHandle<()>,
    pub brokers: String,
    pub auth: Auth,
    _dir: tempfile::TempDir,
}

fn start_tansu(dir: &Path, port: u16, advertised: u16, authentication: bool) -> Child {
    let tansu = std::env::var("STRATA_TEST_TANSU")
        .expect("STRATA_TEST_TANSU is not set: run with `make test`");
    let mut command = Command::new(tansu);
    command
        .current_dir(dir)
        .arg("broker")
        .arg(format!("--listener-url=tcp://127.0.0.1:{port}"))
        .arg(format!(
            "--advertised-listener-url=tcp://127.0.0.1:{advertised}"
        ))
        .arg("--storage-engine=sqlite://tansu.db")
        .arg("--silent")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if authentication {
        command.arg("--authentication");
    }
    command.spawn().expect("start tansu")
}

impl SecuredBroker {
    pub async fn start(pki: &Pki, auth: Auth) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let port = super::free_port();
        if auth == Auth::Scram {
            // Users are created on a broker without authentication, then the same data folder
            // is served with it.
            let mut open = start_tansu(dir.path(), port, port, false);
            wait_port(port).await;
            let tansu = std::env::var("STRATA_TEST_TANSU").expect("STRATA_TEST_TANSU");
            let output = Command::new(tansu)
                .args([
                    "user",
                    "create",
                    "--broker",
                    &format!("tcp://127.0.0.1:{port}"),
                ])
                .args([USER, PASSWORD, "--mechanism", "scram512"])
                .output()
                .expect("tansu user create");
            assert!(
                output.status.success(),
                "tansu user create: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let _ = open.kill();
            let _ = open.wait();
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                assert!(Instant::now() < deadline, "tansu did not stop");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let relay_port = listener.local_addr().expect("addr").port();
        let relay = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay_without_reauthentication(client, port));
            }
        });
        let tunnel = Tunnel::start(pki, relay_port, auth == Auth::MutualTls).await;
        let tansu = start_tansu(dir.path(), port, tunnel.port, auth == Auth::Scram);
        wait_port(port).await;
        Self {
            tansu,
            relay,
            brokers: format!("127.0.0.1:{}", tunnel.port),
            tunnel,
            auth,
            _dir: dir,
        }
    }

    /// librdkafka properties of a client that gets in, trusting `ca`.
    pub fn client(&self, pki: &Pki) -> Vec<(String, String)> {
        self.client_with(pki, &pki.ca, PASSWORD)
    }

    /// librdkafka properties with another CA file or password (to be refused).
    pub fn client_with(&self, pki: &Pki, ca: &Path, password: &str) -> Vec<(String, String)> {
        let mut properties = vec![("ssl.ca.location", ca.display().to_string())];
        match self.auth {
            Auth::Scram => properties.extend([
                ("security.protocol", "SASL_SSL".to_string()),
                ("sasl.mechanism", "SCRAM-SHA-512".to_string()),
                ("sasl.username", USER.to_string()),
                ("sasl.password", password.to_string()),
            ]),
            Auth::MutualTls => properties.extend([
                ("security.protocol", "SSL".to_string()),
                (
                    "ssl.certificate.location",
                    pki.client_cert.display().to_string(),
                ),
                ("ssl.key.location", pki.client_key.display().to_string()),
            ]),
        }
        properties
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

/// The `STRATA_KAFKA_*` variables that set these librdkafka properties.
pub fn strata_env(properties: &[(String, String)]) -> Vec<(String, String)> {
    properties
        .iter()
        .map(|(k, v)| {
            (
                format!("STRATA_KAFKA_{}", k.to_ascii_uppercase().replace('.', "_")),
                v.clone(),
            )
        })
        .collect()
}

/// Passes frames between a client and tansu, setting `session_lifetime_ms` of SaslAuthenticate
/// answers to 0 (see the module's notes).
async fn relay_without_reauthentication(client: TcpStream, tansu_port: u16) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", tansu_port)).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Correlation id -> version of the SaslAuthenticate requests in flight.
    let pending: Arc<Mutex<HashMap<[u8; 4], i16>>> = Arc::default();
    let seen = pending.clone();
    let downstream = tokio::spawn(async move {
        while let Some(mut frame) = read_frame(&mut server_read).await {
            let version = frame
                .get(4..8)
                .and_then(|c| <[u8; 4]>::try_from(c).ok())
                .and_then(|c| seen.lock().expect("pending").remove(&c));
            // v1: the lifetime is the last field; v2 (flexible) is followed by an empty tag buffer.
            let end = match version {
                Some(1) => Some(frame.len()),
                Some(v) if v >= 2 && frame.last() == Some(&0) => Some(frame.len() - 1),
                _ => None,
            };
            if let Some(end) = end.filter(|end| *end >= 16) {
                frame[end - 8..end].copy_from_slice(&0i64.to_be_bytes());
            }
            if client_write.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    while let Some(frame) = read_frame(&mut client_read).await {
        let api_key = frame.get(4..6).map(|k| i16::from_be_bytes([k[0], k[1]]));
        if api_key == Some(SASL_AUTHENTICATE) {
            if let (Some(version), Some(correlation)) = (
                frame.get(6..8).map(|v| i16::from_be_bytes([v[0], v[1]])),
                frame.get(8..12).and_then(|c| <[u8; 4]>::try_from(c).ok()),
            ) {
                pending
                    .lock()
                    .expect("pending")
                    .insert(correlation, version);
            }
        }
        if server_write.write_all(&frame).await.is_err() {
            break;
        }
    }
    downstream.abort();
}

impl Drop for SecuredBroker {
    fn drop(&mut self) {
        self.relay.abort();
        let _ = self.tansu.kill();
        let _ = self.tansu.wait();
    }
}
