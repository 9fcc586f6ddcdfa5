//! The usage aggregator (feature `aggregator`): turns the table's stream records of bucket
//! items into usage snapshots (per entity, resource and window, the tokens consumed per
//! limit), in the Python library's snapshot format, so either library's readers see them.
//!
//! ```no_run
//! # async fn demo(repo: zae_limiter::DynamoDbRepository,
//! #               records: Vec<zae_limiter::aggregator::StreamRecord>)
//! #   -> Result<(), zae_limiter::Error> {
//! use zae_limiter::aggregator::{Aggregator, Window};
//!
//! let aggregator = Aggregator::new(repo.client().clone(), repo.table())
//!     .windows([Window::Hourly, Window::Daily]);
//! let report = aggregator.process(&records).await?;
//! println!("{} snapshot writes for {} records", report.snapshot_writes, report.records);
//! # Ok(()) }
//! ```
//!
//! What it does beyond the Python aggregator:
//! - **Exactly once**: stream delivery is at least once; each snapshot item remembers, per
//!   bucket item it counts, the last record counted into it, and every write is
//!   conditioned on what it read (see `snapshots`). A batch delivered twice, overlapping batches, and a
//!   batch retried after a crash between its writes count each record once.
//! - **Coalesced**: one write per snapshot item per batch, however many records it holds.
//! - **The right window**: usage counts in the window of the record's creation time, not
//!   the bucket's refill time (`rf`), which hot-path writes do not move.
//! - **Creations count**: a bucket's first acquire (an `INSERT`) is counted from zero;
//!   Python counts only `MODIFY` records.
//!
//! - **Sharding upkeep**, as Python's aggregator: a bucket whose partition nears its write
//!   ceiling is doubled, and a grown shard count is stamped on the shards and new shards
//!   are created (see `shards`).
//!
//! Bad input never fails a batch: a record that is not a bucket image, lacks what the
//! count needs, or holds a counter of no limit is skipped and counted in the
//! [`BatchReport`]. A failing write is retried; a batch whose writes keep failing returns
//! the error, for the caller to retry it (nothing is counted twice) or send it to its
//! dead-letter path.

mod consumer;
#[cfg(feature = "lambda")]
#[cfg_attr(docsrs, doc(cfg(feature = "lambda")))]
pub mod lambda;
mod record;
mod shards;
mod snapshots;

pub use crate::usage::Window;
pub use aws_sdk_dynamodbstreams;
pub use consumer::{stream_record, streams_client, PollReport, StreamConsumer};
pub use record::{ChangeKind, Skip, StreamRecord};
pub use shards::ShardUpkeep;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use futures_util::StreamExt;

use crate::repository::dynamodb::acquire::batch_get;
use crate::repository::dynamodb::{errors, retry::backoff};
use crate::Error;
use snapshots::{Contribution, Target};

/// Attempts of one snapshot write (a lost race re-reads the item's marks; a failure
/// backs off) before the batch fails.
const WRITE_ATTEMPTS: usize = 8;

/// Snapshot writes of one batch in flight at once.
const CONCURRENT_WRITES: usize = 16;

/// Keys per `BatchGetItem` (DynamoDB's limit).
const BATCH_GET_KEYS: usize = 100;

/// Writes usage snapshots from stream records. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Aggregator {
    client: Client,
    table: String,
    windows: Vec<Window>,
    ttl_days: u32,
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Records in the batch.
    pub records: usize,
    /// Per-limit consumptions found in them.
    pub deltas: usize,
    /// Records (or limits of a record) skipped, by reason.
    pub skipped: BTreeMap<Skip, usize>,
    /// Snapshot items written (one per entity, resource and window touched).
    pub snapshot_writes: usize,
    /// Record contributions to snapshot items that were counted already (redeliveries).
    pub already_counted: usize,
    /// The sharding upkeep (see the module docs).
    pub shards: ShardUpkeep,
}

impl Aggregator {
    /// An aggregator writing to `table` through `client`: hourly and daily windows (as the
    /// Python aggregator's default), snapshots kept 90 days.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Aggregator {
            client,
            table: table.into(),
            windows: vec![Window::Hourly, Window::Daily],
            ttl_days: 90,
        }
    }

    /// The windows to keep snapshots for.
    pub fn windows(mut self, windows: impl IntoIterator<Item = Window>) -> Self {
        let mut windows: Vec<Window> = windows.into_iter().collect();
        windows.sort_unstable();
        windows.dedup();
        self.windows = windows;
        self
    }

    /// How long a snapshot is kept after it is first written (its `ttl`), in days.
    pub fn ttl_days(mut self, days: u32) -> Self {
        self.ttl_days = days;
        self
    }

    /// Counts one batch of stream records (in stream order within each stream shard) into
    /// the snapshots. Safe to call again with any of the same records.
    pub async fn process(&self, records: &[StreamRecord]) -> Result<BatchReport, Error> {
        let mut report = BatchReport {
            records: records.len(),
            ..BatchReport::default()
        };
        let mut targets: BTreeMap<Target, Vec<Contribution>> = BTreeMap::new();
        for record in records {
            let (consumption, skipped) = match record::consumption(record) {
                Ok(found) => found,
                Err(skip) => {
                    *report.skipped.entry(skip).or_default() += 1;
                    continue;
                }
            };
            for skip in skipped {
                *report.skipped.entry(skip).or_default() += 1;
            }
            if consumption.deltas.is_empty() {
                continue;
            }
            report.deltas += consumption.deltas.len();
            for &window in &self.windows {
                let target = Target {
                    namespace_id: consumption.namespace_id.clone(),
                    entity_id: consumption.entity_id.clone(),
                    resource: consumption.resource.clone(),
                    window,
                    start: window.key(consumption.at_ms),
                };
                targets.entry(target).or_default().push(Contribution {
                    source: consumption.bucket_shard.clone(),
                    sequence_number: record.sequence_number.clone(),
                    deltas: consumption.deltas.clone(),
                });
            }
        }
        let targets: Vec<(Target, Vec<Contribution>)> = targets.into_iter().collect();
        let mut read = self.read_marks(&targets).await?;
        // Items are independent: written a few at a time (each write waits on the network).
        // Collected first: a closure inside the stream's type would keep the future from
        // being `Send` (a spawned task could not run it).
        let writes: Vec<_> = targets
            .iter()
            .map(|(target, contributions)| {
                let marks = read.remove(&target.key_pair()).unwrap_or_default();
                self.write(target, contributions, marks)
            })
            .collect();
        let mut writes = futures_util::stream::iter(writes).buffer_unordered(CONCURRENT_WRITES);
        while let Some(written) = writes.next().await {
            let (written, duplicates) = written?;
            report.snapshot_writes += usize::from(written);
            report.already_counted += duplicates;
        }
        drop(writes);
        report.shards = self.upkeep_shards(records).await?;
        Ok(report)
    }

    /// Writes one snapshot item's new contributions; returns whether it wrote, and how
    /// many contributions were counted already.
    async fn write(
        &self,
        target: &Target,
        contributions: &[Contribution],
        mut marks: BTreeMap<String, String>,
    ) -> Result<(bool, usize), Error> {
        let ttl = now_s().saturating_add(i64::from(self.ttl_days) * 86_400);
        let mut failures = 0;
        for attempt in 0..WRITE_ATTEMPTS {
            let Some((update, expr, fresh)) = snapshots::update(target, contributions, &marks, ttl)
            else {
                return Ok((false, contributions.len()));
            };
            let sent = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(target.key()))
                .update_expression(update.expression())
                .set_condition_expression(update.condition())
                .set_expression_attribute_names(expr.names())
                .set_expression_attribute_values(expr.values())
                .send()
                .await;
            match sent {
                Ok(_) => return Ok((true, contributions.len() - fresh)),
                Err(e)
                    if matches!(
                        e.as_service_error(),
                        Some(UpdateItemError::ConditionalCheckFailedException(_))
                    ) =>
                {
                    // Another writer counted into the item since (an overlapping
                    // delivery): read its marks again.
                    marks = self.read_item_marks(target).await?;
                }
                Err(e) if errors::transient(&e) && failures + 1 < WRITE_ATTEMPTS => {
                    failures += 1;
                    tracing::warn!(error = %e, attempt, "usage snapshot write failed; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                }
                Err(e) => return Err(errors::map("UpdateItem", &self.table, e)),
            }
        }
        Err(Error::Unavailable {
            message: format!(
                "usage snapshot {}/{} kept changing under {WRITE_ATTEMPTS} writes",
                target.entity_id, target.resource
            ),
            source: None,
        })
    }

    /// The marks of every target's item (consistent reads, 100 keys a call).
    async fn read_marks(
        &self,
        targets: &[(Target, Vec<Contribution>)],
    ) -> Result<HashMap<(String, String), BTreeMap<String, String>>, Error> {
        let mut found = HashMap::new();
        for chunk in targets.chunks(BATCH_GET_KEYS) {
            let keys = chunk.iter().map(|(t, _)| t.key()).collect();
            for item in batch_get(&self.client, &self.table, keys, true).await? {
                found.insert(key_pair(&item), snapshots::marks(&item));
            }
        }
        Ok(found)
    }

    async fn read_item_marks(&self, target: &Target) -> Result<BTreeMap<String, String>, Error> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(target.key()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| errors::map("GetItem", &self.table, e))?;
        Ok(out.item().map(snapshots::marks).unwrap_or_default())
    }
}

impl Target {
    fn key_pair(&self) -> (String, String) {
        key_pair(&self.key())
    }
}

fn key_pair(item: &HashMap<String, AttributeValue>) -> (String, String) {
    let get = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default()
    };
    (get("PK"), get("SK"))
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
        .try_into()
        .unwrap_or(i64::MAX)
}
