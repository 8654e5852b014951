//! A private tansu broker a test may kill and start again: on the same data (a broker restart)
//! or on empty storage (a cluster rebuilt, every topic gone), always on the same port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

pub struct PrivateBroker {
    child: Option<Child>,
    /// `127.0.0.1:<port>`, the same across restarts.
    pub brokers: String,
    port: u16,
    dir: tempfile::TempDir,
    /// Which storage generation runs (a new one after `restart_empty`).
    generation: u32,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let port = super::free_port();
        let mut broker = Self {
            child: None,
            brokers: format!("127.0.0.1:{port}"),
            port,
            dir: tempfile::tempdir().expect("dir"),
            generation: 0,
        };
        broker.launch().await;
        broker
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join(format!("data-{}", self.generation))
    }

    async fn launch(&mut self) {
        let tansu = std::env::var("STRATA_TEST_TANSU")
            .expect("STRATA_TEST_TANSU is not set: run with `make test`");
        let data = self.data();
        std::fs::create_dir_all(&data).expect("data dir");
        let child = Command::new(tansu)
            .current_dir(&data)
            .arg("broker")
            .arg(format!("--listener-url=tcp://127.0.0.1:{}", self.port))
            .arg(format!(
                "--advertised-listener-url=tcp://127.0.0.1:{}",
                self.port
            ))
            .arg("--storage-engine=sqlite://tansu.db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "private tansu did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the broker (no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the data it had.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// Starts the broker again on empty storage: every topic and record is gone.
    pub async fn restart_empty(&mut self) {
        self.kill();
        self.generation += 1;
        self.launch().await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
