//! Replays every step of the reference token-bucket vectors (tests/data/bucket_vectors.json,
//! copied from the design's conformance set) against the pure `bucket` module.

use serde::Deserialize;
use zae_limiter::bucket::{self, BucketState};
use zae_limiter::Limit;

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    limit: Limit,
    start_ms: i64,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    op: String,
    now_ms: i64,
    #[serde(default)]
    amount: Option<i64>,
    expect: Expect,
}

#[derive(Deserialize, Default)]
struct Expect {
    success: Option<bool>,
    available: Option<i64>,
    retry_after_ms: Option<u64>,
    wait_ms: Option<u64>,
    tokens_milli: Option<i64>,
    last_refill_ms: Option<i64>,
    refill_carry: Option<i64>,
}

fn check_state(state: &BucketState, expect: &Expect, at: &str) {
    if let Some(t) = expect.tokens_milli {
        assert_eq!(state.tokens_milli, t, "tokens_milli at {at}");
    }
    if let Some(t) = expect.last_refill_ms {
        assert_eq!(state.last_refill_ms, t, "last_refill_ms at {at}");
    }
    if let Some(c) = expect.refill_carry {
        assert_eq!(state.refill_carry, c, "refill_carry at {at}");
    }
}

#[test]
fn replays_every_reference_step_exactly() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bucket_vectors.json"
    ))
    .expect("test data present");
    let vectors: Vectors = serde_json::from_str(&text).expect("valid vectors");
    assert_eq!(vectors.cases.len(), 400);
    let mut steps = 0;
    for (ci, case) in vectors.cases.iter().enumerate() {
        let mut state = BucketState::from_limit(&case.limit, case.start_ms);
        for (si, step) in case.steps.iter().enumerate() {
            let at = format!("case {ci} step {si} ({})", step.op);
            let e = &step.expect;
            match step.op.as_str() {
                "try_consume" => {
                    let amount = u64::try_from(step.amount.expect("amount")).expect("non-negative");
                    let r = bucket::try_consume(&state, amount, step.now_ms);
                    assert_eq!(Some(r.success), e.success, "success at {at}");
                    assert_eq!(Some(r.available), e.available, "available at {at}");
                    assert_eq!(
                        Some(r.retry_after_ms),
                        e.retry_after_ms,
                        "retry_after_ms at {at}"
                    );
                    check_state(&r.state, e, &at);
                    state = r.state;
                }
                "force_consume" => {
                    state =
                        bucket::force_consume(&state, step.amount.expect("amount"), step.now_ms);
                    check_state(&state, e, &at);
                }
                "available" => {
                    let a = bucket::available(&state, step.now_ms);
                    assert_eq!(Some(a), e.available, "available at {at}");
                }
                "time_until_available" => {
                    let needed = u64::try_from(step.amount.expect("amount")).expect("non-negative");
                    let w = bucket::time_until_available(&state, needed, step.now_ms);
                    assert_eq!(Some(w), e.wait_ms, "wait_ms at {at}");
                }
                other => panic!("unknown op {other} at {at}"),
            }
            steps += 1;
        }
    }
    assert_eq!(steps, 10_481);
}
