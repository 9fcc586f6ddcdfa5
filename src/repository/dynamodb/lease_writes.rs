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

use super::codec::Image;
use super::expr::{Expr, Update};
use super::retry::{backoff, no_retries};
use super::{errors, Inner};
use crate::Error;

/// Write lanes per item.
pub(crate) const LANES: usize = 8;

/// The lane of a write id (FNV-1a, stable across processes and releases).
pub(super) fn lane_of(write_id: &str) -> usize {
    let hash = write_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % LANES as u64) as usize
}

/// A lane's sequence attribute.
pub(crate) fn lane_seq_attr(lane: usize) -> String {
    format!("ws{lane}")
}

/// A lane's last-id attribute.
pub(crate) fn lane_id_attr(lane: usize) -> String {
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

/// A lease write whose outcome was unknown.
#[derive(Debug, Clone)]
struct Doubt {
    /// The item it went to (`entity#resource`).
    item: String,
    /// The lane number it claimed.
    seq: i64,
    since: Instant,
    /// Whether it landed, once an image of the item showed it.
    landed: Option<bool>,
}

/// Lease writes whose outcome was unknown, by write id. Every image of an item this
/// process sees (each acquire returns one) is checked against them, so a doubt is settled
/// as soon as the item shows its lane's next number, before later writes move the lane on.
#[derive(Default)]
pub(super) struct InDoubtWrites {
    doubts: Mutex<HashMap<String, Doubt>>,
    /// Whether there are any (checked without the lock on every image).
    any: std::sync::atomic::AtomicBool,
}

impl InDoubtWrites {
    fn remember(&self, write_id: &str, item: String, seq: i64) {
        let mut map = self.doubts.lock();
        map.retain(|_, d| d.since.elapsed() < Duration::from_secs(3600));
        // A write re-issued after an earlier doubt claims a later number only once the
        // item showed the earlier one taken by another write: the latest claim is the one
        // that may have landed.
        let since = map.get(write_id).map_or_else(Instant::now, |d| d.since);
        map.insert(
            write_id.to_string(),
            Doubt {
                item,
                seq,
                since,
                landed: None,
            },
        );
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self, write_id: &str) -> Option<Doubt> {
        self.doubts.lock().get(write_id).cloned()
    }

    fn forget(&self, write_id: &str) {
        let mut map = self.doubts.lock();
        map.remove(write_id);
        if map.is_empty() {
            self.any.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Settles what `image` of `item` tells about the writes in doubt on it.
    pub fn observe(&self, item: &str, image: &Image) {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        for (id, doubt) in self.doubts.lock().iter_mut() {
            if doubt.landed.is_some() || doubt.item != item {
                continue;
            }
            let lane = lane_of(id);
            if image.lane_id(lane) == Some(id.as_str()) {
                doubt.landed = Some(true);
            } else if image.lane_seq(lane) == doubt.seq.saturating_add(1) {
                // Its number went to another write: it did not land.
                doubt.landed = Some(false);
            }
        }
    }

    /// How many writes are in doubt now.
    pub fn len(&self) -> usize {
        self.doubts.lock().len()
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

/// What `image` says about write `write_id`, given what is known of it from when its
/// outcome became unknown (the lane number it claimed, and whether an image seen since
/// settled it).
fn verdict_of(image: &Image, write_id: &str, doubt: Option<&Doubt>) -> Verdict {
    let lane = lane_of(write_id);
    if image.lane_id(lane) == Some(write_id) {
        return Verdict::Landed;
    }
    match doubt {
        None => Verdict::Write,
        Some(Doubt {
            landed: Some(true), ..
        }) => Verdict::Landed,
        Some(Doubt {
            landed: Some(false),
            ..
        }) => Verdict::Write,
        // Its number was taken by a later write too: the id it left was overwritten.
        Some(doubt) if image.lane_seq(lane) > doubt.seq.saturating_add(1) => Verdict::Unknowable,
        Some(_) => Verdict::Write,
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
    /// What `image` says about lease write `write_id` (see `verdict_of`).
    pub(super) fn verdict(&self, image: &Image, write_id: &str) -> Verdict {
        verdict_of(image, write_id, self.in_doubt.get(write_id).as_ref())
    }

    /// Remembers the newest image seen of an item (`resource`: its slot, see
    /// [`super::keys::slot`]) and its bucket's shard count, and settles the writes in doubt
    /// on it that it tells about.
    pub(super) fn observe(&self, entity_id: &str, resource: &str, image: Image) {
        if self.in_doubt.any.load(std::sync::atomic::Ordering::Relaxed) {
            let item = crate::keys::entity_resource(entity_id, resource);
            self.in_doubt.observe(&item, &image);
        }
        self.shards.learn(entity_id, resource, &image);
        self.images.put(entity_id, resource, image);
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
        item: (&str, &str),
        update: &Update,
        expr: &Expr,
        lane_seq: i64,
    ) -> Result<Sent, Error> {
        let started = Instant::now();
        let mut attempt = 0;
        let mut in_doubt = false;
        loop {
            // ALL_NEW: the item as it now is keeps the last image seen current (its write
            // lanes above all), so the next lease write claims the right number.
            let sent = self
                .update_request(self.bucket_key(item.0, item.1), update, expr)
                .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
                .customize()
                .config_override(no_retries())
                .send()
                .await;
            let error = match sent {
                Ok(out) => return Ok(Sent::Applied(out.attributes().map(Image::parse))),
                Err(e) => e,
            };
            if let Some(old) = super::errors::conditional_image(&error) {
                return Ok(Sent::ConditionFailed(old));
            }
            // Once a send's outcome was unknown, the write stays in doubt until a send
            // answers (a refused connection while DynamoDB restarts tells nothing). It is
            // remembered at once, so every image seen from now on can settle it, and a
            // re-send refused by its condition (the first send may have landed, and the
            // lane moved on) is judged with the doubt in mind.
            if !in_doubt && errors::outcome_unknown(&error) {
                in_doubt = true;
                let item = crate::keys::entity_resource(item.0, item.1);
                self.in_doubt.remember(write_id, item, lane_seq);
            }
            let again = if in_doubt {
                errors::transient(&error) && started.elapsed() < self.timeout / 2
            } else {
                errors::retry_as_is(&error) && attempt < 8
            };
            if again {
                tokio::time::sleep(backoff(attempt.min(5))).await;
                attempt += 1;
                continue;
            }
            if in_doubt {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with_lane(lane: usize, seq: i64, id: &str) -> Image {
        Image {
            lanes: vec![(lane, seq, Some(id.to_string()))],
            ..Image::default()
        }
    }

    #[test]
    fn a_write_in_doubt_is_settled_by_the_images_seen_since() {
        let doubts = InDoubtWrites::default();
        let id = "lease-1";
        let lane = lane_of(id);
        // No doubt: only the item's own lane tells.
        assert_eq!(
            verdict_of(&image_with_lane(lane, 4, id), id, None),
            Verdict::Landed
        );
        assert_eq!(
            verdict_of(&image_with_lane(lane, 4, "x"), id, None),
            Verdict::Write
        );
        // In doubt at number 3 of its lane.
        doubts.remember(id, "k#api".into(), 3);
        let doubt = doubts.get(id);
        assert_eq!(
            verdict_of(&image_with_lane(lane, 6, "other"), id, doubt.as_ref()),
            Verdict::Unknowable,
            "two more writes took the lane on: nothing tells"
        );
        // An image seen right after showed its number taken by this write: settled, even
        // once the lane has moved on.
        doubts.observe("k#api", &image_with_lane(lane, 4, id));
        let doubt = doubts.get(id);
        assert_eq!(
            verdict_of(&image_with_lane(lane, 6, "other"), id, doubt.as_ref()),
            Verdict::Landed
        );
        // Or by another write: it did not land.
        let other = "lease-2";
        doubts.remember(other, "k#api".into(), 7);
        doubts.observe("k#api", &image_with_lane(lane_of(other), 8, "someone"));
        assert_eq!(
            verdict_of(
                &image_with_lane(lane_of(other), 12, "someone else"),
                other,
                doubts.get(other).as_ref()
            ),
            Verdict::Write
        );
        // Images of other items tell nothing.
        let third = "lease-3";
        doubts.remember(third, "k#api".into(), 1);
        doubts.observe("j#api", &image_with_lane(lane_of(third), 2, third));
        assert_eq!(doubts.get(third).unwrap().landed, None);
        doubts.forget(id);
        doubts.forget(other);
        doubts.forget(third);
        assert_eq!(doubts.len(), 0);
        assert!(!doubts.any.load(std::sync::atomic::Ordering::Relaxed));
    }
}
