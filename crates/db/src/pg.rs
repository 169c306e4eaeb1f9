//! A private PostgreSQL cluster, started by tuna when no `DATABASE_URL` is given.
//!
//! - The server binaries are the highest version under `/usr/lib/postgresql/*/bin` (Debian and
//!   Ubuntu), else `pg_config --bindir`, else `PATH`. Without them the error says to install the
//!   `postgresql` package.
//! - `initdb` refuses to run as root. When tuna runs as root (containers, CI) the cluster is
//!   created and run as the unprivileged `postgres` system user (created by Debian's package;
//!   created with `useradd` if missing), which then owns the data directory.
//!   `TUNA_PG_USER` names another account.
//! - The data directory is initialised once (trust authentication for local connections) and
//!   reused by later starts. The server listens on 127.0.0.1 on a free port chosen at each start,
//!   and on a unix socket in the data directory (or in `/tmp/tuna-pg-<hash>` when the data
//!   directory's path is too long for a socket path).
//! - Settings tuna manages live in `tuna.conf` in the data directory (rewritten at each start and
//!   included from `postgresql.conf`).
//! - A server left running by a crashed tuna is adopted; a stale `postmaster.pid` is removed.
//! - [`PrivateCluster::stop`] (or dropping the value) stops the server (`pg_ctl stop -m fast`).

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::{Gid, Pid, Uid, User};
use sha2::{Digest, Sha256};

use crate::{DbError, Result};

/// Name of the database tuna uses inside its private cluster.
pub const DATABASE: &str = "tuna";
/// Superuser created by `initdb` (connections are trusted, there is no password).
pub const SUPERUSER: &str = "postgres";

fn cluster_err(msg: impl Into<String>) -> DbError {
    DbError::Cluster(msg.into())
}

/// Where the PostgreSQL server programs are.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bindir: PathBuf,
}

impl PgBinaries {
    /// Finds `initdb`, `pg_ctl` and `postgres`.
    pub fn find() -> Result<PgBinaries> {
        let has_all = |dir: &Path| {
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|b| dir.join(b).is_file())
        };
        // Debian/Ubuntu layout: /usr/lib/postgresql/<major>/bin; take the highest major.
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                has_all(&bin).then_some((major, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bindir)) = versions.pop() {
            return Ok(PgBinaries { bindir });
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_all(&dir) {
                    return Ok(PgBinaries { bindir: dir });
                }
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if has_all(&dir) {
                    return Ok(PgBinaries { bindir: dir });
                }
            }
        }
        Err(cluster_err(
            "PostgreSQL server programs (initdb, pg_ctl, postgres) were not found in /usr/lib/postgresql/*/bin, \
             `pg_config --bindir` or PATH. Install them (Debian/Ubuntu: `apt-get install postgresql`) \
             or point tuna at an existing server with DATABASE_URL.",
        ))
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// The major version of these binaries (`pg_ctl --version`).
    pub fn major_version(&self) -> Result<u32> {
        let out = Command::new(self.bin("pg_ctl"))
            .arg("--version")
            .output()
            .map_err(|e| DbError::io(format!("running {}", self.bin("pg_ctl").display()), e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "pg_ctl (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"
        text.split_whitespace()
            .find_map(|w| w.split('.').next().and_then(|m| m.parse::<u32>().ok()))
            .ok_or_else(|| {
                cluster_err(format!(
                    "cannot read the PostgreSQL version from `pg_ctl --version`: {text}"
                ))
            })
    }
}

/// The unprivileged account the server runs as (the current user unless that is root).
#[derive(Debug, Clone)]
struct RunAs {
    /// `Some` when we are root and switch to this user for every server command.
    user: Option<(String, Uid, Gid, PathBuf)>,
}

impl RunAs {
    fn detect() -> Result<RunAs> {
        if !Uid::effective().is_root() {
            return Ok(RunAs { user: None });
        }
        let name = std::env::var("TUNA_PG_USER").unwrap_or_else(|_| "postgres".to_string());
        let user = match User::from_name(&name)
            .map_err(|e| cluster_err(format!("looking up user {name}: {e}")))?
        {
            Some(u) => u,
            None => {
                tracing::warn!(user = %name, "creating system user for the private PostgreSQL cluster");
                let status = Command::new("useradd")
                    .args([
                        "--system",
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        &name,
                    ])
                    .status();
                match status {
                    Ok(s) if s.success() => {}
                    _ => {
                        return Err(cluster_err(format!(
                            "tuna runs as root, and PostgreSQL refuses to run as root, so the private cluster runs as the \
                             system user `{name}`; that user does not exist and `useradd {name}` failed. Create it \
                             (`useradd --system {name}`, or install the `postgresql` package which creates `postgres`), \
                             or set DATABASE_URL."
                        )))
                    }
                }
                User::from_name(&name).ok().flatten().ok_or_else(|| {
                    cluster_err(format!("user {name} still missing after useradd"))
                })?
            }
        };
        if user.uid.is_root() {
            return Err(cluster_err(format!(
                "TUNA_PG_USER={name} is root; PostgreSQL must run as an unprivileged user"
            )));
        }
        Ok(RunAs {
            user: Some((name, user.uid, user.gid, user.dir)),
        })
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir("/");
        // Messages in English whatever the locale, and no stray libpq settings of the caller.
        cmd.env("LC_MESSAGES", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        if let Some((name, uid, gid, home)) = &self.user {
            // std drops the supplementary groups when a root process sets a uid.
            cmd.uid(uid.as_raw())
                .gid(gid.as_raw())
                .env("USER", name)
                .env("LOGNAME", name)
                .env("HOME", home);
        }
        cmd
    }

    /// Makes `dir` (created if missing) owned by the server's user, mode 0700.
    fn own_dir(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)
            .map_err(|e| DbError::io(format!("creating {}", dir.display()), e))?;
        if let Some((name, uid, gid, _)) = &self.user {
            nix::unistd::chown(dir, Some(*uid), Some(*gid)).map_err(|e| {
                cluster_err(format!("cannot give {} to user {name}: {e}", dir.display()))
            })?;
            check_reachable(dir, *uid, *gid, name)?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| DbError::io(format!("chmod 700 {}", dir.display()), e))?;
        Ok(())
    }
}

/// Checks that `uid` can walk down to `dir` (every ancestor searchable by it).
fn check_reachable(dir: &Path, uid: Uid, gid: Gid, name: &str) -> Result<()> {
    for anc in dir.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(anc) else {
            continue;
        };
        let mode = meta.mode();
        let ok = if meta.uid() == uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(cluster_err(format!(
                "the private PostgreSQL cluster runs as user `{name}`, which cannot reach {} because {} is not \
                 searchable by it; run `chmod o+x {}` or choose a data directory elsewhere",
                dir.display(),
                anc.display(),
                anc.display()
            )));
        }
    }
    Ok(())
}

fn run_checked(mut cmd: Command, what: &str) -> Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| DbError::io(format!("running {what}"), e))?;
    if !out.status.success() {
        return Err(cluster_err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(out)
}

/// Knobs of a private cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub max_connections: u32,
    /// Turns off fsync and full-page writes: fast, but a machine crash can corrupt the
    /// cluster. Only for throw-away test clusters.
    pub unsafe_fast: bool,
    /// Create the `tuna` database if missing.
    pub create_database: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            max_connections: 100,
            unsafe_fast: false,
            create_database: true,
        }
    }
}

/// Contents of `postmaster.pid`.
#[derive(Debug)]
struct PidFile {
    pid: i32,
    port: u16,
    status: String,
}

fn read_pid_file(data_dir: &Path) -> Option<PidFile> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    Some(PidFile {
        pid: lines.first()?.trim().parse().ok()?,
        port: lines
            .get(3)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0),
        status: lines
            .get(7)
            .map(|l| l.trim().to_string())
            .unwrap_or_default(),
    })
}

/// Whether `pid` is a live `postgres` process.
fn is_postgres_alive(pid: i32) -> bool {
    if pid <= 0 || kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => comm.trim().starts_with("postgres"),
        // No /proc (not Linux): trust kill(0).
        Err(_) => true,
    }
}

/// State of a data directory's server, from its `postmaster.pid`.
enum Running {
    No,
    Ready(u16),
    Starting,
}

fn running_state(data_dir: &Path) -> Running {
    match read_pid_file(data_dir) {
        Some(pf) if is_postgres_alive(pf.pid) => {
            if pf.status == "ready" && pf.port != 0 {
                Running::Ready(pf.port)
            } else {
                Running::Starting
            }
        }
        Some(_) => {
            tracing::info!(dir = %data_dir.display(), "removing stale postmaster.pid");
            let _ = fs::remove_file(data_dir.join("postmaster.pid"));
            Running::No
        }
        None => Running::No,
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the server start retries on a clash).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DbError::io("finding a free port", e))?;
    Ok(l.local_addr()
        .map_err(|e| DbError::io("finding a free port", e))?
        .port())
}

/// URL of `database` on the private cluster of `data_dir` listening on `port`, through its
/// unix socket (see [`PrivateCluster::url_for`]).
pub fn socket_url(data_dir: &Path, port: u16, database: &str) -> String {
    format!(
        "postgres://{SUPERUSER}@localhost:{port}/{database}?host={}",
        percent_encode_path(&socket_dir(data_dir))
    )
}

/// A path as a URL query value: bytes other than ASCII letters, digits and `/._-` as `%XX`.
fn percent_encode_path(path: &Path) -> String {
    let mut out = String::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Directory for the unix socket: the data directory when its path is short enough for a
/// socket path (107 bytes with `/.s.PGSQL.<port>.lock`), else `/tmp/tuna-pg-<hash>`.
fn socket_dir(data_dir: &Path) -> PathBuf {
    if data_dir.as_os_str().len() <= 80 {
        return data_dir.to_path_buf();
    }
    let hash = hex::encode(Sha256::digest(data_dir.as_os_str().as_encoded_bytes()));
    PathBuf::from(format!("/tmp/tuna-pg-{}", &hash[..12]))
}

fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A private PostgreSQL server this process started (or adopted) and stops when dropped.
#[derive(Debug)]
pub struct PrivateCluster {
    data_dir: PathBuf,
    port: u16,
    bins: PgBinaries,
    run_as: RunAs,
    opts: ClusterOptions,
    stopped: bool,
}

impl PrivateCluster {
    /// Starts (creating it if needed) a cluster in `data_dir` with default options.
    pub fn start(data_dir: &Path) -> Result<PrivateCluster> {
        Self::start_with(data_dir, &ClusterOptions::default())
    }

    /// Starts (creating it if needed) a cluster in `data_dir`.
    pub fn start_with(data_dir: &Path, opts: &ClusterOptions) -> Result<PrivateCluster> {
        let bins = PgBinaries::find()?;
        let run_as = RunAs::detect()?;
        fs::create_dir_all(data_dir)
            .map_err(|e| DbError::io(format!("creating {}", data_dir.display()), e))?;
        let data_dir = fs::canonicalize(data_dir)
            .map_err(|e| DbError::io(format!("resolving {}", data_dir.display()), e))?;
        let mut cluster = PrivateCluster {
            data_dir,
            port: 0,
            bins,
            run_as,
            opts: opts.clone(),
            stopped: true,
        };
        cluster.init_if_needed()?;
        cluster.write_conf()?;
        cluster.start_server()?;
        cluster.stopped = false;
        if opts.create_database {
            cluster.create_database(DATABASE)?;
        }
        Ok(cluster)
    }

    /// Connection URL of the `tuna` database.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    /// Connection URL of another database on this server, through its unix socket: local
    /// connections over a unix socket cost both sides less CPU than over loopback TCP
    /// (BENCHMARKS.md, control plane). libpq and sqlx both read `host=<socket directory>`.
    /// [`PrivateCluster::tcp_url_for`] gives the same database over 127.0.0.1.
    pub fn url_for(&self, database: &str) -> String {
        socket_url(&self.data_dir, self.port, database)
    }

    /// Connection URL of a database on this server over TCP on 127.0.0.1.
    pub fn tcp_url_for(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn init_if_needed(&self) -> Result<()> {
        let dir = &self.data_dir;
        let version_file = dir.join("PG_VERSION");
        if version_file.exists() {
            let have = fs::read_to_string(&version_file)
                .unwrap_or_default()
                .trim()
                .to_string();
            let bin_major = self.bins.major_version()?;
            if have != bin_major.to_string() {
                return Err(cluster_err(format!(
                    "the private cluster in {} was created by PostgreSQL {have}, but the installed server is \
                     PostgreSQL {bin_major}; dump and remove that directory (or install PostgreSQL {have})",
                    dir.display()
                )));
            }
            // Ownership may have been lost (copied directory, different run-as user).
            self.run_as.own_dir(dir)?;
            if let Some((_, uid, gid, _)) = &self.run_as.user {
                if fs::metadata(dir)
                    .map(|m| m.uid() != uid.as_raw())
                    .unwrap_or(false)
                {
                    chown_recursive(dir, *uid, *gid)?;
                }
            }
            return Ok(());
        }
        let non_empty = fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if non_empty {
            return Err(cluster_err(format!(
                "{} is not empty but holds no PostgreSQL cluster (no PG_VERSION); choose an empty directory",
                dir.display()
            )));
        }
        self.run_as.own_dir(dir)?;
        tracing::info!(dir = %dir.display(), "initialising private PostgreSQL cluster");
        let mut cmd = self.run_as.command(&self.bins.bin("initdb"));
        cmd.arg("-D").arg(dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        ]);
        run_checked(cmd, "initdb")?;
        // Everything tuna manages goes to tuna.conf, rewritten at every start.
        let conf = dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf)
            .map_err(|e| DbError::io(format!("reading {}", conf.display()), e))?;
        text.push_str("\n# Settings managed by tuna (rewritten at each start).\ninclude_if_exists = 'tuna.conf'\n");
        fs::write(&conf, text)
            .map_err(|e| DbError::io(format!("writing {}", conf.display()), e))?;
        Ok(())
    }

    fn write_conf(&mut self) -> Result<()> {
        let opts = self.opts.clone();
        if let Running::Ready(port) = running_state(&self.data_dir) {
            // Adopting a running server: keep its settings.
            self.port = port;
            return Ok(());
        }
        let sock = socket_dir(&self.data_dir);
        if sock != self.data_dir {
            self.run_as.own_dir(&sock)?;
        }
        self.port = free_port()?;
        // autovacuum_naptime: claimed jobs leave dead entries at the head of the queue index
        // that every claim steps over until vacuum removes them; checking every 5 s instead of
        // every minute made draining a 12,700-job backlog 4.6x faster (BENCHMARKS.md).
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = {}\nmax_connections = {}\n\
             logging_collector = off\nlog_min_messages = warning\nautovacuum_naptime = 5s\n",
            self.port,
            conf_quote(&sock.to_string_lossy()),
            opts.max_connections,
        );
        if opts.unsafe_fast {
            conf.push_str(
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 64MB\nlog_checkpoints = off\n",
            );
        }
        let path = self.data_dir.join("tuna.conf");
        fs::write(&path, conf)
            .map_err(|e| DbError::io(format!("writing {}", path.display()), e))?;
        if let Some((_, uid, gid, _)) = &self.run_as.user {
            let _ = nix::unistd::chown(&path, Some(*uid), Some(*gid));
        }
        Ok(())
    }

    fn start_server(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match running_state(&self.data_dir) {
                Running::Ready(port) => {
                    self.port = port;
                    return Ok(());
                }
                Running::Starting => {
                    if Instant::now() > deadline {
                        return Err(cluster_err(format!(
                            "the PostgreSQL server in {} did not become ready within 60 s; see {}",
                            self.data_dir.display(),
                            self.log_path().display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Running::No => {}
            }
            let mut cmd = self.run_as.command(&self.bins.bin("pg_ctl"));
            cmd.arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "-s", "start"]);
            match run_checked(cmd, "pg_ctl start") {
                Ok(_) => {}
                Err(e) => {
                    // A port taken between choosing and binding: choose another once.
                    let log = fs::read_to_string(self.log_path()).unwrap_or_default();
                    if log.contains("could not bind") && Instant::now() < deadline {
                        let _ = fs::write(self.log_path(), "");
                        self.write_conf()?;
                        continue;
                    }
                    let tail: String = log
                        .lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    return Err(cluster_err(format!(
                        "{e}\nserver log ({}):\n{tail}",
                        self.log_path().display()
                    )));
                }
            }
            if let Running::Ready(port) = running_state(&self.data_dir) {
                self.port = port;
            }
            tracing::info!(port = self.port, dir = %self.data_dir.display(), "private PostgreSQL started");
            return Ok(());
        }
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("server.log")
    }

    /// Runs `sql` with `psql` as the superuser against `database` (no libpq client needed in
    /// this crate's sync code).
    fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let mut cmd = self.run_as.command(&self.bins.bin("psql"));
        cmd.args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            SUPERUSER,
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .arg("-d")
        .arg(database)
        .arg("-c")
        .arg(sql);
        let out = run_checked(cmd, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates `name` if it does not exist.
    pub fn create_database(&self, name: &str) -> Result<()> {
        let exists = self.psql(
            "postgres",
            &format!(
                "select 1 from pg_database where datname = '{}'",
                name.replace('\'', "''")
            ),
        )?;
        if exists != "1" {
            let sql = format!("create database \"{}\"", name.replace('"', "\"\""));
            if let Err(e) = self.psql("postgres", &sql) {
                // Someone else created it meanwhile.
                if !e.to_string().contains("already exists") {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Gives up ownership without stopping the server (it keeps running after this process).
    pub fn leave_running(mut self) {
        self.stopped = true;
    }

    /// Stops the server (`pg_ctl stop -m fast`). Also done on drop.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        stop_dir(&self.bins, &self.run_as, &self.data_dir)
    }
}

fn stop_dir(bins: &PgBinaries, run_as: &RunAs, data_dir: &Path) -> Result<()> {
    if let Running::No = running_state(data_dir) {
        return Ok(());
    }
    let mut cmd = run_as.command(&bins.bin("pg_ctl"));
    cmd.arg("-D")
        .arg(data_dir)
        .args(["-m", "fast", "-w", "-t", "60", "-s", "stop"]);
    run_checked(cmd, "pg_ctl stop")?;
    tracing::info!(dir = %data_dir.display(), "private PostgreSQL stopped");
    Ok(())
}

/// Stops the server of `data_dir` if one is running there (used for the shared test cluster).
pub fn stop_data_dir(data_dir: &Path) -> Result<()> {
    if !data_dir.join("PG_VERSION").exists() {
        return Ok(());
    }
    stop_dir(&PgBinaries::find()?, &RunAs::detect()?, data_dir)
}

/// Whether a server is running (ready) for `data_dir`, and its port.
pub fn running_port(data_dir: &Path) -> Option<u16> {
    match running_state(data_dir) {
        Running::Ready(p) => Some(p),
        _ => None,
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the private PostgreSQL cluster failed");
        }
    }
}

fn chown_recursive(dir: &Path, uid: Uid, gid: Gid) -> Result<()> {
    let _ = nix::unistd::chown(dir, Some(uid), Some(gid));
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DbError::io(format!("reading {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            chown_recursive(&path, uid, gid)?;
        } else {
            let _ = nix::unistd::fchownat(
                None,
                &path,
                Some(uid),
                Some(gid),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
    }
    Ok(())
}

/// `DATABASE_URL` when set (the cluster is then `None`); otherwise starts the private cluster in
/// `data_dir` and returns its URL with the cluster, which must be kept alive while in use.
pub async fn database_url_or_private(data_dir: &Path) -> Result<(String, Option<PrivateCluster>)> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.trim().is_empty() {
            return Ok((url, None));
        }
    }
    let dir = data_dir.to_path_buf();
    let cluster = tokio::task::spawn_blocking(move || PrivateCluster::start(&dir))
        .await
        .map_err(|e| cluster_err(format!("starting the private cluster panicked: {e}")))??;
    Ok((cluster.url(), Some(cluster)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_dirs_are_percent_encoded_in_urls() {
        assert_eq!(
            percent_encode_path(Path::new("/tmp/a b/é+x_y-z.1")),
            "/tmp/a%20b/%C3%A9%2Bx_y-z.1"
        );
    }

    #[test]
    fn long_data_dirs_get_a_short_socket_dir() {
        let short = Path::new("/var/lib/tuna/pg");
        assert_eq!(socket_dir(short), short);
        let long = PathBuf::from(format!("/{}", "x".repeat(120)));
        let s = socket_dir(&long);
        assert!(
            s.to_string_lossy().starts_with("/tmp/tuna-pg-") && s.as_os_str().len() < 40,
            "{}",
            s.display()
        );
    }

    #[test]
    fn quotes_conf_values() {
        assert_eq!(conf_quote("/a/b"), "'/a/b'");
        assert_eq!(conf_quote("it's"), "'it''s'");
    }
}
