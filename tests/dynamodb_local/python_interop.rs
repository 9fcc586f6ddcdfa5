//! One table shared live with the Python zae-limiter 0.17.0 (from PyPI), on DynamoDB
//! Local: each side opens the other's table through its normal path, enforces what the
//! other stored, and reads the other's records.

use serde_json::{json, Value};
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
    use zae_limiter::repository::dynamodb::aws_sdk_dynamodb::types::AttributeValue;
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
