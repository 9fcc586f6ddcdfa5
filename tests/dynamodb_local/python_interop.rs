//! One table shared live with the Python zae-limiter 0.17.0 (from PyPI), on DynamoDB
//! Local: each side opens the other's table through its normal path, enforces what the
//! other stored, and reads the other's records.

use std::collections::HashMap;

use serde_json::{json, Value};
use zae_limiter::repository::dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use zae_limiter::repository::dynamodb::{AuditAction, SCHEMA_VERSION};
use zae_limiter::{DynamoDbRepository, Limit, RateLimiter};

use crate::{dynamo, python};

/// A Rust repository on the shared table, in a fresh namespace, and the fields that point
/// the Python driver at the same place.
async fn shared() -> (DynamoDbRepository, Value) {
    let repo = dynamo::builder()
        .await
        .build()
        .await
        .expect("open the test repository");
    let place = json!({
        "endpoint": dynamo::endpoint().await,
        "table": repo.table(),
        "namespace": repo.namespace(),
    });
    (repo, place)
}

/// `place` with the command's own fields.
fn command(place: &Value, fields: Value) -> Value {
    let mut cmd = place.clone();
    for (k, v) in fields.as_object().unwrap() {
        cmd[k] = v.clone();
    }
    cmd
}

/// The key of a record of the repository's namespace (`partition` after the namespace id).
fn record_key(
    repo: &DynamoDbRepository,
    partition: &str,
    sk: &str,
) -> HashMap<String, AttributeValue> {
    HashMap::from([
        (
            "PK".to_string(),
            AttributeValue::S(format!("{}/{partition}", repo.namespace_id())),
        ),
        ("SK".to_string(), AttributeValue::S(sk.to_string())),
    ])
}

/// Changes a record directly, as the Python library (or an older release of this crate)
/// writes it: `update` with `#a` naming `attr` and `:v` the value, when given.
async fn raw_update(
    repo: &DynamoDbRepository,
    key: HashMap<String, AttributeValue>,
    update: &str,
    attr: Option<&str>,
    value: Option<AttributeValue>,
) {
    repo.client()
        .update_item()
        .table_name(repo.table())
        .set_key(Some(key))
        .update_expression(update)
        .set_expression_attribute_names(
            attr.map(|a| HashMap::from([("#a".to_string(), a.to_string())])),
        )
        .set_expression_attribute_values(value.map(|v| HashMap::from([(":v".to_string(), v)])))
        .send()
        .await
        .unwrap();
}

fn ok(answer: &Value) {
    assert!(answer.get("error").is_none(), "Python failed: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_opens_a_table_this_crate_created() {
    let (_repo, place) = shared().await;
    let version = dynamo::builder()
        .await
        .connect_table()
        .await
        .unwrap()
        .schema_version()
        .await
        .unwrap();
    assert_eq!(version.as_deref(), Some(SCHEMA_VERSION));
    ok(&python::run(command(&place, json!({"op": "open"}))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_acquires_for_an_entity_this_crate_created() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo);
    limiter.create_entity("k1").await.unwrap();
    limiter
        .set_entity_limits("k1", "api", &[Limit::per_hour("rph", 10)])
        .await
        .unwrap();
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "k1", "resource": "api", "consume": {"rph": 1}, "n": 25}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 10, "{answer}");
    assert_eq!(answer["outcomes"]["rejected"], 15, "{answer}");
    // And Python's consumption is ours to enforce: nothing is left.
    assert_eq!(
        limiter.available("k1", "api", None).await.unwrap()["rph"],
        0
    );
    let entity = python::run(command(&place, json!({"op": "get_entity", "entity": "k1"}))).await;
    assert_eq!(entity["entity"]["id"], "k1", "{entity}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_crate_enforces_entities_and_limits_python_stored() {
    let (repo, place) = shared().await;
    for cmd in [
        json!({"op": "create_entity", "entity": "proj"}),
        json!({"op": "create_entity", "entity": "key", "parent": "proj", "cascade": true}),
        json!({"op": "set_limits", "level": "entity", "entity": "key", "resource": "api",
               "limits": [["rpm", 5, 5, 60]]}),
        json!({"op": "set_limits", "level": "entity", "entity": "proj", "resource": "api",
               "limits": [["rpm", 3, 3, 60]]}),
    ] {
        ok(&python::run(command(&place, cmd)).await);
    }
    let limiter = RateLimiter::new(repo);
    let key = limiter.get_entity("key").await.unwrap().unwrap();
    assert_eq!(key.parent_id.as_deref(), Some("proj"));
    assert!(key.cascade);
    assert!(key.created_at_ms > 1_600_000_000_000, "{key:?}");
    // The cascade charges the parent, whose limit (3) is the tighter one.
    let mut admitted = 0;
    for _ in 0..6 {
        if let Ok(lease) = limiter.acquire("key", "api").await {
            lease.commit().await.unwrap();
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_interleave_in_time_order_on_both_sides() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter.create_entity("e1").await.unwrap();
    ok(&python::run(command(
        &place,
        json!({"op": "set_limits", "level": "entity", "entity": "e1", "resource": "api",
               "limits": [["rpm", 5, 5, 60]]}),
    ))
    .await);
    limiter
        .set_entity_limits("e1", "api", &[Limit::per_minute("rpm", 7)])
        .await
        .unwrap();
    let ours = repo.audit_events("e1", 10).await.unwrap();
    let actions: Vec<&AuditAction> = ours.iter().map(|e| &e.action).collect();
    assert_eq!(
        actions,
        [
            &AuditAction::LimitsSet,
            &AuditAction::LimitsSet,
            &AuditAction::EntityCreated
        ],
        "newest first, whoever wrote them"
    );
    assert!(ours
        .windows(2)
        .all(|w| w[0].timestamp_ms >= w[1].timestamp_ms));
    assert!(ours.iter().all(|e| e.timestamp_ms > 1_600_000_000_000));
    let theirs = python::run(command(&place, json!({"op": "audit", "entity": "e1"}))).await;
    ok(&theirs);
    let ids: Vec<&str> = theirs["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    let our_ids: Vec<&str> = ours.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, our_ids, "{theirs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_table_of_this_crate_is_read_then_migrated_for_python() {
    use zae_limiter::repository::dynamodb::LEGACY_SCHEMA_VERSION;
    let table = format!("legacy-{}", dynamo::unique_namespace("t"));
    let builder = || async {
        DynamoDbRepository::builder()
            .endpoint_url(dynamo::endpoint().await)
            .table(&table)
            .namespace("default")
    };
    let repo = builder().await.build().await.unwrap();
    // The version record as this crate wrote it before it followed Python's scheme.
    let s = |v: &str| AttributeValue::S(v.to_string());
    repo.client()
        .put_item()
        .table_name(&table)
        .item("PK", s("_/SYSTEM#"))
        .item("SK", s("#VERSION"))
        .item("schema_version", s(LEGACY_SCHEMA_VERSION))
        .item("client_version", s("0.1.0"))
        .item("client_min_version", s("0.0.0"))
        .item("updated_at", AttributeValue::N("1764000000000".into()))
        .item("updated_by", s("zae-limiter-rs/0.1.0"))
        .send()
        .await
        .unwrap();
    let place =
        json!({"endpoint": dynamo::endpoint().await, "table": table, "namespace": "default"});
    // Python refuses it (its major is not 0); this crate still reads it without writing.
    let refused = python::run(command(&place, json!({"op": "open"}))).await;
    assert_eq!(refused["error"], "IncompatibleSchemaError", "{refused}");
    builder()
        .await
        .connect()
        .await
        .expect("connect reads a legacy table");
    let admin = builder().await.connect_table().await.unwrap();
    assert_eq!(
        admin.schema_version().await.unwrap().as_deref(),
        Some(LEGACY_SCHEMA_VERSION)
    );
    // `build` (as `zae-limiter deploy`) migrates it; then Python opens it.
    builder().await.build().await.unwrap();
    assert_eq!(
        admin.schema_version().await.unwrap().as_deref(),
        Some(SCHEMA_VERSION)
    );
    ok(&python::run(command(&place, json!({"op": "open"}))).await);
    repo.delete_table().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_takes_its_one_call_fast_path_on_buckets_this_crate_created() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .set_resource_limits("api", &[Limit::per_minute("rpm", 1_000_000)])
        .await
        .unwrap();
    // This crate creates the bucket and writes it a few times.
    for _ in 0..3 {
        limiter
            .acquire("k1", "api")
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "k1", "resource": "api", "consume": {"rpm": 1},
               "n": 20, "warmup": 2, "config_cache_ttl": 60}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 20, "{answer}");
    let calls: u64 = answer["calls"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    eprintln!("Python on a bucket this crate created: {calls} calls for 20 acquires: {answer}");
    assert_eq!(calls, 20, "one UpdateItem per acquire: {answer}");
    // And the accounting is shared: 3 + 2 + 20 taken.
    let states = limiter.bucket_states("k1", "api").await.unwrap();
    assert_eq!(states["rpm"].total_consumed_milli, 25_000);
    // Both sides keep Python's write accounting: every write after the create (2 of ours,
    // 22 of Python's) took one write unit of the item's `wcu`.
    let item = crate::repository::raw_bucket(&repo, "k1", "api")
        .await
        .unwrap();
    assert_eq!(crate::repository::n(&item, "b_wcu_tc"), 24_000, "{item:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_charges_the_parent_on_a_cascading_bucket_this_crate_created() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo);
    limiter.create_entity("proj").await.unwrap();
    limiter
        .create_entity("key")
        .parent("proj")
        .cascade(true)
        .await
        .unwrap();
    limiter
        .set_entity_limits("key", "api", &[Limit::per_hour("rph", 10)])
        .await
        .unwrap();
    limiter
        .set_entity_limits("proj", "api", &[Limit::per_hour("rph", 3)])
        .await
        .unwrap();
    // This crate creates both buckets (the child's stamped with its cascade and parent).
    limiter
        .acquire("key", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    // Python's fast path on the child must charge the parent too: 2 left there.
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "key", "resource": "api", "consume": {"rph": 1}, "n": 5}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 2, "{answer}");
    let parent = limiter.bucket_states("proj", "api").await.unwrap();
    assert_eq!(parent["rph"].total_consumed_milli, 3_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_libraries_hammering_one_bucket_never_over_admit() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo);
    // 600 an hour: one token every 6 s, so the run refills only a few.
    let rph = Limit::per_hour("rph", 600);
    limiter
        .set_resource_limits("api", std::slice::from_ref(&rph))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let python = tokio::spawn(python::run(command(
        &place,
        json!({"op": "acquire", "entity": "hot", "resource": "api", "consume": {"rph": 1},
               "n": 500, "tasks": 4, "config_cache_ttl": 60}),
    )));
    // Paced, so both clients are at it at once: Python takes a second to start.
    let mut rust = Vec::new();
    for _ in 0..4 {
        let limiter = limiter.clone();
        rust.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            while started.elapsed() < std::time::Duration::from_secs(12) {
                match limiter.acquire("hot", "api").await {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        admitted += 1;
                    }
                    Err(zae_limiter::Error::RateLimited(_)) => {}
                    Err(e) => panic!("{e:?}"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            admitted
        }));
    }
    let mut ours = 0;
    for task in rust {
        ours += task.await.unwrap();
    }
    let answer = python.await.unwrap();
    ok(&answer);
    let theirs = answer["outcomes"]["admitted"].as_u64().unwrap_or(0);
    let refill = started.elapsed().as_secs() / 6 + 1;
    eprintln!("one bucket, both libraries: this crate admitted {ours}, Python {theirs}, capacity 600 (+{refill} refill at most): {answer}");
    assert!(ours > 0 && theirs > 0, "both took part");
    assert!(ours + theirs >= 600, "the capacity was there to take");
    assert!(ours + theirs <= 600 + refill, "over-admission");
    let states = limiter.bucket_states("hot", "api").await.unwrap();
    assert_eq!(
        states["rph"].total_consumed_milli,
        (ours + theirs) as i64 * 1000,
        "tc counts exactly what was admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_python_disabled_is_refused_with_a_typed_error_and_a_403() {
    use axum::body::Body;
    use axum::routing::get;
    use http::{Request, StatusCode};
    use tower::ServiceExt;
    use zae_limiter::middleware::{extract, RateLimitLayer};
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .set_resource_limits("api", &[Limit::per_minute("rpm", 100)])
        .await
        .unwrap();
    // The bucket exists and the limiter's config cache holds "enabled".
    limiter
        .acquire("k1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let answer = python::run(command(
        &place,
        json!({"op": "disable_resource", "resource": "api"}),
    ))
    .await;
    ok(&answer);
    // The cached config is stale, but the bucket's stamp refuses the write.
    for _ in 0..3 {
        let err = limiter.acquire("k1", "api").await.unwrap_err();
        assert!(
            matches!(&err, zae_limiter::Error::ResourceDisabled { resource, .. } if resource == "api"),
            "{err:?}"
        );
    }
    // A fresh limiter reads the flag from the config, before any write; the layer
    // answers 403 with a JSON body.
    let fresh = RateLimiter::new(repo);
    let err = fresh.acquire("k2", "api").await.unwrap_err();
    assert!(
        matches!(err, zae_limiter::Error::ResourceDisabled { .. }),
        "{err:?}"
    );
    let app = axum::Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(
            RateLimitLayer::new(fresh.clone())
                .entity(extract::header("x-api-key"))
                .resource(extract::fixed("api")),
        );
    let resp = app
        .oneshot(
            Request::get("/")
                .header("x-api-key", "k3")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("resource_disabled"));
    // Enabled again by Python: admitted again (fresh limiter; the stamps are removed).
    ok(&python::run(command(
        &place,
        json!({"op": "enable_resource", "resource": "api"}),
    ))
    .await);
    RateLimiter::builder_shared(fresh.repository().clone())
        .build()
        .acquire("k1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_this_crate_does_not_enforce_yet_fail_closed() {
    let (repo, _place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .set_entity_limits("k1", "api", &[Limit::per_minute("rpm", 5)])
        .await
        .unwrap();
    // As the Python library marks a schedule, and a reset_after quota, in the entity's config.
    let config = || record_key(&repo, "ENTITY#k1", "#CONFIG#api");
    for (attr, value, feature) in [
        (
            "l_rpm_sched",
            AttributeValue::S("1h9-17s500".into()),
            "schedules",
        ),
        (
            "w_s_cp",
            AttributeValue::N("50".into()),
            "reset_after quotas",
        ),
    ] {
        raw_update(&repo, config(), "SET #a = :v", Some(attr), Some(value)).await;
        let fresh = RateLimiter::builder_shared(limiter.repository().clone())
            .config_cache_ttl(std::time::Duration::ZERO)
            .build();
        let err = fresh.acquire("k1", "api").await.unwrap_err();
        assert!(
            matches!(&err, zae_limiter::Error::Unsupported { feature: f, .. } if f == feature),
            "{attr}: {err:?}"
        );
        raw_update(&repo, config(), "REMOVE #a", Some(attr), None).await;
    }
    // Explicit limits are the caller's numbers: no stored feature applies to them.
    limiter
        .acquire("k1", "api")
        .limits([Limit::per_minute("rpm", 5)])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_lists_the_resources_this_crate_configured() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo);
    let rpm = [Limit::per_minute("rpm", 5)];
    limiter.set_resource_limits("api", &rpm).await.unwrap();
    limiter.set_resource_limits("chat", &rpm).await.unwrap();
    limiter.set_entity_limits("k1", "chat", &rpm).await.unwrap();
    limiter.set_entity_limits("k2", "chat", &rpm).await.unwrap();
    limiter
        .set_entity_limits("k1", "_default_", &rpm)
        .await
        .unwrap();
    // Setting again is no new config: counted once.
    limiter.set_entity_limits("k1", "chat", &rpm).await.unwrap();
    let listed = python::run(command(&place, json!({"op": "registries"}))).await;
    ok(&listed);
    assert_eq!(listed["resources"], json!(["api", "chat"]), "{listed}");
    assert_eq!(
        listed["entity_config_resources"],
        json!(["_default_", "chat"]),
        "{listed}"
    );
    // Deleting takes them out again, the count of `chat` only with its last config.
    limiter.delete_resource_limits("api").await.unwrap();
    limiter.delete_entity_limits("k1", "chat").await.unwrap();
    limiter
        .delete_entity_limits("k1", "_default_")
        .await
        .unwrap();
    let listed = python::run(command(&place, json!({"op": "registries"}))).await;
    assert_eq!(listed["resources"], json!(["chat"]), "{listed}");
    assert_eq!(
        listed["entity_config_resources"],
        json!(["chat"]),
        "{listed}"
    );
    limiter.delete_entity_limits("k2", "chat").await.unwrap();
    let listed = python::run(command(&place, json!({"op": "registries"}))).await;
    assert_eq!(listed["entity_config_resources"], json!([]), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_record_from_before_is_migrated_on_read_for_python() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter.create_entity("old").await.unwrap();
    limiter
        .set_entity_limits("old", "api", &[Limit::per_hour("rph", 4)])
        .await
        .unwrap();
    // The record as this crate wrote it before: a number for `created_at`, no pgen/pinc.
    let key = record_key(&repo, "ENTITY#old", "#META");
    raw_update(
        &repo,
        key.clone(),
        "SET created_at = :v REMOVE pgen, pinc",
        None,
        Some(AttributeValue::N("1764000000000".into())),
    )
    .await;
    // Reading the entity's config (any acquire) rewrites it in the background.
    let reader = RateLimiter::builder_shared(limiter.repository().clone())
        .config_cache_ttl(std::time::Duration::ZERO)
        .build();
    reader
        .acquire("old", "api")
        .consume([("rph", 0)])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let mut migrated = false;
    for _ in 0..50 {
        let item = repo
            .client()
            .get_item()
            .table_name(repo.table())
            .set_key(Some(key.clone()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap();
        if matches!(item.get("created_at"), Some(AttributeValue::S(_))) && item.contains_key("pinc")
        {
            migrated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(migrated, "the record was not rewritten");
    assert_eq!(
        reader
            .get_entity("old")
            .await
            .unwrap()
            .unwrap()
            .created_at_ms,
        1_764_000_000_000
    );
    // Python, which could not create this entity's buckets before, now can.
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "old", "resource": "chat", "consume": {"rph": 1},
               "limits": [["rph", 4, 4, 3600]], "n": 6}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 4, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_refuses_a_resource_this_crate_disabled() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo);
    limiter
        .set_resource_limits("api", &[Limit::per_minute("rpm", 100)])
        .await
        .unwrap();
    let acquire = json!({"op": "acquire", "entity": "k1", "resource": "api",
                         "consume": {"rpm": 1}, "n": 2});
    let answer = python::run(command(&place, acquire.clone())).await;
    assert_eq!(answer["outcomes"]["admitted"], 2, "{answer}");
    // Disabled here: the config flag and the stamp on the bucket Python created.
    assert_eq!(limiter.disable_resource("api").await.unwrap(), 1);
    let answer = python::run(command(&place, acquire.clone())).await;
    assert_eq!(answer["outcomes"]["ResourceDisabled"], 2, "{answer}");
    assert_eq!(limiter.enable_resource("api").await.unwrap(), 1);
    let answer = python::run(command(&place, acquire)).await;
    assert_eq!(answer["outcomes"]["admitted"], 2, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypass_this_crate_wrote_is_honoured_by_python_and_counted_by_both() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .set_resource_limits("api", &[Limit::per_hour("rph", 2)])
        .await
        .unwrap();
    limiter
        .acquire("k1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    assert_eq!(limiter.bypass_resource("api").await.unwrap(), 1);
    // Stored as Python stores it: the flag, a deadline stamp, the raised client minimum.
    let item = crate::repository::raw_bucket(&repo, "k1", "api")
        .await
        .unwrap();
    assert!(item.contains_key("bypass") && !item.contains_key("disabled"));
    let version = repo
        .client()
        .get_item()
        .table_name(repo.table())
        .key("PK", AttributeValue::S("_/SYSTEM#".into()))
        .key("SK", AttributeValue::S("#VERSION".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert_eq!(
        version["client_min_version"],
        AttributeValue::S("0.17.0".into()),
        "older clients, which would enforce a bypass, are kept out"
    );
    // Python admits past the one token left, and counts.
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "k1", "resource": "api", "consume": {"rph": 1}, "n": 5}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 5, "{answer}");
    // So do we, on that bucket and on one Python creates bypassed.
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "k2", "resource": "api", "consume": {"rph": 1}, "n": 4}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 4, "{answer}");
    for key in ["k1", "k2"] {
        for _ in 0..3 {
            limiter
                .acquire(key, "api")
                .await
                .unwrap()
                .commit()
                .await
                .unwrap();
        }
    }
    let k1 = limiter.bucket_states("k1", "api").await.unwrap();
    assert_eq!(k1["rph"].total_consumed_milli, (1 + 5 + 3) * 1000);
    assert_eq!(k1["rph"].tokens_milli, 1000, "nothing taken while bypassed");
    let k2 = limiter.bucket_states("k2", "api").await.unwrap();
    assert_eq!(k2["rph"].total_consumed_milli, (4 + 3) * 1000);
    // Enabled again: both enforce the balance from before, no debt.
    limiter.enable_resource("api").await.unwrap();
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "k1", "resource": "api", "consume": {"rph": 1}, "n": 3}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 1, "{answer}");
    assert!(limiter.acquire("k2", "api").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_is_created_against_its_owner_record_as_it_now_is() {
    let (repo, _place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    for id in ["proj", "proj2"] {
        limiter.create_entity(id).await.unwrap();
    }
    limiter
        .create_entity("key")
        .parent("proj")
        .cascade(true)
        .await
        .unwrap();
    limiter
        .set_resource_limits("api", &[Limit::per_hour("rph", 10)])
        .await
        .unwrap();
    let acquire = || async {
        limiter
            .acquire("key", "api")
            .await
            .unwrap()
            .commit()
            .await
            .unwrap()
    };
    acquire().await;
    let meta_key = || record_key(&repo, "ENTITY#key", "#META");
    let meta = repo
        .client()
        .get_item()
        .table_name(repo.table())
        .set_key(Some(meta_key()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let bucket = crate::repository::raw_bucket(&repo, "key", "api")
        .await
        .unwrap();
    assert_eq!(
        bucket["pinc"], meta["pinc"],
        "the bucket carries its owner's stamps"
    );
    assert_eq!(bucket["pgen"], meta["pgen"]);
    // The bucket goes (expired), and meanwhile the entity is created again elsewhere under
    // another parent, as Python would: a new incarnation. This limiter's config is cached.
    let bucket_key = HashMap::from([
        ("PK".to_string(), bucket["PK"].clone()),
        ("SK".to_string(), bucket["SK"].clone()),
    ]);
    repo.client()
        .delete_item()
        .table_name(repo.table())
        .set_key(Some(bucket_key))
        .send()
        .await
        .unwrap();
    let pinc = AttributeValue::S("00000000000000aa".into());
    raw_update(
        &repo,
        meta_key(),
        "SET #a = :v",
        Some("pinc"),
        Some(pinc.clone()),
    )
    .await;
    raw_update(
        &repo,
        meta_key(),
        "SET #a = :v",
        Some("parent_id"),
        Some(AttributeValue::S("proj2".into())),
    )
    .await;
    // The create's owner check fails on the old stamp; the record is read again and the
    // bucket created for the entity as it now is.
    acquire().await;
    let bucket = crate::repository::raw_bucket(&repo, "key", "api")
        .await
        .unwrap();
    assert_eq!(bucket["pinc"], pinc);
    assert_eq!(bucket["parent_id"], AttributeValue::S("proj2".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_limits_are_soft_on_both_sides() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .set_resource_limits(
            "api",
            &[
                Limit::per_hour("rph", 100),
                Limit::per_hour("tph", 10).soft(),
            ],
        )
        .await
        .unwrap();
    // Stored as Python stores it.
    let config = repo
        .client()
        .get_item()
        .table_name(repo.table())
        .set_key(Some(record_key(&repo, "RESOURCE#api", "#CONFIG")))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert_eq!(config["l_tph_soft"], AttributeValue::Bool(true));
    assert!(!config.contains_key("l_rph_soft"));
    // This crate charges past the soft budget, into debt.
    for _ in 0..2 {
        limiter
            .acquire("k1", "api")
            .consume([("rph", 1), ("tph", 8)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    // So does Python, on the same bucket (it reads the config and admits).
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "k1", "resource": "api",
               "consume": {"rph": 1, "tph": 5}, "n": 3}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 3, "{answer}");
    let states = limiter.bucket_states("k1", "api").await.unwrap();
    assert_eq!(states["tph"].total_consumed_milli, (16 + 15) * 1000);
    assert!(states["tph"].tokens_milli < -20_000, "{states:?}");
    assert_eq!(
        limiter.get_resource_limits("api").await.unwrap().unwrap()[1],
        Limit::per_hour("tph", 10).soft()
    );
    // Made hard again: the buckets' soft stamps go at once, as Python's fan-out removes
    // them (its fast path would otherwise stay soft until they ran out).
    let hard = [Limit::per_hour("rph", 100), Limit::per_hour("tph", 10)];
    limiter.set_resource_limits("api", &hard).await.unwrap();
    let item = crate::repository::raw_bucket(&repo, "k1", "api")
        .await
        .unwrap();
    assert!(!item.contains_key("b_tph_soft"), "{item:?}");
    // Soft again: a live stamp, from the config just written.
    let soft = [
        Limit::per_hour("rph", 100),
        Limit::per_hour("tph", 10).soft(),
    ];
    limiter.set_resource_limits("api", &soft).await.unwrap();
    let item = crate::repository::raw_bucket(&repo, "k1", "api")
        .await
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        crate::repository::n(&item, "b_tph_soft") > now_ms,
        "{item:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_bypass_stamp_bypasses_a_limiter_whose_config_is_still_cached() {
    let (repo, _place) = shared().await;
    // This limiter caches config for a minute; another process flips the flags.
    let cached = RateLimiter::builder(repo.clone())
        .config_cache_ttl(std::time::Duration::from_secs(60))
        .build();
    let operator = RateLimiter::builder(repo.clone())
        .config_cache_ttl(std::time::Duration::ZERO)
        .build();
    operator
        .set_resource_limits("api", &[Limit::per_hour("rph", 2)])
        .await
        .unwrap();
    cached
        .acquire("k1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    assert_eq!(operator.bypass_resource("api").await.unwrap(), 1);
    // The cached config still says enforced; the item's live stamp bypasses it.
    for _ in 0..4 {
        let lease = cached.acquire("k1", "api").await.unwrap();
        lease.adjust([("rph", 1)]).await.unwrap();
        lease.commit().await.unwrap();
    }
    let states = cached.bucket_states("k1", "api").await.unwrap();
    assert_eq!(states["rph"].total_consumed_milli, (1 + 4 * 2) * 1000);
    assert_eq!(
        states["rph"].tokens_milli, 1000,
        "nothing taken while bypassed"
    );
    // Enabled again: the stamp is gone, and the cached limiter enforces what is left.
    operator.enable_resource("api").await.unwrap();
    cached
        .acquire("k1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    assert!(matches!(
        cached.acquire("k1", "api").await,
        Err(zae_limiter::Error::RateLimited(_))
    ));
}

/// Python takes `taken` from `entity`'s bucket for `resource` (creating shard 0), then
/// doubles the bucket twice (1 -> 2 -> 4 shards), as its client does on a partition out
/// of write capacity.
async fn python_takes_then_shards(place: &Value, entity: &str, resource: &str, taken: (&str, u64)) {
    let (limit, amount) = taken;
    ok(&python::run(command(
        place,
        json!({"op": "acquire", "entity": entity, "resource": resource,
               "consume": {limit: amount}, "n": 1}),
    ))
    .await);
    let bumped = python::run(command(
        place,
        json!({"op": "bump_shards", "entity": entity, "resource": resource, "from": [1, 2]}),
    ))
    .await;
    ok(&bumped);
    assert_eq!(bumped["counts"], json!([2, 4]));
}

/// Every shard item of `entity`/`resource`'s bucket, by shard: `shard_count`, and the
/// `tk` and `tc` of limit `name` (millitokens).
async fn shard_items(
    repo: &DynamoDbRepository,
    entity: &str,
    resource: &str,
    name: &str,
) -> Vec<(u32, i64, i64, i64)> {
    let mut found = Vec::new();
    for shard in 0..32u32 {
        let key = record_key(
            repo,
            &format!("BUCKET#{entity}#{resource}#{shard}"),
            "#STATE",
        );
        let item = repo
            .client()
            .get_item()
            .table_name(repo.table())
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        let Some(item) = item.item() else { continue };
        let n = |attr: &str| -> i64 {
            match item.get(attr) {
                Some(AttributeValue::N(v)) => v.parse().unwrap(),
                other => panic!("shard {shard}: {attr} is {other:?}"),
            }
        };
        found.push((
            shard,
            n("shard_count"),
            n(&format!("b_{name}_tk")),
            n(&format!("b_{name}_tc")),
        ));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_python_sharded_holds_its_capacity_across_shards_for_both_sides() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    // 100 a day: the run refills nothing worth a token.
    limiter
        .set_resource_limits("api", &[Limit::per_day("rpd", 100)])
        .await
        .unwrap();
    // Python takes 75 on shard 0, then doubles the bucket twice (1 -> 2 -> 4 shards), as
    // its client does on a partition out of write capacity: shard 0 now holds its share
    // (25) and the other shards are created full (25 each) by whoever draws them first.
    python_takes_then_shards(&place, "hot", "api", ("rpd", 75)).await;
    // Both sides at once, one token per acquire, until the shards are empty.
    let python = tokio::spawn(python::run(command(
        &place,
        json!({"op": "acquire", "entity": "hot", "resource": "api", "consume": {"rpd": 1},
               "n": 60, "tasks": 2}),
    )));
    let mut rust = Vec::new();
    for _ in 0..4 {
        let limiter = limiter.clone();
        rust.push(tokio::spawn(async move {
            let (mut admitted, mut rejected) = (0u64, 0);
            while rejected < 3 {
                match limiter.acquire("hot", "api").await {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        admitted += 1;
                    }
                    Err(zae_limiter::Error::RateLimited(r)) => {
                        // Only once every shard is short, and never sooner than a token.
                        assert!(r.retry_after() >= std::time::Duration::from_secs(1));
                        rejected += 1;
                    }
                    Err(e) => panic!("{e:?}"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
            admitted
        }));
    }
    let mut ours = 0;
    for task in rust {
        ours += task.await.unwrap();
    }
    let answer = python.await.unwrap();
    ok(&answer);
    let theirs = answer["outcomes"]["admitted"].as_u64().unwrap_or(0);
    eprintln!("4 shards of 25: this crate admitted {ours}, Python {theirs}: {answer}");
    assert!(ours > 0, "this crate took part");
    assert_eq!(
        ours + theirs,
        100,
        "the shards' shares, no more and no less"
    );
    let shards = shard_items(&repo, "hot", "api", "rpd").await;
    assert_eq!(
        shards.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "every shard drawn and created: {shards:?}"
    );
    for &(shard, count, tk, _) in &shards {
        assert_eq!(count, 4, "shard {shard} carries the count");
        assert!((0..1_000).contains(&tk), "shard {shard} is empty: {tk}");
    }
    assert_eq!(
        shards.iter().map(|s| s.3).sum::<i64>(),
        175_000,
        "tc counts every admission, shard by shard: {shards:?}"
    );
    // The bucket as a whole: its shards' shares together.
    let states = limiter.bucket_states("hot", "api").await.unwrap();
    assert_eq!(states["rpd"].capacity_milli, 100_000);
    assert_eq!(states["rpd"].total_consumed_milli, 175_000);
    assert!(states["rpd"].tokens_milli < 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_on_a_sharded_bucket_settles_on_the_shard_it_charged() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .set_resource_limits("llm", &[Limit::per_day("tpd", 1_000)])
        .await
        .unwrap();
    python_takes_then_shards(&place, "k", "llm", ("tpd", 750)).await;
    // An estimate of 50 up front, 10 used: 40 go back, to the shard that gave them.
    for _ in 0..12 {
        let lease = limiter
            .acquire("k", "llm")
            .consume([("tpd", 50)])
            .await
            .unwrap();
        lease.adjust([("tpd", -40)]).await.unwrap();
        lease.commit().await.unwrap();
    }
    let shards = shard_items(&repo, "k", "llm", "tpd").await;
    eprintln!("shards after 12 leases: {shards:?}");
    assert!(
        shards.len() > 1,
        "the leases spread over the shards: {shards:?}"
    );
    for &(shard, count, tk, tc) in &shards {
        assert_eq!(count, 4);
        // Each shard holds its share (250) less what was charged on it, exactly: a
        // refund sent to another shard would break this on both.
        let before = if shard == 0 { 750_000 } else { 0 };
        let own = tc - before;
        assert!(own >= 0 && own % 10_000 == 0, "shard {shard}: tc {tc}");
        assert!(
            (0..1_000).contains(&(tk - (250_000 - own))),
            "shard {shard}: tk {tk}, tc {tc}"
        );
    }
    assert_eq!(
        shards.iter().map(|s| s.3).sum::<i64>(),
        750_000 + 12 * 10_000
    );
    // Python reads the shards this crate created and charges them in its turn.
    let answer = python::run(command(
        &place,
        json!({"op": "acquire", "entity": "k", "resource": "llm", "consume": {"tpd": 5}, "n": 8}),
    ))
    .await;
    ok(&answer);
    assert_eq!(answer["outcomes"]["admitted"], 8, "{answer}");
    let total: i64 = shard_items(&repo, "k", "llm", "tpd")
        .await
        .iter()
        .map(|s| s.3)
        .sum();
    assert_eq!(total, 750_000 + 12 * 10_000 + 8 * 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_charges_a_sharded_parent_shard_by_shard() {
    let (repo, place) = shared().await;
    let limiter = RateLimiter::new(repo.clone());
    limiter.create_entity("org").await.unwrap();
    for key in ["key-a", "key-b"] {
        limiter
            .create_entity(key)
            .parent("org")
            .cascade(true)
            .await
            .unwrap();
        limiter
            .set_entity_limits(key, "api", &[Limit::per_day("rpd", 1_000)])
            .await
            .unwrap();
    }
    limiter
        .set_entity_limits("org", "api", &[Limit::per_day("rpd", 40)])
        .await
        .unwrap();
    // The parent's bucket is hot: Python takes 30 on it, then spreads it over 4 shards
    // (shard 0 keeps its 10, a share; the others start at 10 each).
    python_takes_then_shards(&place, "org", "api", ("rpd", 30)).await;
    // Two children at once through the parent: exactly the parent's 40 admitted, each
    // child charged for what it was admitted.
    let mut tasks = Vec::new();
    for key in ["key-a", "key-b", "key-a", "key-b"] {
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0i64;
            for _ in 0..20 {
                match limiter.acquire(key, "api").await {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        admitted += 1;
                    }
                    Err(zae_limiter::Error::RateLimited(_)) => {}
                    Err(e) => panic!("{e:?}"),
                }
            }
            (key, admitted)
        }));
    }
    let mut by_key = HashMap::new();
    for task in tasks {
        let (key, admitted) = task.await.unwrap();
        *by_key.entry(key).or_insert(0) += admitted;
    }
    let total: i64 = by_key.values().sum();
    assert_eq!(total, 40, "the parent's shards held 40: {by_key:?}");
    for (key, admitted) in &by_key {
        let child = limiter.bucket_states(key, "api").await.unwrap();
        assert_eq!(child["rpd"].total_consumed_milli, admitted * 1_000, "{key}");
    }
    let shards = shard_items(&repo, "org", "api", "rpd").await;
    assert_eq!(shards.len(), 4, "{shards:?}");
    assert_eq!(
        shards.iter().map(|s| s.3).sum::<i64>(),
        (30 + 40) * 1_000,
        "{shards:?}"
    );
    assert!(
        shards.iter().all(|s| (0..1_000).contains(&s.2)),
        "{shards:?}"
    );
}
