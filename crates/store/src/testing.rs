//! Test support: a real S3-protocol server (`moto_server` from the project's venv) on a free
//! local port, with a bucket created. Used by this crate's and the worker's tests.
//!
//! The binary is `$TUNA_MOTO_SERVER`, else `<workspace>/.venv/bin/moto_server`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::S3Settings;

/// A running `moto_server`; killed when dropped.
pub struct Moto {
    child: Child,
    pub port: u16,
}

/// Where the moto server binary is.
pub fn moto_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TUNA_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/moto_server")
}

impl Moto {
    /// Starts the server and waits (up to 30 s) until it answers.
    pub fn start() -> Result<Moto, String> {
        let bin = moto_server_bin();
        if !bin.exists() {
            return Err(format!(
                "{} not found: run scripts/setup.sh (it installs moto[server] in .venv)",
                bin.display()
            ));
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = moto.child.try_wait() {
                return Err(format!("moto_server exited at start: {status}"));
            }
            if moto.request("GET", "/").is_ok() {
                return Ok(moto);
            }
            if Instant::now() > deadline {
                return Err("moto_server did not answer within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings that reach this server (any credentials work).
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
            session_token: None,
            allow_http: true,
        }
    }

    /// Creates a bucket (path-style `PUT /<bucket>`).
    pub fn create_bucket(&self, bucket: &str) -> Result<(), String> {
        let (status, body) = self.request("PUT", &format!("/{bucket}"))?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("creating bucket {bucket}: HTTP {status}: {body}"))
        }
    }

    fn request(&self, method: &str, path: &str) -> Result<(u16, String), String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port);
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("bad HTTP answer")?;
        Ok((status, out))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
