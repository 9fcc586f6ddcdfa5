//! Random lease histories on the in-memory backend, each on a fresh limiter, checked step
//! by step against the exact model in `suite::histories` (shrunk to a minimal history on
//! failure). The behaviour suite runs a fixed set of them on every backend.

use proptest::prelude::*;
use zae_limiter::InMemoryRepository;

use crate::suite::{self, histories};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn lease_histories_match_an_exact_model(
        from in 0u8..4,
        history in histories::history(60, 0),
    ) {
        let from = [
            histories::LimitsFrom::Explicit,
            histories::LimitsFrom::Stored,
            histories::LimitsFrom::StoredSoftParent,
            histories::LimitsFrom::StoredKidBypassed,
        ][usize::from(from)];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let outcome = runtime.block_on(async {
            let (limiter, clock) = suite::limiter(std::sync::Arc::new(InMemoryRepository::new()));
            histories::setup(&limiter, "", from).await;
            histories::run(
                std::slice::from_ref(&limiter),
                &clock,
                "",
                from,
                0,
                &history,
            )
            .await
        });
        if let Err(mismatch) = outcome {
            return Err(TestCaseError::fail(format!("{mismatch:?}")));
        }
    }
}
