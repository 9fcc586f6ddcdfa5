//! `local start|stop|status`: DynamoDB Local in the background, through
//! `zae_limiter::local`. Each server started is recorded in a state file (one per port) so
//! `stop` ends exactly the process `start` started, and nothing else.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use zae_limiter::local::{self, DynamoDbLocal};

use crate::args::LocalCommand;
use crate::failure::{Failure, Outcome, ERROR};
use crate::output::Out;

/// What `start` records about a server it left running.
#[derive(Debug, Serialize, Deserialize)]
struct Started {
    pid: u32,
    port: u16,
    endpoint_url: String,
    db_path: Option<PathBuf>,
    log_file: PathBuf,
}

/// Where state files live: `$ZAE_LOCAL_STATE_DIR`, else `servers` beside the install.
fn state_dir() -> PathBuf {
    std::env::var_os("ZAE_LOCAL_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let install = local::cache_dir();
            install
                .parent()
                .map(|p| p.join("servers"))
                .unwrap_or_else(|| install.join("servers"))
        })
}

fn state_file(port: u16) -> PathBuf {
    state_dir().join(format!("dynamodb-local-{port}.json"))
}

fn recorded() -> Vec<Started> {
    let Ok(entries) = std::fs::read_dir(state_dir()) else {
        return Vec::new();
    };
    let mut all: Vec<Started> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    all.sort_by_key(|s| s.port);
    all
}

fn answering(port: u16) -> bool {
    TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )
    .is_ok()
}

pub async fn run(command: LocalCommand, out: Out) -> Outcome {
    match command {
        LocalCommand::Start { port, db_path } => start(port, db_path, out).await,
        LocalCommand::Stop { port } => stop(port, out),
        LocalCommand::Status => {
            status(out);
            Ok(())
        }
    }
}

fn print_started(started: &Started, already: bool, out: Out) {
    let export = format!("export AWS_ENDPOINT_URL={}", started.endpoint_url);
    let storage = match &started.db_path {
        Some(dir) => format!("tables in {}", dir.display()),
        None => "in memory".into(),
    };
    let first = if already {
        "DynamoDB Local is already running"
    } else {
        "DynamoDB Local is running"
    };
    out.message(
        format!(
            "{first} on {} (pid {}, {storage}).\nUse it with:\n  {export}\nStop it with: zae-limiter local stop --port {}",
            started.endpoint_url, started.pid, started.port
        ),
        json!({
            "endpoint_url": started.endpoint_url,
            "port": started.port,
            "pid": started.pid,
            "db_path": started.db_path,
            "log_file": started.log_file,
            "export": export,
            "already_running": already,
        }),
    );
}

async fn start(port: u16, db_path: Option<PathBuf>, out: Out) -> Outcome {
    if let Ok(bytes) = std::fs::read(state_file(port)) {
        if let Ok(started) = serde_json::from_slice::<Started>(&bytes) {
            if local::is_running(started.pid) {
                print_started(&started, true, out);
                return Ok(());
            }
        }
        let _ = std::fs::remove_file(state_file(port));
    }
    if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
        return Err(Failure::new(
            ERROR,
            format!("port {port} is already in use by another program"),
        )
        .hint("pick another with --port"));
    }
    let mut builder = DynamoDbLocal::builder().port(port).detached(true);
    if let Some(dir) = &db_path {
        builder = builder.db_path(dir);
    }
    let server = builder.start().await?;
    let started = Started {
        pid: server.pid().unwrap_or_default(),
        port,
        endpoint_url: server.endpoint_url().to_string(),
        db_path: db_path.map(|d| std::path::absolute(&d).unwrap_or(d)),
        log_file: server.log_file().to_path_buf(),
    };
    let save = std::fs::create_dir_all(state_dir()).and_then(|()| {
        std::fs::write(
            state_file(port),
            serde_json::to_vec_pretty(&started).unwrap_or_default(),
        )
    });
    if let Err(e) = save {
        // Without a record, `stop` could not find it: do not leave it running.
        drop(server);
        return Err(Failure::new(
            ERROR,
            format!("cannot record the server in {}: {e}", state_dir().display()),
        )
        .hint("set ZAE_LOCAL_STATE_DIR to a writable folder"));
    }
    server.detach();
    print_started(&started, false, out);
    Ok(())
}

fn stop(port: Option<u16>, out: Out) -> Outcome {
    let all = recorded();
    let target = match port {
        Some(p) => all.into_iter().find(|s| s.port == p).ok_or_else(|| {
            Failure::new(
                ERROR,
                format!("no DynamoDB Local started by zae-limiter is recorded on port {p}"),
            )
            .hint("`zae-limiter local status` lists the ones it started")
        })?,
        None => {
            let mut all = all;
            match all.len() {
                0 => {
                    return Err(Failure::new(
                        ERROR,
                        "no DynamoDB Local started by zae-limiter is recorded",
                    )
                    .hint("start one with `zae-limiter local start`"))
                }
                1 => all.remove(0),
                _ => {
                    let ports: Vec<String> = all.iter().map(|s| s.port.to_string()).collect();
                    return Err(Failure::bad_arguments(format!(
                        "several DynamoDB Local servers are recorded (ports {})",
                        ports.join(", ")
                    ))
                    .hint("say which with --port"));
                }
            }
        }
    };
    let stopped = local::stop_detached(target.pid)?;
    let _ = std::fs::remove_file(state_file(target.port));
    let sentence = if stopped {
        format!(
            "Stopped DynamoDB Local on {} (pid {}).",
            target.endpoint_url, target.pid
        )
    } else {
        format!(
            "DynamoDB Local on {} (pid {}) was no longer running; removed its record.",
            target.endpoint_url, target.pid
        )
    };
    out.message(
        sentence,
        json!({ "port": target.port, "pid": target.pid, "stopped": stopped }),
    );
    Ok(())
}

fn status(out: Out) {
    let all = recorded();
    if all.is_empty() && !out.json() {
        println!("No DynamoDB Local started by zae-limiter is recorded.");
        return;
    }
    let rows = all
        .iter()
        .map(|s| {
            let running = local::is_running(s.pid);
            vec![
                json!(s.port),
                json!(s.pid),
                json!(running && answering(s.port)),
                json!(s.endpoint_url),
                json!(s.db_path.as_ref().map(|d| d.display().to_string())),
            ]
        })
        .collect();
    out.table(&["port", "pid", "running", "endpoint_url", "db_path"], rows);
}
