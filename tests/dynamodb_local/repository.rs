//! What is specific to the DynamoDB backend, against DynamoDB Local: the calls each path
//! costs, concurrency, provisioning, namespaces, audit, TTL and the item format.

use crate::dynamo;

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use zae_limiter::clock::ManualClock;
use zae_limiter::repository::dynamodb::{AuditAction, TableError, TableOptions};
use zae_limiter::repository::AdjustRequest;
use zae_limiter::{DynamoDbRepository, Error, Limit, RateLimiter, Repository};

const T0: i64 = 1_700_000_000_000;

async fn admit(acquire: zae_limiter::Acquire) {
    acquire.await.unwrap().commit().await.unwrap();
}

fn frozen(repo: DynamoDbRepository) -> (RateLimiter, ManualClock) {
    let clock = ManualClock::new(T0);
    (
        RateLimiter::builder(repo).clock(clock.clone()).build(),
        clock,
    )
}

/// The raw bucket item, for checks on the stored format.
pub(crate) async fn raw_bucket(
    repo: &DynamoDbRepository,
    entity: &str,
    resource: &str,
) -> Option<std::collections::HashMap<String, AttributeValue>> {
    let pk = format!("{}/BUCKET#{entity}#{resource}#0", repo.namespace_id());
    repo.client()
        .get_item()
        .table_name(repo.table())
        .key("PK", AttributeValue::S(pk))
        .key("SK", AttributeValue::S("#STATE".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
}

pub(crate) fn n(item: &std::collections::HashMap<String, AttributeValue>, attr: &str) -> i64 {
    item.get(attr).unwrap().as_n().unwrap().parse().unwrap()
}

#[tokio::test]
async fn hot_path_is_one_update_item_and_no_read() {
    let (repo, calls) = dynamo::repo_with_counter().await;
    let limiter = RateLimiter::new(repo);
    limiter
        .set_resource_limits(
            "gpt-4",
            &[
                Limit::per_minute("rpm", 1_000),
                Limit::per_minute("tpm", 100_000),
            ],
        )
        .await
        .unwrap();

    // First acquire: the config in one BatchGetItem, then the item is created, checked
    // against its owner's record (absent here) in one transaction, as Python creates.
    calls.reset();
    admit(
        limiter
            .acquire("key-1", "gpt-4")
            .consume([("rpm", 1), ("tpm", 100)]),
    )
    .await;
    assert_eq!(calls.get("BatchGetItem"), 1, "{:?}", calls.snapshot());
    assert_eq!(calls.get("TransactWriteItems"), 1, "{:?}", calls.snapshot());
    assert_eq!(calls.total(), 3, "{:?}", calls.snapshot());

    // Config and item known: exactly one UpdateItem per acquire, no read at all.
    calls.reset();
    for _ in 0..20 {
        admit(
            limiter
                .acquire("key-1", "gpt-4")
                .consume([("rpm", 1), ("tpm", 100)]),
        )
        .await;
    }
    assert_eq!(
        calls.snapshot(),
        [("UpdateItem".to_string(), 20)].into_iter().collect(),
        "one UpdateItem per acquire"
    );
    assert_eq!(calls.max_in_flight(), 1);

    // Adjusting costs one more write at commit (it claims a number of its write lane, so
    // a re-send after a lost response never charges twice).
    calls.reset();
    let lease = limiter
        .acquire("key-1", "gpt-4")
        .consume([("rpm", 1), ("tpm", 100)])
        .await
        .unwrap();
    lease.adjust([("tpm", 150)]).await.unwrap();
    lease.commit().await.unwrap();
    assert_eq!(
        calls.snapshot(),
        [("UpdateItem".to_string(), 2)].into_iter().collect()
    );
    let states = limiter.bucket_states("key-1", "gpt-4").await.unwrap();
    assert_eq!(states["tpm"].total_consumed_milli, (22 * 100 + 150) * 1000);
    assert_eq!(states["rpm"].total_consumed_milli, 22 * 1000);
}

#[tokio::test]
async fn cascade_hot_path_is_two_writes_at_once() {
    let (repo, calls) = dynamo::repo_with_counter().await;
    let limiter = RateLimiter::new(repo);
    limiter.create_entity("proj").await.unwrap();
    limiter
        .create_entity("key-1")
        .parent("proj")
        .cascade(true)
        .await
        .unwrap();
    limiter
        .set_resource_limits("api", &[Limit::per_minute("rpm", 1_000)])
        .await
        .unwrap();
    // Warm-up: configs read, both items created in one transaction.
    admit(limiter.acquire("key-1", "api")).await;

    calls.reset();
    for _ in 0..10 {
        admit(limiter.acquire("key-1", "api")).await;
    }
    assert_eq!(
        calls.snapshot(),
        [("UpdateItem".to_string(), 20)].into_iter().collect(),
        "child and parent: one UpdateItem each"
    );
    assert_eq!(
        calls.max_in_flight(),
        2,
        "the two writes are issued concurrently"
    );
    let parent = limiter.bucket_states("proj", "api").await.unwrap();
    assert_eq!(parent["rpm"].total_consumed_milli, 11_000);
}

#[tokio::test]
async fn cascade_one_sided_failure_is_compensated() {
    let (repo, _calls) = dynamo::repo_with_counter().await;
    let (limiter, _clock) = frozen(repo);
    limiter.create_entity("proj").await.unwrap();
    for k in ["k1", "k2"] {
        limiter
            .create_entity(k)
            .parent("proj")
            .cascade(true)
            .await
            .unwrap();
        limiter
            .set_entity_limits(k, "api", &[Limit::per_minute("rpm", 10)])
            .await
            .unwrap();
    }
    limiter
        .set_entity_limits("proj", "api", &[Limit::per_minute("rpm", 3)])
        .await
        .unwrap();
    admit(limiter.acquire("k1", "api")).await;
    admit(limiter.acquire("k1", "api")).await;
    admit(limiter.acquire("k2", "api")).await;
    // The parent is empty: k2's own write succeeds, the parent's fails, k2 is given back.
    match limiter.acquire("k2", "api").await {
        Err(Error::RateLimited(e)) => {
            assert_eq!(e.primary_violation().entity_id, "proj");
        }
        other => panic!("expected a rejection by the parent, got {other:?}"),
    }
    let k2 = limiter.available("k2", "api", None).await.unwrap();
    assert_eq!(
        k2["rpm"], 9,
        "the child's speculative consumption was compensated"
    );
    let states = limiter.bucket_states("k2", "api").await.unwrap();
    assert_eq!(states["rpm"].total_consumed_milli, 1_000);
}

#[tokio::test]
async fn fast_rejection_then_rejection_cache() {
    // A long max age, so a slow machine between the two rejections changes nothing.
    let calls = zae_limiter::repository::dynamodb::CallCounter::new();
    let repo = dynamo::builder()
        .await
        .rejection_cache_max_age(Duration::from_secs(30))
        .call_counter(calls.clone())
        .build()
        .await
        .unwrap();
    let limiter = RateLimiter::new(repo.clone());
    let limits = [Limit::per_minute("rpm", 2)];
    admit(limiter.acquire("k", "api").limits(limits.clone())).await;
    admit(limiter.acquire("k", "api").limits(limits.clone())).await;

    // Refill cannot help yet: rejected from the failed write's old image, one call.
    calls.reset();
    let first = match limiter.acquire("k", "api").limits(limits.clone()).await {
        Err(Error::RateLimited(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        calls.snapshot(),
        [("UpdateItem".to_string(), 1)].into_iter().collect()
    );
    assert!(first.retry_after() > Duration::from_secs(25));
    assert_eq!(repo.rejection_cache_len(), 1);

    // Within the retry-after: rejected from memory, no call at all.
    calls.reset();
    let second = match limiter.acquire("k", "api").limits(limits.clone()).await {
        Err(Error::RateLimited(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(calls.total(), 0, "{:?}", calls.snapshot());
    assert!(second.retry_after() <= first.retry_after());
    assert!(second.retry_after() + Duration::from_secs(5) >= first.retry_after());

    // Disabled: every rejection asks DynamoDB.
    let calls = zae_limiter::repository::dynamodb::CallCounter::new();
    let repo = dynamo::builder()
        .await
        .rejection_cache_max_age(Duration::ZERO)
        .call_counter(calls.clone())
        .build()
        .await
        .unwrap();
    let limiter = RateLimiter::new(repo);
    admit(
        limiter
            .acquire("k", "api")
            .limits([Limit::per_minute("rpm", 1)]),
    )
    .await;
    calls.reset();
    for _ in 0..3 {
        assert!(limiter
            .acquire("k", "api")
            .limits([Limit::per_minute("rpm", 1)])
            .await
            .is_err());
    }
    assert_eq!(calls.get("UpdateItem"), 3);
}

/// `tasks` tasks each try `rounds` acquire + commit on the entity `entity(task)` names;
/// returns how many were admitted.
async fn hammer(
    limiter: &RateLimiter,
    tasks: usize,
    rounds: usize,
    entity: impl Fn(usize) -> String,
    limits: Option<[Limit; 1]>,
) -> u64 {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (limiter, entity, limits) = (limiter.clone(), entity(t), limits.clone());
        handles.push(tokio::spawn(async move {
            let mut admitted = 0;
            for _ in 0..rounds {
                let mut acquire = limiter.acquire(entity.clone(), "api");
                if let Some(l) = &limits {
                    acquire = acquire.limits(l.clone());
                }
                match acquire.await {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        admitted += 1;
                    }
                    Err(Error::RateLimited(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for h in handles {
        admitted += h.await.unwrap();
    }
    admitted
}

#[tokio::test]
async fn many_tasks_on_one_key_admit_exactly_the_capacity() {
    let (repo, _) = dynamo::repo_with_counter().await;
    let (limiter, _clock) = frozen(repo);
    let limits = [Limit::per_minute("rpm", 50)];
    let admitted = hammer(&limiter, 64, 2, |_| "hot".into(), Some(limits)).await;
    assert_eq!(admitted, 50);
    let states = limiter.bucket_states("hot", "api").await.unwrap();
    assert_eq!(states["rpm"].total_consumed_milli, 50_000);
    assert_eq!(states["rpm"].tokens_milli, 0);
}

/// `proj` with `children` cascading children `k0`, `k1`, ..., under a resource limit
/// of 1,000 a minute.
async fn project_with_children(limiter: &RateLimiter, children: usize) {
    limiter.create_entity("proj").await.unwrap();
    limiter
        .set_resource_limits("api", &[Limit::per_minute("rpm", 1_000)])
        .await
        .unwrap();
    for i in 0..children {
        limiter
            .create_entity(format!("k{i}"))
            .parent("proj")
            .cascade(true)
            .await
            .unwrap();
    }
}

/// What the children `k0`, `k1`, ... of [`project_with_children`] consumed, together.
async fn children_consumed(limiter: &RateLimiter, children: usize) -> i64 {
    let mut total = 0;
    for i in 0..children {
        if let Some(s) = limiter
            .bucket_states(&format!("k{i}"), "api")
            .await
            .unwrap()
            .get("rpm")
        {
            total += s.total_consumed_milli;
        }
    }
    total
}

#[tokio::test]
async fn concurrent_cascades_never_overdraw_the_parent() {
    let (repo, _) = dynamo::repo_with_counter().await;
    let (limiter, _clock) = frozen(repo);
    project_with_children(&limiter, 16).await;
    limiter
        .set_entity_limits("proj", "api", &[Limit::per_minute("rpm", 40)])
        .await
        .unwrap();
    let admitted = hammer(&limiter, 64, 2, |t| format!("k{}", t % 16), None).await;
    assert_eq!(admitted, 40);
    let parent = limiter.bucket_states("proj", "api").await.unwrap();
    assert_eq!(parent["rpm"].total_consumed_milli, 40_000);
    assert_eq!(parent["rpm"].tokens_milli, 0);
    assert_eq!(
        children_consumed(&limiter, 16).await,
        40_000,
        "every compensation landed"
    );
}

/// Tasks of one process whose cascades all take the slow path (new children, a parent
/// idle past its fresh window) take turns on the parent: one transaction each, none lost
/// to a race with a sibling task (racing, all but one of each round would fail and retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascade_slow_paths_of_one_process_take_turns() {
    const TASKS: usize = 24;
    let (repo, calls) = dynamo::repo_with_counter().await;
    let (limiter, clock) = frozen(repo);
    project_with_children(&limiter, TASKS).await;
    for i in 0..TASKS {
        // The child's config cached, so the race below is the writes' alone.
        admit(
            limiter
                .acquire(format!("k{i}"), "api")
                .consume([("rpm", 0)]),
        )
        .await;
    }
    admit(limiter.acquire("proj", "api")).await;
    clock.advance(Duration::from_secs(600));
    calls.reset();
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| tokio::spawn(admit(limiter.acquire(format!("k{i}"), "api"))))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let calls = calls.snapshot();
    assert_eq!(
        calls.get("TransactWriteItems"),
        Some(&(TASKS as u64)),
        "one transaction per acquire: {calls:?}"
    );
    let parent = limiter.bucket_states("proj", "api").await.unwrap();
    assert_eq!(
        parent["rpm"].total_consumed_milli,
        (TASKS as i64 + 1) * 1000
    );
}

/// Cascades queued on their process's turn longer than the operation timeout are dropped:
/// their callers have given up, so they do not write (and roll back) later. Every
/// acquire here needs the slow path; a 50 ms timeout lets only the first few through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_that_does_not_come_in_time_is_not_taken() {
    const TASKS: usize = 64;
    let namespace = dynamo::unique_namespace("turns");
    let setup_repo = dynamo::builder()
        .await
        .namespace(&namespace)
        .build()
        .await
        .unwrap();
    let setup_clock = ManualClock::new(T0);
    let setup = RateLimiter::builder(setup_repo)
        .clock(setup_clock.clone())
        .build();
    project_with_children(&setup, TASKS).await;
    admit(setup.acquire("proj", "api")).await;

    let calls = zae_limiter::repository::dynamodb::CallCounter::new();
    let hurried = dynamo::builder()
        .await
        .namespace(&namespace)
        .timeout(Duration::from_millis(50))
        .call_counter(calls.clone())
        .build()
        .await
        .unwrap();
    // Ten minutes on: the parent's `rf` is stale, so every acquire takes the slow path.
    let clock = ManualClock::new(T0 + 600_000);
    let limiter = RateLimiter::builder(hurried).clock(clock).build();
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                match limiter.acquire(format!("k{i}"), "api").await {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        1
                    }
                    Err(Error::Unavailable { .. }) => 0,
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    // Whatever is still queued or in flight in the background finishes or gives back:
    // until parent and children show exactly what was kept (1.4 to 2.4 s here), for up
    // to 10 s, and a little longer for anything late.
    let kept = (admitted + 1) * 1000;
    for _ in 0..100 {
        let parent = setup.bucket_states("proj", "api").await.unwrap();
        if parent["rpm"].total_consumed_milli == kept
            && children_consumed(&setup, TASKS).await == admitted * 1000
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let transactions = calls
        .snapshot()
        .get("TransactWriteItems")
        .copied()
        .unwrap_or(0);
    assert!(
        transactions < TASKS as u64,
        "acquires queued past the timeout must not transact: {transactions} transactions \
         for {TASKS} acquires ({admitted} admitted)"
    );
    let parent = setup.bucket_states("proj", "api").await.unwrap();
    assert_eq!(
        parent["rpm"].total_consumed_milli, kept,
        "what the parent keeps is exactly what was admitted and committed"
    );
    assert_eq!(children_consumed(&setup, TASKS).await, admitted * 1000);
}

#[tokio::test]
async fn open_is_idempotent_and_safe_when_processes_race() {
    let endpoint = dynamo::endpoint().await;
    let table = format!("race-{}", dynamo::unique_namespace("t"));
    let mut opens = Vec::new();
    for _ in 0..6 {
        let endpoint = endpoint.clone();
        let table = table.clone();
        opens.push(tokio::spawn(async move {
            DynamoDbRepository::builder()
                .endpoint_url(endpoint)
                .table(table)
                .namespace("shared")
                .timeout(Duration::from_secs(10))
                .build()
                .await
                .unwrap()
                .namespace_id()
                .to_string()
        }));
    }
    let mut ids = Vec::new();
    for o in opens {
        ids.push(o.await.unwrap());
    }
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "every opener got the same namespace id: {ids:?}"
    );
    let repo = DynamoDbRepository::builder()
        .endpoint_url(&endpoint)
        .table(&table)
        .namespace("shared")
        .connect()
        .await
        .unwrap();
    let status = repo.table_status().await.unwrap();
    assert_eq!(status.status, "ACTIVE");
    assert!(status.ttl_enabled);
    assert_eq!(status.stream, None, "no stream unless asked for");
    assert_eq!(
        status.schema_version.as_deref(),
        Some(zae_limiter::repository::dynamodb::SCHEMA_VERSION)
    );
    let namespaces = repo.list_namespaces().await.unwrap();
    assert_eq!(namespaces.len(), 1);
    repo.delete_table().await.unwrap();
    let gone = DynamoDbRepository::builder()
        .endpoint_url(&endpoint)
        .table(&table)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(gone, Error::Table(TableError::TableNotFound { .. })),
        "{gone:?}"
    );
}

#[tokio::test]
async fn stream_is_a_table_option() {
    let endpoint = dynamo::endpoint().await;
    let table = format!("stream-{}", dynamo::unique_namespace("t"));
    let repo = DynamoDbRepository::builder()
        .endpoint_url(endpoint)
        .table(&table)
        .table_options(TableOptions {
            stream: true,
            ..TableOptions::default()
        })
        .build()
        .await
        .unwrap();
    assert_eq!(
        repo.table_status().await.unwrap().stream.as_deref(),
        Some("NEW_AND_OLD_IMAGES")
    );
    assert!(repo.capabilities().supports_change_streams);
    repo.delete_table().await.unwrap();
}

#[tokio::test]
async fn connect_only_reads() {
    let endpoint = dynamo::endpoint().await;
    let missing = DynamoDbRepository::builder()
        .endpoint_url(&endpoint)
        .table("no-such-table")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(missing, Error::Table(TableError::TableNotFound { .. })),
        "{missing:?}"
    );
    // The table exists once any test opened it; the namespace does not.
    dynamo::repo_with_counter().await;
    let err = DynamoDbRepository::builder()
        .endpoint_url(&endpoint)
        .table(dynamo::TABLE)
        .namespace("never-registered")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Table(TableError::NamespaceNotFound { .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn namespaces_are_isolated_and_purged() {
    let (a, _) = dynamo::repo_with_counter().await;
    let (b, _) = dynamo::repo_with_counter().await;
    let (la, lb) = (RateLimiter::new(a.clone()), RateLimiter::new(b.clone()));
    la.set_entity_limits("k", "api", &[Limit::per_minute("rpm", 1)])
        .await
        .unwrap();
    la.create_entity("k").await.unwrap();
    admit(la.acquire("k", "api")).await;
    assert!(la.acquire("k", "api").await.is_err());
    // Namespace b sees none of it.
    assert_eq!(lb.get_entity("k").await.unwrap(), None);
    assert_eq!(lb.get_entity_limits("k", "api").await.unwrap(), None);
    admit(lb.acquire("k", "api").limits([Limit::per_minute("rpm", 1)])).await;

    let mut seen = 0;
    let purged = a.purge_namespace(|n| seen = n).await.unwrap();
    assert!(
        purged >= 3,
        "entity, config, bucket and audit records: {purged}"
    );
    assert_eq!(seen, purged);
    let err = DynamoDbRepository::builder()
        .endpoint_url(dynamo::endpoint().await)
        .table(a.table())
        .namespace(a.namespace())
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Table(TableError::NamespaceNotFound { .. })),
        "{err:?}"
    );
    // b is untouched.
    assert!(lb
        .acquire("k", "api")
        .limits([Limit::per_minute("rpm", 1)])
        .await
        .is_err());
}

#[tokio::test]
async fn changes_are_audited_newest_first() {
    let repo = dynamo::builder()
        .await
        .principal("ops@example.com")
        .build()
        .await
        .unwrap();
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .create_entity("k")
        .name("Key")
        .metadata("tier", "gold")
        .await
        .unwrap();
    limiter
        .set_entity_limits("k", "api", &[Limit::per_minute("rpm", 5)])
        .await
        .unwrap();
    limiter.delete_entity_limits("k", "api").await.unwrap();
    limiter
        .set_system_limits(&[Limit::per_minute("rpm", 100)])
        .await
        .unwrap();
    let events = repo.audit_events("k", 10).await.unwrap();
    let actions: Vec<AuditAction> = events.iter().map(|e| e.action.clone()).collect();
    assert_eq!(
        actions,
        [
            AuditAction::LimitsDeleted,
            AuditAction::LimitsSet,
            AuditAction::EntityCreated
        ]
    );
    assert!(events
        .iter()
        .all(|e| e.principal.as_deref() == Some("ops@example.com")));
    assert_eq!(events[1].resource.as_deref(), Some("api"));
    assert_eq!(events[1].details["limits"][0]["capacity"], 5);
    assert_eq!(events[2].details["metadata"]["tier"], "gold");
    assert!(events[0].timestamp_ms >= events[2].timestamp_ms);
    assert_eq!(repo.audit_events("k", 1).await.unwrap().len(), 1);
    let system = repo.audit_events("$SYSTEM", 10).await.unwrap();
    assert_eq!(system[0].action, AuditAction::LimitsSet);
}

#[tokio::test]
async fn ttl_only_on_buckets_with_shared_limits() {
    let (repo, _) = dynamo::repo_with_counter().await;
    let limiter = RateLimiter::new(repo.clone());
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Limits passed by the caller: time to fill (60 s) x 7.
    admit(
        limiter
            .acquire("a", "api")
            .limits([Limit::per_minute("rpm", 10)]),
    )
    .await;
    let item = raw_bucket(&repo, "a", "api").await.unwrap();
    let ttl = n(&item, "ttl");
    assert!(
        (now_s + 420..=now_s + 422).contains(&ttl),
        "ttl {ttl} now {now_s}"
    );
    // A burst takes longer to fill: 100 tokens at 10 a minute is 10 minutes.
    admit(
        limiter
            .acquire("b", "api")
            .limits([Limit::per_minute("rpm", 10).with_burst(100)]),
    )
    .await;
    let ttl = n(&raw_bucket(&repo, "b", "api").await.unwrap(), "ttl");
    assert!((now_s + 4_200..=now_s + 4_210).contains(&ttl), "ttl {ttl}");
    // Limits stored for the entity: kept.
    limiter
        .set_entity_limits("c", "api", &[Limit::per_minute("rpm", 10)])
        .await
        .unwrap();
    admit(limiter.acquire("c", "api")).await;
    assert!(!raw_bucket(&repo, "c", "api")
        .await
        .unwrap()
        .contains_key("ttl"));
    // Limits stored for the entity as its default for every resource: its own, kept too.
    limiter
        .set_entity_limits("d", "_default_", &[Limit::per_minute("rpm", 10)])
        .await
        .unwrap();
    admit(limiter.acquire("d", "api")).await;
    assert!(!raw_bucket(&repo, "d", "api")
        .await
        .unwrap()
        .contains_key("ttl"));
}

#[tokio::test]
async fn item_format_and_foreign_attributes() {
    let (repo, _) = dynamo::repo_with_counter().await;
    let (limiter, clock) = frozen(repo.clone());
    let limits = [
        Limit::per_minute("tok-en.s", 5),
        Limit::per_day("daily", 1_000),
    ];
    for _ in 0..5 {
        admit(limiter.acquire("k", "openai/gpt-4").limits(limits.clone())).await;
    }
    assert!(limiter
        .acquire("k", "openai/gpt-4")
        .limits(limits.clone())
        .await
        .is_err());
    let item = raw_bucket(&repo, "k", "openai/gpt-4").await.unwrap();
    assert_eq!(n(&item, "b_tok-en.s_tk"), 0);
    assert_eq!(n(&item, "b_tok-en.s_cp"), 5_000);
    assert_eq!(n(&item, "b_tok-en.s_rp"), 60_000);
    assert_eq!(n(&item, "b_daily_tc"), 5_000);
    assert_eq!(n(&item, "rf"), T0);
    for key in ["GSI2PK", "GSI3PK", "GSI4PK", "entity_id", "resource"] {
        assert!(item.contains_key(key), "{key}");
    }
    // Attributes of other writers (the Python library's wcu limit, schedules) survive.
    let pk = item["PK"].clone();
    repo.client()
        .update_item()
        .table_name(repo.table())
        .key("PK", pk)
        .key("SK", AttributeValue::S("#STATE".into()))
        .update_expression(
            "SET b_wcu_tk = :w, b_wcu_cp = :w, b_wcu_ra = :w, b_wcu_rp = :p, schedule = :s",
        )
        .expression_attribute_values(":w", AttributeValue::N("1000000".into()))
        .expression_attribute_values(":p", AttributeValue::N("1000".into()))
        .expression_attribute_values(":s", AttributeValue::S("0 0 * * *".into()))
        .send()
        .await
        .unwrap();
    clock.advance(Duration::from_secs(12));
    admit(limiter.acquire("k", "openai/gpt-4").limits(limits.clone())).await;
    let item = raw_bucket(&repo, "k", "openai/gpt-4").await.unwrap();
    assert_eq!(n(&item, "b_wcu_tk"), 1_000_000, "untouched: it was full");
    assert_eq!(item["schedule"].as_s().unwrap(), "0 0 * * *");
    assert_eq!(n(&item, "rf"), T0 + 12_000);
    assert_eq!(
        n(&item, "b_tok-en.s_tk"),
        0,
        "one refilled in 12 s, one consumed"
    );
    // The slow limit's refill is credited when rf moves, exactly: 12 s of 1,000 a day is
    // 138 millitokens plus a remainder of 76,800,000 / 86,400,000 of one, kept in rc.
    assert_eq!(n(&item, "b_daily_tk"), 1_000_000 - 6_000 + 138);
    assert_eq!(n(&item, "b_daily_rc"), 76_800_000);
    assert_eq!(n(&item, "b_daily_tc"), 6_000);
}

#[tokio::test]
async fn adjust_never_creates_a_stub_item() {
    let (repo, calls) = dynamo::repo_with_counter().await;
    for delta in [5, -5] {
        repo.adjust(&AdjustRequest {
            entity_id: "ghost".into(),
            resource: "api".into(),
            deltas: vec![(Limit::per_minute("rpm", 10), delta)],
            now_ms: T0,
            write_id: None,
            counts_only: false,
            shard: Default::default(),
        })
        .await
        .unwrap();
    }
    assert!(raw_bucket(&repo, "ghost", "api").await.is_none());
    assert!(calls.total() >= 2);
}

/// A limit with capacity 0: refused by the constructors, so changed after construction.
fn zero_capacity() -> Limit {
    let mut limit = Limit::per_minute("rpm", 1);
    limit.capacity = 0;
    limit
}

/// A limit named `name`, which the constructors would refuse.
fn named(name: &str) -> Limit {
    let mut limit = Limit::per_minute("rpm", 1);
    limit.name = name.into();
    limit
}

#[tokio::test]
async fn bad_input_never_reaches_dynamodb() {
    let (repo, calls) = dynamo::repo_with_counter().await;
    let limiter = RateLimiter::new(repo);
    calls.reset();
    let bad = [
        limiter
            .acquire("bad#id", "api")
            .limits([Limit::per_minute("rpm", 1)])
            .await
            .err(),
        limiter
            .acquire("k", "bad#res")
            .limits([Limit::per_minute("rpm", 1)])
            .await
            .err(),
        limiter
            .acquire("k", "api")
            .limits([Limit::per_minute("rpm", 1)])
            .consume([("rpm", -1)])
            .await
            .err(),
        limiter
            .acquire("k", "api")
            .limits([zero_capacity()])
            .await
            .err(),
        limiter
            .acquire("k", "api")
            .limits([named("wcu")])
            .await
            .err(),
        limiter
            .set_entity_limits("k", "api", &[named("bad name")])
            .await
            .err(),
        limiter.create_entity("k").parent("p#q").await.err(),
    ];
    for (i, e) in bad.iter().enumerate() {
        let e = e
            .as_ref()
            .unwrap_or_else(|| panic!("case {i} was accepted"));
        assert_eq!(
            e.category(),
            zae_limiter::ErrorCategory::Validation,
            "case {i}: {e}"
        );
    }
    assert!(DynamoDbRepository::builder()
        .endpoint_url(dynamo::endpoint().await)
        .namespace("bad/ns")
        .build()
        .await
        .is_err());
    assert_eq!(calls.total(), 0, "{:?}", calls.snapshot());
}

#[tokio::test]
async fn delete_entity_removes_its_records() {
    let (repo, _) = dynamo::repo_with_counter().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter.create_entity("k").await.unwrap();
    limiter
        .set_entity_limits("k", "api", &[Limit::per_minute("rpm", 5)])
        .await
        .unwrap();
    admit(limiter.acquire("k", "api")).await;
    admit(
        limiter
            .acquire("k", "other")
            .limits([Limit::per_minute("rpm", 5)]),
    )
    .await;
    limiter.delete_entity("k").await.unwrap();
    assert!(raw_bucket(&repo, "k", "api").await.is_none());
    assert!(raw_bucket(&repo, "k", "other").await.is_none());
    assert_eq!(limiter.get_entity_limits("k", "api").await.unwrap(), None);
    assert!(matches!(
        limiter.delete_entity("k").await,
        Err(Error::EntityNotFound { .. })
    ));
}

#[tokio::test]
async fn hot_path_reports_exact_availability() {
    let (repo, calls) = dynamo::repo_with_counter().await;
    let (limiter, clock) = frozen(repo);
    let limits = [Limit::per_minute("rpm", 10)];
    let available = |lease: &zae_limiter::Lease| lease.statuses()[0].available;
    let lease = limiter
        .acquire("k", "api")
        .limits(limits.clone())
        .await
        .unwrap();
    assert_eq!(available(&lease), 10, "created");
    lease.commit().await.unwrap();
    calls.reset();
    let lease = limiter
        .acquire("k", "api")
        .limits(limits.clone())
        .await
        .unwrap();
    assert_eq!(available(&lease), 9, "speculative");
    lease.commit().await.unwrap();
    // 12 s later two tokens have refilled, unwritten. `rf` is then older than the
    // fresh-`rf` window (6 s for 10 a minute): the last image seen shows it, so the
    // rf-locked write that refills first goes out at once, still one call, and the status
    // is exact.
    clock.advance(Duration::from_secs(12));
    let lease = limiter
        .acquire("k", "api")
        .limits(limits.clone())
        .await
        .unwrap();
    assert_eq!(available(&lease), 10);
    assert_eq!(lease.statuses()[0].remaining(), 9);
    lease.commit().await.unwrap();
    assert_eq!(
        calls.snapshot(),
        [("UpdateItem".to_string(), 2)].into_iter().collect()
    );
    // Within the window: the speculative write, one call.
    calls.reset();
    clock.advance(Duration::from_secs(1));
    let lease = limiter
        .acquire("k", "api")
        .limits(limits.clone())
        .await
        .unwrap();
    assert_eq!(available(&lease), 9);
    lease.commit().await.unwrap();
    assert_eq!(calls.get("UpdateItem"), 1, "{:?}", calls.snapshot());
}

/// Waits (on a runtime of its own) until `entity` has `want` tokens of a 10-per-minute
/// limit again.
fn wait_for_refund(limiter: &RateLimiter, entity: &str, want: i64) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let limits = [Limit::per_minute("rpm", 10)];
        for _ in 0..300 {
            let now = limiter
                .available(entity, "api", Some(&limits))
                .await
                .unwrap()["rpm"];
            if now == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the dropped lease of {entity} was not rolled back");
    });
}

#[test]
fn a_lease_dropped_off_any_runtime_rolls_back_without_a_panic() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let limits = [Limit::per_minute("rpm", 10)];
    let (limiter, on_thread, after_shutdown) = runtime.block_on(async {
        let repo = dynamo::builder().await.build().await.unwrap();
        let (limiter, _) = frozen(repo);
        let take = |entity: &'static str| {
            limiter
                .acquire(entity, "api")
                .limits(limits.clone())
                .consume([("rpm", 4)])
        };
        let a = take("a").await.unwrap();
        let b = take("b").await.unwrap();
        (limiter.clone(), a, b)
    });
    // On a thread with no runtime: the SDK's timers and sockets need a reactor, so the
    // rollback gets a runtime of its own instead of panicking.
    std::thread::spawn(move || drop(on_thread))
        .join()
        .expect("dropping a lease off a runtime must not panic");
    wait_for_refund(&limiter, "a", 10);
    // After the runtime that made it shut down.
    drop(runtime);
    drop(after_shutdown);
    wait_for_refund(&limiter, "b", 10);
}

#[tokio::test]
async fn a_limiter_on_a_purged_namespace_fails_with_namespace_not_found() {
    let repo = dynamo::builder()
        .await
        .config_cache_ttl(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let namespace = repo.namespace().to_string();
    let limiter = RateLimiter::new(repo.clone());
    let limits = [Limit::per_minute("rpm", 10)];
    admit(limiter.acquire("k", "api").limits(limits.clone())).await;
    repo.purge_namespace(|_| {}).await.unwrap();
    let err = limiter
        .acquire("k", "api")
        .limits(limits.clone())
        .await
        .unwrap_err();
    match err {
        Error::Table(TableError::NamespaceNotFound { namespace: ns }) => assert_eq!(ns, namespace),
        other => panic!("expected NamespaceNotFound, got {other:?}"),
    }
    // Nothing was written for the purged namespace.
    assert!(raw_bucket(&repo, "k", "api").await.is_none());
}

/// Two processes on one namespace (two repositories: two image caches), one clock. Their
/// rejection caches are off: a process remembers a rejection for up to a second and does
/// not hear of another process's refund meanwhile (documented), which an exact model
/// step by step would count as a difference.
async fn two_processes() -> (RateLimiter, RateLimiter, ManualClock) {
    let namespace = dynamo::unique_namespace("stale");
    let clock = ManualClock::new(T0);
    let mut limiters = Vec::new();
    for _ in 0..2 {
        let repo = dynamo::builder()
            .await
            .namespace(namespace.clone())
            .bucket_ttl_multiplier(0)
            .rejection_cache_max_age(Duration::ZERO)
            .build()
            .await
            .unwrap();
        limiters.push(RateLimiter::builder(repo).clock(clock.clone()).build());
    }
    let b = limiters.pop().unwrap();
    let a = limiters.pop().unwrap();
    (a, b, clock)
}

/// A write that moves `rf` is built from this process's image of the item, which another
/// process's takes (speculative `ADD`s that leave `rf` alone) have made stale. Where the
/// image shows the refill or a credit filling the bucket, the stored tokens may not fill
/// it: the write must not land as computed (it lost the refill and the refund before),
/// but be built again from the item as it is.
#[tokio::test]
async fn writes_from_a_stale_image_credit_exactly() {
    let limits = [Limit::custom("rpm", 7, 3, 10), Limit::per_minute("tpm", 50)];
    let (a, b, clock) = two_processes().await;
    let tokens = |l: &RateLimiter, k: &'static str| {
        let l = l.clone();
        async move { l.bucket_states(k, "api").await.unwrap()["rpm"].tokens_milli }
    };

    // A refund whose image shows it filling the bucket, on tokens another process took.
    let lease = hold(&a, "k1", &limits, [("rpm", 2), ("tpm", 1)]).await;
    let other = hold(&b, "k1", &limits, [("rpm", 2), ("tpm", 1)]).await;
    other.commit().await.unwrap();
    assert_eq!(tokens(&b, "k1").await, 3_000);
    // Past the fresh window: the rollback refills, so it moves `rf`.
    clock.advance(Duration::from_millis(4_000));
    lease.rollback().await.unwrap();
    // 3,000 + 4 s of 0.3 tokens/s (1,200) + the 2,000 given back.
    assert_eq!(tokens(&b, "k1").await, 6_200);

    // A limit the write leaves alone, whose refill the image shows filling the bucket.
    let lease = hold(&a, "k2", &limits, [("rpm", 0), ("tpm", 1)]).await;
    let other = hold(&b, "k2", &limits, [("rpm", 3), ("tpm", 1)]).await;
    other.commit().await.unwrap();
    assert_eq!(tokens(&b, "k2").await, 4_000);
    clock.advance(Duration::from_millis(4_000));
    lease.adjust([("tpm", 1)]).await.unwrap();
    lease.commit().await.unwrap();
    // The refill of `rpm` up to the new `rf` is kept: 4,000 + 1,200.
    assert_eq!(tokens(&b, "k2").await, 5_200);
}

/// An admitted lease on `key` under `limits`, taking `consume`.
async fn hold<const N: usize>(
    limiter: &RateLimiter,
    key: &str,
    limits: &[Limit],
    consume: [(&str, i64); N],
) -> zae_limiter::Lease {
    limiter
        .acquire(key, "api")
        .limits(limits.to_vec())
        .consume(consume)
        .await
        .unwrap()
}

/// The behaviour suite's random lease histories (see `suite::histories`), each step's
/// acquire made by one of two processes on one table: every write is built from an image
/// the other process may have made stale. Fixed seed, waits outside the fresh window.
#[tokio::test]
async fn histories_of_two_processes_on_one_table_match_an_exact_model() {
    let (a, b, clock) = two_processes().await;
    let waits = crate::suite::histories::Waits::OutsideFreshWindow;
    crate::suite::histories::run_fixed(&[a, b], &clock, "p", waits).await;
}

/// A rejection remembered by a process no longer rejects once that process has given
/// tokens back to the item (it used to, for up to a second).
#[tokio::test]
async fn a_refund_clears_the_rejection_it_makes_wrong() {
    let repo = dynamo::builder()
        .await
        .bucket_ttl_multiplier(0)
        .build()
        .await
        .unwrap();
    let (limiter, _clock) = frozen(repo);
    let limits = [Limit::per_minute("rpm", 2)];
    let held = hold(&limiter, "k", &limits, [("rpm", 2)]).await;
    // Rejected, and remembered: the clock stands still, so for the whole max age.
    assert!(matches!(
        limiter.acquire("k", "api").limits(limits.clone()).await,
        Err(Error::RateLimited(_))
    ));
    held.rollback().await.unwrap();
    let lease = limiter
        .acquire("k", "api")
        .limits(limits.clone())
        .await
        .expect("the tokens given back admit at once");
    lease.commit().await.unwrap();
}

/// The lease histories with waits of any length, inside the fresh window too, by two
/// processes on one table: a speculative take may then credit up to the refill over the
/// window that an exact bucket would have discarded while full (DESIGN section 9), so
/// each bucket must hold at least what the exact model holds and at most that much more.
#[tokio::test]
async fn histories_with_any_waits_stay_within_the_fresh_window_bound() {
    let (a, b, clock) = two_processes().await;
    let waits = crate::suite::histories::Waits::Any;
    crate::suite::histories::run_fixed(&[a, b], &clock, "w", waits).await;
}

/// A lease settling at the parameters it was acquired at puts them back on the item in
/// the same millisecond another process wrote new ones: `rf` keeps its value, so that
/// process's image (new parameters, same `rf`) passes the `rf` lock. Its next rf-locked
/// write must still notice the parameters and be rebuilt, not land new-parameter
/// arithmetic on an item stored under the old ones (it used to: tokens above the stored
/// capacity).
#[tokio::test]
async fn a_write_from_an_image_under_other_parameters_is_rebuilt() {
    let (a, b, clock) = two_processes().await;
    let old = [Limit::custom("rpm", 5, 2, 4)];
    let new = [Limit::custom("rpm", 7, 3, 10)];
    let lease = hold(&a, "k", &old, [("rpm", 1)]).await;
    hold(&b, "k", &new, [("rpm", 1)])
        .await
        .commit()
        .await
        .unwrap();
    // Same millisecond: the old parameters go back on with the refund.
    lease.rollback().await.unwrap();
    clock.advance(Duration::from_secs(10));
    hold(&b, "k", &new, [("rpm", 1)])
        .await
        .commit()
        .await
        .unwrap();
    let state = b.bucket_states("k", "api").await.unwrap()["rpm"];
    assert_eq!(state.capacity_milli, 7_000, "{state:?}");
    // 4,000 (5 less the new acquire's 1, as stored under the old parameters) refilled
    // 10 s at the old 0.5/s, capped at the old 5, then the new acquire's 1 taken.
    assert_eq!(state.tokens_milli, 4_000, "{state:?}");
}
