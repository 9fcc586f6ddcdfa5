//! Outages for real: DynamoDB Local not running, or killed mid-run and started again. The
//! repository answers `Unavailable` within its timeout, `Block` rejects (the layer answers
//! 503), `Allow` admits, and everything recovers when DynamoDB returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use tower::ServiceExt;
use zae_limiter::local::{free_port, DynamoDbLocal};
use zae_limiter::middleware::{extract, RateLimitLayer};
use zae_limiter::{DynamoDbRepository, Error, Limit, OnUnavailable, RateLimiter};

const TIMEOUT: Duration = Duration::from_secs(2);

fn rpm() -> Limit {
    Limit::per_minute("rpm", 100)
}

fn app(limiter: &RateLimiter) -> Router {
    Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(limiter.clone())
            .entity(extract::header("x-api-key"))
            .resource(extract::fixed("api"))
            .limits([rpm()]),
    )
}

async fn status(app: &Router) -> StatusCode {
    let req = Request::get("/")
        .header("x-api-key", "k")
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

#[tokio::test]
async fn nothing_listening_is_unavailable_within_the_timeout() {
    let port = free_port().unwrap();
    let started = Instant::now();
    let err = DynamoDbRepository::builder()
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .timeout(TIMEOUT)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(started.elapsed() < TIMEOUT * 3, "{:?}", started.elapsed());
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept"
    );
}

#[tokio::test]
async fn killed_mid_run_then_back() {
    let (disk, mut local, repo) = OnDisk::start("faults", TIMEOUT).await;
    let block = RateLimiter::new(repo.clone());
    let allow = RateLimiter::builder(repo.clone())
        .on_unavailable(OnUnavailable::Allow)
        .build();
    let (block_app, allow_app) = (app(&block), app(&allow));
    assert_eq!(status(&block_app).await, StatusCode::OK);
    block
        .acquire("k", "api")
        .limits([rpm()])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();

    local.stop();

    let started = Instant::now();
    let err = block.acquire("k", "api").limits([rpm()]).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(started.elapsed() < TIMEOUT * 3, "{:?}", started.elapsed());
    assert_eq!(status(&block_app).await, StatusCode::SERVICE_UNAVAILABLE);
    // Allow admits without writing; so does a per-call override.
    let lease = allow.acquire("k", "api").limits([rpm()]).await.unwrap();
    lease.commit().await.unwrap();
    assert_eq!(status(&allow_app).await, StatusCode::OK);
    block
        .acquire("k", "api")
        .limits([rpm()])
        .on_unavailable(OnUnavailable::Allow)
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();

    // DynamoDB returns (same port, same data): everything works again.
    let _local = disk.restart().await;
    let mut recovered = false;
    let mut failed = 0;
    for _ in 0..50 {
        if let Ok(lease) = block.acquire("k", "api").limits([rpm()]).await {
            lease.commit().await.unwrap();
            recovered = true;
            break;
        }
        failed += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "acquires succeed again once DynamoDB is back");
    assert_eq!(status(&block_app).await, StatusCode::OK);
    // Two layer requests and two acquires were admitted and written; the outage wrote
    // nothing that stays: a write that timed out and landed later is found out and its
    // admission given back, in the background.
    let mut consumed = 0;
    for _ in 0..300 {
        let states = block.bucket_states("k", "api").await.unwrap();
        consumed = states["rpm"].total_consumed_milli;
        if consumed == 4_000 && repo.writes_in_doubt() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(consumed, 4_000, "failed attempts {failed}");
}

/// Sends `signal` to DynamoDB Local's whole process group (supervisor and JVM).
fn signal(local: &DynamoDbLocal, signal: i32) {
    let pid = local.pid().expect("a started server has a pid") as i32;
    assert_eq!(unsafe { libc::kill(-pid, signal) }, 0, "signal {signal}");
}

/// A server of our own that keeps its tables on disk, so it can be killed and started
/// again on the same port with the same data.
struct OnDisk {
    dir: std::path::PathBuf,
    port: u16,
}

impl OnDisk {
    /// A fresh folder named for `name` and a free port: the server, warmed up, and a
    /// repository on it with `timeout`.
    async fn start(name: &str, timeout: Duration) -> (Self, DynamoDbLocal, DynamoDbRepository) {
        let dir = std::env::temp_dir().join(format!("zae-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let port = free_port().unwrap();
        let (local, repo) = own_server(timeout, Some(&dir), port).await;
        (OnDisk { dir, port }, local, repo)
    }

    /// The server again, on the same port with the same data.
    async fn restart(&self) -> DynamoDbLocal {
        DynamoDbLocal::builder()
            .port(self.port)
            .db_path(&self.dir)
            .start()
            .await
            .unwrap()
    }
}

impl Drop for OnDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server of our own, warmed up, and a repository on it with `timeout`.
async fn own_server(
    timeout: Duration,
    db: Option<&std::path::Path>,
    port: u16,
) -> (DynamoDbLocal, DynamoDbRepository) {
    let mut builder = DynamoDbLocal::builder().port(port);
    if let Some(dir) = db {
        builder = builder.db_path(dir);
    }
    let local = builder.start().await.unwrap();
    let setup = DynamoDbRepository::builder()
        .endpoint_url(local.endpoint_url())
        .timeout(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let warm = RateLimiter::new(setup);
    for _ in 0..5 {
        let lease = warm.acquire("warm", "api").limits([rpm()]).await.unwrap();
        lease.commit().await.unwrap();
    }
    let repo = DynamoDbRepository::builder()
        .endpoint_url(local.endpoint_url())
        .timeout(timeout)
        .connect()
        .await
        .unwrap();
    (local, repo)
}

#[tokio::test]
async fn a_hung_dynamodb_never_holds_a_caller_past_the_timeout() {
    const LIMIT: Duration = Duration::from_millis(400);
    // Scheduling slack on a loaded two-core machine.
    const SLACK: Duration = Duration::from_millis(300);
    let (local, repo) = own_server(LIMIT, None, free_port().unwrap()).await;
    let limiter = RateLimiter::new(repo.clone());
    let tpm = [Limit::per_minute("tpm", 1_000)];
    let take = |n: u64| {
        limiter
            .acquire("k", "api")
            .limits(tpm.clone())
            .consume([("tpm", n)])
    };
    let to_commit = take(10).await.unwrap();
    to_commit.adjust([("tpm", 5)]).await.unwrap();
    let to_roll_back = take(20).await.unwrap();

    signal(&local, libc::SIGSTOP);
    let mut slowest = Duration::ZERO;
    let mut timed = |what: &str, started: Instant, result: Result<(), Error>| {
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert!(
            matches!(result, Err(Error::Unavailable { .. })),
            "{what}: {result:?}"
        );
        assert!(
            took <= LIMIT + SLACK,
            "{what} took {took:?} with a {LIMIT:?} timeout"
        );
    };
    let started = Instant::now();
    timed("acquire", started, take(30).await.map(|_| ()));
    let started = Instant::now();
    timed("commit", started, to_commit.commit().await);
    let started = Instant::now();
    timed("rollback", started, to_roll_back.rollback().await);
    eprintln!("hung DynamoDB: slowest call {slowest:?} against a timeout of {LIMIT:?}");
    signal(&local, libc::SIGCONT);

    // What the callers gave up on finishes in the background, each write once: the commit
    // lands (15), the rollback lands (0), the late acquire is admitted and given back (0).
    let mut last = None;
    for _ in 0..200 {
        let states = limiter.bucket_states("k", "api").await.unwrap();
        let consumed = states["tpm"].total_consumed_milli;
        if consumed == 15_000 && to_commit.is_closed() && to_roll_back.is_closed() {
            assert_eq!(repo.writes_in_doubt(), 0);
            return;
        }
        last = Some(consumed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("background work did not settle exactly: tc = {last:?} (want 15000)");
}

/// What one task of the load saw.
#[derive(Default)]
struct Tally {
    /// Tokens held by leases that were admitted and committed.
    kept: u64,
    admitted: u64,
    rejected: u64,
    unavailable: u64,
    slowest: Duration,
}

/// Acquires of 1..=3 tokens of a 12,000-a-minute limit, each committed, adjusted then
/// committed, rolled back, or dropped, until told to stop.
async fn load(limiter: RateLimiter, task: u64, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let limits = [Limit::per_minute("tps", 12_000)];
    let mut n = task;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let amount = 1 + n % 3;
        let started = Instant::now();
        let result = limiter
            .acquire("hot", "api")
            .limits(limits.clone())
            .consume([("tps", amount)])
            .await;
        tally.slowest = tally.slowest.max(started.elapsed());
        let lease = match result {
            Ok(lease) => lease,
            Err(Error::RateLimited(_)) => {
                tally.rejected += 1;
                continue;
            }
            Err(Error::Unavailable { .. }) => {
                tally.unavailable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => panic!("{e:?}"),
        };
        tally.admitted += 1;
        if lease.is_unlimited() {
            lease.commit().await.unwrap();
            continue;
        }
        let mut held = amount;
        match n % 4 {
            0 => drop(lease),
            1 => {
                settle(&lease, false, &mut tally).await;
            }
            kind => {
                if kind == 2 {
                    lease.adjust([("tps", 1)]).await.unwrap();
                    held += 1;
                }
                if settle(&lease, true, &mut tally).await {
                    tally.kept += held;
                }
            }
        }
    }
    tally
}

/// Commits (or rolls back) until the outcome is known: true if the lease ended committed.
async fn settle(lease: &zae_limiter::Lease, commit: bool, tally: &mut Tally) -> bool {
    loop {
        let started = Instant::now();
        let result = if commit {
            lease.commit().await
        } else {
            lease.rollback().await
        };
        tally.slowest = tally.slowest.max(started.elapsed());
        match result {
            Ok(()) => return commit,
            // A commit that timed out and landed in the background closed the lease.
            Err(Error::LeaseClosed) => return commit,
            Err(Error::Unavailable { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_under_load_charges_nothing_for_requests_never_admitted() {
    const LIMIT: Duration = Duration::from_millis(500);
    let (disk, mut local, repo) = OnDisk::start("kill-load", LIMIT).await;
    let block = RateLimiter::new(repo.clone());
    let allow = RateLimiter::builder(repo.clone())
        .on_unavailable(OnUnavailable::Allow)
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..16u64 {
        let limiter = if task % 2 == 0 { &block } else { &allow };
        tasks.push((
            task % 2 == 0,
            tokio::spawn(load(limiter.clone(), task, stop.clone())),
        ));
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    local.stop(); // SIGKILL, mid-load
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let _local = disk.restart().await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut kept = 0;
    for (is_block, task) in tasks {
        let t = task.await.unwrap();
        let policy = if is_block { "block" } else { "allow" };
        eprintln!(
            "{policy}: admitted {}, rejected {}, unavailable {}, slowest call {:?} against a \
             timeout of {LIMIT:?}",
            t.admitted, t.rejected, t.unavailable, t.slowest
        );
        assert!(
            t.slowest <= LIMIT + Duration::from_millis(400),
            "{:?}",
            t.slowest
        );
        kept += t.kept;
    }
    // Background work (settles of dropped leases, late admissions given back, writes in
    // doubt) finishes: then the table holds exactly what admitted, committed leases hold.
    let mut consumed = 0;
    for _ in 0..300 {
        let states = block.bucket_states("hot", "api").await.unwrap();
        consumed = states["tps"].total_consumed_milli / 1000;
        if consumed == kept as i64 && repo.writes_in_doubt() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaked = consumed - kept as i64;
    eprintln!("killed under load: kept {kept}, stored {consumed}, charged for requests never admitted: {leaked}");
    // Never below: a refund applied twice would have over-admitted. Above zero only when a
    // refund's answer was lost at the kill and two more writes of its lane landed before
    // anything showed whether it had: it is then taken as landed (its tokens held until
    // they refill). So the leak is bounded by the refunds in flight at the kill: one per
    // task, of at most 3 tokens. Measured: 0 when the machine is idle; 6 and 14 with the
    // tests of this file and a build running beside it.
    assert!(
        leaked >= 0,
        "over-admission: {leaked} tokens refunded twice"
    );
    let bound = 16 * 3;
    assert!(
        leaked <= bound,
        "{leaked} tokens charged for requests never admitted (bound {bound})"
    );
}
