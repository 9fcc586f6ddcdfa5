//! Writes that land but whose response is lost (an SDK interceptor turns the answer into a
//! 500 after DynamoDB Local applied the write): every one lands exactly once, whoever
//! re-sends it (the SDK's retries, the lease, the background settle).

use crate::dynamo;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::config::interceptors::{
    BeforeDeserializationInterceptorContextMut, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
};
use aws_sdk_dynamodb::Client;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::{Storable, StoreReplace};
use parking_lot::Mutex;
use zae_limiter::clock::ManualClock;
use zae_limiter::{DynamoDbRepository, Error, Limit, RateLimiter};

/// Turns the next N successful answers to an operation into `InternalServerError` (the
/// write landed, the client never hears so), or every answer while blacked out.
#[derive(Debug, Clone, Default)]
struct LoseResponses {
    pending: Arc<Mutex<HashMap<String, u32>>>,
    lost: Arc<Mutex<HashMap<String, u32>>>,
    /// The operation, and a text its request must contain, whose answers are all lost.
    blackout: Arc<Mutex<Option<(String, String)>>>,
}

impl LoseResponses {
    fn lose(&self, operation: &str, times: u32) {
        self.pending.lock().insert(operation.to_string(), times);
    }

    /// Every answer to `operation` is lost until `None`.
    fn blackout(&self, operation: Option<&str>) {
        self.blackout_matching(operation, "");
    }

    /// Every answer to `operation` whose request contains `text` is lost until `None`.
    fn blackout_matching(&self, operation: Option<&str>, text: &str) {
        *self.blackout.lock() = operation.map(|op| (op.to_string(), text.to_string()));
    }

    fn lost(&self, operation: &str) -> u32 {
        self.lost.lock().get(operation).copied().unwrap_or(0)
    }
}

impl Intercept for LoseResponses {
    fn name(&self) -> &'static str {
        "LoseResponses"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg.load::<Metadata>().map(|m| m.name().to_string());
        let matches = self.blackout.lock().as_ref().is_some_and(|(op, text)| {
            Some(op) == operation.as_ref()
                && context
                    .request()
                    .body()
                    .bytes()
                    .is_some_and(|body| String::from_utf8_lossy(body).contains(text.as_str()))
        });
        if matches {
            cfg.interceptor_state().store_put(BlackedOut);
        }
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(operation) = cfg.load::<Metadata>().map(|m| m.name().to_string()) else {
            return Ok(());
        };
        let blacked_out = cfg.load::<BlackedOut>().is_some();
        let response = context.response_mut();
        if !blacked_out {
            if !response.status().is_success() {
                return Ok(());
            }
            let mut pending = self.pending.lock();
            let Some(left) = pending.get_mut(&operation).filter(|n| **n > 0) else {
                return Ok(());
            };
            *left -= 1;
        }
        *self.lost.lock().entry(operation).or_default() += 1;
        *response.status_mut() = 500u16.try_into().unwrap();
        *response.body_mut() = SdkBody::from(
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"response lost"}"#,
        );
        Ok(())
    }
}

/// Marks a request whose answer is to be lost.
#[derive(Debug, Clone)]
struct BlackedOut;

impl Storable for BlackedOut {
    type Storer = StoreReplace<Self>;
}

const T0: i64 = 1_700_000_000_000;

async fn limiter_losing_responses() -> (RateLimiter, DynamoDbRepository, LoseResponses) {
    let lose = LoseResponses::default();
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "zaelimiterlocal",
            "local",
            None,
            None,
            "test",
        ))
        .endpoint_url(dynamo::endpoint().await)
        .interceptor(lose.clone())
        .build();
    let repo = dynamo::builder()
        .await
        .client(Client::from_conf(config))
        .timeout(Duration::from_millis(800))
        .build()
        .await
        .unwrap();
    let limiter = RateLimiter::builder(repo.clone())
        .clock(ManualClock::new(T0))
        .build();
    (limiter, repo, lose)
}

fn tpm() -> [Limit; 1] {
    [Limit::per_minute("tpm", 1_000)]
}

/// A lease of `n` tokens of the 1,000-a-minute limit on `k`.
async fn take(limiter: &RateLimiter, n: u64) -> zae_limiter::Lease {
    limiter
        .acquire("k", "api")
        .limits(tpm())
        .consume([("tpm", n)])
        .await
        .unwrap()
}

async fn tokens_and_consumed(limiter: &RateLimiter) -> (i64, i64) {
    let states = limiter.bucket_states("k", "api").await.unwrap();
    let state = states["tpm"];
    (state.tokens_milli / 1000, state.total_consumed_milli / 1000)
}

#[tokio::test]
async fn a_lost_answer_to_an_acquire_is_resolved_by_its_marker() {
    let (limiter, _repo, lose) = limiter_losing_responses().await;
    // The item's creation (a transaction with its owner check, sent again with its token),
    // then a speculative write (marked): each lands, each answer is lost.
    lose.lose("TransactWriteItems", 1);
    let lease = take(&limiter, 100).await;
    lease.commit().await.unwrap();
    lose.lose("UpdateItem", 1);
    let lease = take(&limiter, 100).await;
    lease.commit().await.unwrap();
    assert_eq!(
        (lose.lost("TransactWriteItems"), lose.lost("UpdateItem")),
        (1, 1)
    );
    assert_eq!(tokens_and_consumed(&limiter).await, (800, 200));
}

/// A commit or rollback sent again after one that failed in doubt: it re-issues the write
/// (`Ok`), or finds the lease closed, when the first one's write went on past the timeout
/// and landed once the answers came back (on a loaded machine its task can be scheduled
/// late). Either way the amounts checked after count the write once.
fn settled_again(result: Result<(), Error>) {
    match result {
        Ok(()) | Err(Error::LeaseClosed) => {}
        Err(e) => panic!("settling again failed: {e}"),
    }
}

#[tokio::test]
async fn lost_answers_to_lease_writes_never_apply_twice() {
    let (limiter, repo, lose) = limiter_losing_responses().await;
    let lease = take(&limiter, 100).await;
    // The commit's debit lands and its answer is lost: sent again, it finds its own
    // marker and is not applied twice.
    lease.adjust([("tpm", 50)]).await.unwrap();
    lose.lose("UpdateItem", 1);
    lease.commit().await.unwrap();
    assert_eq!(lose.lost("UpdateItem"), 1);
    assert_eq!(tokens_and_consumed(&limiter).await, (850, 150));

    // A refund whose answers stay lost past the timeout: the commit fails as unavailable
    // with the credit in doubt; committing again re-issues it, and it counts once.
    let lease = take(&limiter, 100).await;
    lease.adjust([("tpm", -40)]).await.unwrap();
    lose.blackout(Some("UpdateItem"));
    let err = lease.commit().await.unwrap_err();
    lose.blackout(None);
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert_eq!(repo.writes_in_doubt(), 1);
    settled_again(lease.commit().await);
    assert_eq!(repo.writes_in_doubt(), 0);
    assert_eq!(tokens_and_consumed(&limiter).await, (790, 210));

    // A rollback in doubt, then rolled back again: refunded once.
    let lease = take(&limiter, 200).await;
    lose.blackout(Some("UpdateItem"));
    assert!(lease.rollback().await.is_err());
    lose.blackout(None);
    settled_again(lease.rollback().await);
    assert_eq!(tokens_and_consumed(&limiter).await, (790, 210));

    // Eight other credits land before the doubtful one is re-issued: the ring no longer
    // tells, and it is taken as landed, never refunded twice.
    let doubtful = take(&limiter, 10).await;
    lose.blackout(Some("UpdateItem"));
    assert!(doubtful.rollback().await.is_err());
    lose.blackout(None);
    for _ in 0..8 {
        let lease = take(&limiter, 1).await;
        lease.rollback().await.unwrap();
    }
    settled_again(doubtful.rollback().await);
    assert_eq!(tokens_and_consumed(&limiter).await, (790, 210));
    assert_eq!(repo.writes_in_doubt(), 0);

    // A lease dropped with its rollback's answers lost: the background settle resolves it.
    let lease = take(&limiter, 300).await;
    lose.lose("UpdateItem", 1);
    drop(lease);
    for _ in 0..100 {
        if tokens_and_consumed(&limiter).await == (790, 210) && repo.writes_in_doubt() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the dropped lease's rollback did not land exactly once: {:?}",
        tokens_and_consumed(&limiter).await
    );
}

#[tokio::test]
async fn a_give_back_that_keeps_failing_is_retried_until_it_lands() {
    let (limiter, _repo, lose) = limiter_losing_responses().await;
    limiter.create_entity("proj").await.unwrap();
    limiter
        .create_entity("key")
        .parent("proj")
        .cascade(true)
        .await
        .unwrap();
    limiter
        .set_entity_limits("proj", "api", &[Limit::per_minute("tpm", 100)])
        .await
        .unwrap();
    limiter
        .set_entity_limits("key", "api", &[Limit::per_minute("tpm", 1_000)])
        .await
        .unwrap();
    // Both items exist and the parent is drained.
    limiter
        .acquire("key", "api")
        .consume([("tpm", 100)])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    // The child's speculative write lands, the parent's is refused: the child's tokens
    // are given back. Every answer to a lease write (it claims a write lane, `wi{k}`) is
    // lost for longer than the caller waits, then they get through: the give-back goes on
    // in the background until it lands, once.
    lose.blackout_matching(Some("UpdateItem"), "\"wi");
    let lift = lose.clone();
    let lifted = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        lift.blackout(None);
    });
    let result = limiter.acquire("key", "api").consume([("tpm", 50)]).await;
    assert!(
        matches!(
            result,
            Err(Error::RateLimited(_) | Error::Unavailable { .. })
        ),
        "{result:?}"
    );
    lifted.await.unwrap();
    assert!(
        lose.lost("UpdateItem") >= 1,
        "the give-back's answers were lost"
    );
    for _ in 0..100 {
        let child = limiter.bucket_states("key", "api").await.unwrap()["tpm"];
        if child.total_consumed_milli == 100_000 {
            assert_eq!(child.tokens_milli, 900_000);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the give-back did not land exactly once");
}
