//! Signed adjustments of leases (adjust, commit, rollback) and give-backs.

use super::contended;
use super::plan::fresh_window_ms;
use super::update::{locked_deltas, unlocked_fits, unlocked_update};
use std::time::Duration;

use crate::bucket::MILLI;
use crate::repository::dynamodb::expr::{Expr, Update};
use crate::repository::dynamodb::lease_writes::{claim_lane, Sent, Verdict};
use crate::repository::dynamodb::retry::{backoff, jitter};
use crate::repository::dynamodb::{keys, Inner};
use crate::repository::ItemRequest;
use crate::{Error, Limit};

impl Inner {
    /// Signed whole-token changes to one item; `tc` moves by each full amount. Never
    /// creates an item: on a missing one this is a no-op. Lands at most once per
    /// `write_id`, however often it is re-issued (see [`super::lease_writes`]).
    ///
    /// One `ADD` per limit without the rf lock (see [`unlocked_update`]) when the item's
    /// `rf` is fresh: a debit at a stale `rf` would be forgiven by the next refill's cap,
    /// and a credit near capacity could meet refill not yet written. Otherwise an
    /// rf-locked write that refills first, charges (within [`MIN_TOKENS_MILLI`]) or
    /// credits (capped at capacity). A lost race returns the item as it now is, and the
    /// next try uses it: contention delays a write, it never fails it.
    ///
    /// `counts_only`: the item was admitted under a bypass, so nothing was taken; the
    /// deltas move `tc` alone, unconditioned on the tokens (as the Python library's
    /// bypass-shaped adjustments do).
    pub(in crate::repository::dynamodb) async fn write_deltas(
        &self,
        entity_id: &str,
        resource: &str,
        deltas: &[(Limit, i64)],
        now: i64,
        write_id: &str,
        counts_only: bool,
    ) -> Result<(), Error> {
        let deltas: Vec<&(Limit, i64)> = deltas.iter().filter(|(_, d)| *d != 0).collect();
        if deltas.is_empty() {
            return Ok(());
        }
        let credit = deltas.iter().any(|(_, d)| *d < 0);
        let window = fresh_window_ms(deltas.iter().map(|(l, _)| l));
        // The write claims the next number of its lane, so it needs the item as last seen
        // (only a guide: every write is conditioned on the item as it is), or a read.
        let mut image = match self.images.get(entity_id, resource) {
            Some(image) => Some(image),
            None => {
                let read = self.read_bucket(entity_id, resource).await?;
                if let Some(read) = &read {
                    self.observe(entity_id, resource, read.clone());
                }
                read
            }
        };
        for attempt in 0..DELTA_ATTEMPTS {
            let Some(current) = image.take() else {
                self.resolved(write_id);
                return skipped(entity_id, resource);
            };
            match self.verdict(&current, write_id) {
                Verdict::Landed => {
                    self.resolved(write_id);
                    if credit {
                        self.rejections.forget(entity_id, resource);
                    }
                    return Ok(());
                }
                Verdict::Unknowable if credit => {
                    tracing::warn!(
                        entity_id,
                        resource,
                        write_id,
                        "a refund's outcome stayed unknown until it could no longer be told; \
                         taken as landed (never refunded twice), so its tokens may stay held \
                         until they refill"
                    );
                    self.resolved(write_id);
                    return Ok(());
                }
                Verdict::Unknowable if attempt == 0 => tracing::warn!(
                    entity_id,
                    resource,
                    write_id,
                    "a charge's outcome stayed unknown until it could no longer be told; \
                     applied (an admitted request is always charged), so it may be held twice \
                     until it refills"
                ),
                Verdict::Unknowable | Verdict::Write => {}
            }
            let locked = !unlocked_fits(&current, &deltas, now, window);
            let (mut update, mut expr) = if counts_only {
                count_update(&deltas)
            } else if locked {
                locked_deltas(&current, &deltas, now)?
            } else {
                unlocked_update(&current, &deltas, now)
            };
            let seq = claim_lane(&mut update, &mut expr, Some(&current), write_id);
            match self
                .send_lease_write(write_id, (entity_id, resource), &update, &expr, seq)
                .await?
            {
                Sent::Applied(new) => {
                    self.resolved(write_id);
                    // A rejection remembered here predates this credit: it proves nothing now.
                    if credit {
                        self.rejections.forget(entity_id, resource);
                    }
                    match new {
                        Some(new) => self.observe(entity_id, resource, new),
                        None => self.images.forget(entity_id, resource),
                    }
                    return Ok(());
                }
                Sent::ConditionFailed(None) => {
                    self.resolved(write_id);
                    return skipped(entity_id, resource);
                }
                Sent::ConditionFailed(Some(newer)) => {
                    self.observe(entity_id, resource, newer.clone());
                    image = Some(newer);
                }
            }
            // Writers that lost a race spread out (full jitter), so the next round is not
            // the same stampede and no writer is starved by one that keeps winning.
            if attempt > 0 {
                tokio::time::sleep(jitter(attempt)).await;
            }
        }
        Err(contended(entity_id, resource))
    }

    /// Gives back what a speculative write took (a one-sided cascade success), retrying
    /// until it lands: the caller may be gone (the acquire then finishes in the
    /// background), so nothing else would.
    pub(super) async fn give_back(
        &self,
        item: &ItemRequest,
        now: i64,
        counts_only: bool,
    ) -> Result<(), Error> {
        let deltas: Vec<(Limit, i64)> = item
            .limits
            .iter()
            .zip(&item.amounts)
            .filter(|(_, &a)| a > 0)
            .map(|(l, &a)| (l.clone(), -i64::try_from(a).unwrap_or(i64::MAX)))
            .collect();
        let write_id = format!("give-back-{:032x}", rand::random::<u128>());
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            let result = self
                .write_deltas(
                    &item.entity_id,
                    &super::slot(item),
                    &deltas,
                    now,
                    &write_id,
                    counts_only,
                )
                .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e @ Error::Unavailable { .. }) if started.elapsed() < GIVE_BACK_FOR => {
                    if attempt == 0 {
                        tracing::warn!(entity_id = %item.entity_id, resource = %item.resource, error = %e, "giving back a one-sided cascade consumption failed; retrying until it lands");
                    }
                    tokio::time::sleep(backoff(attempt.min(5))).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A bypassed item's adjustment: `ADD tc` per limit, on an item that exists.
fn count_update(deltas: &[&(Limit, i64)]) -> (Update, Expr) {
    let mut expr = Expr::default();
    let mut update = Update::default();
    update.conditions.push("attribute_exists(PK)".into());
    for (limit, delta) in deltas {
        let tc = expr.name(&keys::bucket_attr(&limit.name, "tc"));
        let v = expr.num(delta.saturating_mul(MILLI));
        update.add.push(format!("{tc} {v}"));
    }
    (update, expr)
}

/// Attempts of one adjustment (each lost race returns the newer item to try again with).
pub(super) const DELTA_ATTEMPTS: usize = 200;

/// How long a give-back is retried while DynamoDB is unavailable (its idempotency token's
/// window): past that it is reported, never silently dropped.
pub(super) const GIVE_BACK_FOR: Duration = Duration::from_secs(9 * 60);

/// An adjustment of an item that is gone: nothing to do (never create a stub item).
pub(super) fn skipped(entity_id: &str, resource: &str) -> Result<(), Error> {
    tracing::debug!(
        entity_id,
        resource,
        "adjust skipped: the bucket item is gone"
    );
    Ok(())
}
