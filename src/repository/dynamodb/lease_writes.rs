//! Lease writes (adjust, commit, rollback, a cascade's give-back) that land once, as plain
//! conditional `UpdateItem`s (no transactions: those would lock a hot item against every
//! concurrent acquire).
//!
//! A write's outcome can be unknown (a timeout, a response lost after the write landed).
//! Such a write is never simply sent again: each lease write takes the next number of one
//! of eight write lanes (the lane its id hashes to), conditioned on the lane's sequence
//! `ws{k}` being `e` and setting it to `e + 1` and the lane's last id `wi{k}` to its own.
//! Exactly one write takes each number of a lane, so the item tells whether a given write
//! landed: a re-send of one that landed fails its condition and finds its id. Writes in
//! different lanes never conflict, so concurrent commits of a hot item rarely do.
//!
//! Only if two more writes of the same lane landed before a doubtful write is checked can
//! the item no longer tell; then a credit is taken as landed (a refund twice would
//! over-admit) and a debit is applied (an admitted request is always charged): tokens may
//! stay held until they refill, never an over-admission. Both are logged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use parking_lot::Mutex;

use super::acquire::{backoff, no_retries};
use super::codec::{Image, Item};
use super::expr::{Expr, Update};
use super::{errors, Inner};
use crate::Error;

/// Write lanes per item.
pub(super) const LANES: usize = 8;

/// The lane of a write id (FNV-1a, stable across processes and releases).
pub(super) fn lane_of(write_id: &str) -> usize {
    let hash = write_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % LANES as u64) as usize
}

/// A lane's sequence attribute.
pub(super) fn lane_seq_attr(lane: usize) -> String {
    format!("ws{lane}")
}

/// A lane's last-id attribute.
pub(super) fn lane_id_attr(lane: usize) -> String {
    format!("wi{lane}")
}

/// How a lease write ended.
pub(super) enum Sent {
    /// Applied, now or by an earlier send of the same write; the item as it now is, when
    /// DynamoDB returned it.
    Applied(Option<Image>),
    /// A condition failed; the item as it was (`None`: it does not exist). Not applied by
    /// this send (the caller checks the image for an earlier one).
    ConditionFailed(Option<Image>),
}

/// Lease writes whose outcome was unknown, by write id: the lane number each claimed.
#[derive(Default)]
pub(super) struct InDoubtWrites(Mutex<HashMap<String, (i64, Instant)>>);

impl InDoubtWrites {
    fn remember(&self, write_id: &str, seq: i64) {
        let mut map = self.0.lock();
        map.retain(|_, (_, since)| since.elapsed() < Duration::from_secs(3600));
        map.entry(write_id.to_string())
            .or_insert((seq, Instant::now()));
    }

    fn seq(&self, write_id: &str) -> Option<i64> {
        self.0.lock().get(write_id).map(|(seq, _)| *seq)
    }

    fn forget(&self, write_id: &str) {
        self.0.lock().remove(write_id);
    }

    /// How many writes are in doubt now.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
}

/// What an item says about a lease write.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// It landed.
    Landed,
    /// It did not (or it was never sent): write it, claiming the lane's next number.
    Write,
    /// It was in doubt and the lane moved on too far to tell.
    Unknowable,
}

/// What `image` says about write `write_id`, which (if it was in doubt) claimed number
/// `doubtful` of its lane.
pub(super) fn verdict(image: &Image, write_id: &str, doubtful: Option<i64>) -> Verdict {
    let lane = lane_of(write_id);
    if image.lane_id(lane) == Some(write_id) {
        return Verdict::Landed;
    }
    match doubtful {
        // Its number was taken by a later write too: the id it left was overwritten.
        Some(seq) if image.lane_seq(lane) > seq.saturating_add(1) => Verdict::Unknowable,
        _ => Verdict::Write,
    }
}

/// Adds a lease write's claim on the next number of its lane to `update`.
pub(super) fn claim_lane(
    update: &mut Update,
    expr: &mut Expr,
    image: Option<&Image>,
    write_id: &str,
) -> i64 {
    let lane = lane_of(write_id);
    let seq = image.map_or(0, |i| i.lane_seq(lane));
    let seq_name = expr.name(&lane_seq_attr(lane));
    let id_name = expr.name(&lane_id_attr(lane));
    let next = expr.num(seq.saturating_add(1));
    let id = expr.value(AttributeValue::S(write_id.to_string()));
    update.set.push(format!("{seq_name} = {next}"));
    update.set.push(format!("{id_name} = {id}"));
    if seq == 0 {
        update
            .conditions
            .push(format!("attribute_not_exists({seq_name})"));
    } else {
        let expected = expr.num(seq);
        update.conditions.push(format!("{seq_name} = {expected}"));
    }
    seq
}

impl Inner {
    /// The lane number a write claimed when its outcome became unknown, if it did.
    pub(super) fn doubtful(&self, write_id: &str) -> Option<i64> {
        self.in_doubt.seq(write_id)
    }

    /// The write is resolved (landed, or certainly not): no longer in doubt.
    pub(super) fn resolved(&self, write_id: &str) {
        self.in_doubt.forget(write_id);
    }

    /// Sends one lease write (its proof of landing already in `update`), repeating it while
    /// the outcome is unknown, for half of what a caller waits (the repository's timeout,
    /// so the answer reaches the caller in time); still unknown then: `Unavailable`, and a
    /// credit is remembered as in doubt (with the slot it claimed) for the lease to
    /// re-issue.
    pub(super) async fn send_lease_write(
        &self,
        write_id: &str,
        key: Item,
        update: &Update,
        expr: &Expr,
        lane_seq: i64,
    ) -> Result<Sent, Error> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            // ALL_NEW: the item as it now is keeps the last image seen current (its write
            // lanes above all), so the next lease write claims the right number.
            let sent = self
                .update_request(key.clone(), update, expr)
                .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
                .customize()
                .config_override(no_retries())
                .send()
                .await;
            let error = match sent {
                Ok(out) => return Ok(Sent::Applied(out.attributes().map(Image::parse))),
                Err(e) => e,
            };
            if let Some(old) = super::acquire::conditional_image(&error) {
                return Ok(Sent::ConditionFailed(old));
            }
            let unknown = errors::outcome_unknown(&error);
            let again = if unknown {
                started.elapsed() < self.timeout / 2
            } else {
                errors::retry_as_is(&error) && attempt < 8
            };
            if again {
                tokio::time::sleep(backoff(attempt.min(5))).await;
                attempt += 1;
                continue;
            }
            if unknown {
                self.in_doubt.remember(write_id, lane_seq);
                let mapped = errors::map("UpdateItem", &self.table, error);
                return Err(Error::Unavailable {
                    message: format!(
                        "{mapped}; the write's outcome is unknown, and re-issuing it (the \
                         lease does) applies it at most once"
                    ),
                    source: Some(Box::new(mapped)),
                });
            }
            return Err(errors::map("UpdateItem", &self.table, error));
        }
    }
}
