//! [`StreamConsumer`]: reads the table's DynamoDB stream (its shards, their iterators,
//! splits and closed shards) and counts the records with an [`Aggregator`], keeping its
//! position per stream shard in the table, so a restart resumes where it stopped.
//!
//! The position is saved after each batch is counted: a crash in between re-reads that
//! batch, and the snapshots' marks keep it from counting twice. A shard is read only once
//! its parent is finished, so records of one item are counted in stream order.
//!
//! Failures: while DynamoDB is unavailable the consumer waits and reads again from its
//! position (nothing is skipped). A batch that fails for another reason (DynamoDB refuses
//! a write for good) is counted record by record, and each record that still fails goes
//! to the dead-letter items (`_/AGGREGATOR#`, `#DEAD#{sequence number}`: its stream shard,
//! item key and error, kept 14 days), so the stream moves on.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodbstreams::operation::get_records::GetRecordsError;
use aws_sdk_dynamodbstreams::types::{
    AttributeValue as StreamValue, OperationType, Record, Shard, ShardIteratorType,
};

use super::{Aggregator, BatchReport, ChangeKind, StreamRecord};
use crate::repository::dynamodb::errors;
use crate::Error;

/// Where positions are kept: one item per stream shard in the table-level partition.
const POSITIONS_PK: &str = "_/AGGREGATOR#";

/// Records per `GetRecords` call (DynamoDB Streams' most).
const RECORDS_PER_CALL: i32 = 1_000;

/// Records that counted nothing read past the saved position before it is saved anyway.
const SAVE_AFTER_UNCOUNTED: usize = 500;

/// How long a finished shard's position is kept: stream records live 24 hours.
const FINISHED_KEPT_S: i64 = 2 * 86_400;

/// Reads a table's stream into usage snapshots.
#[derive(Debug, Clone)]
pub struct StreamConsumer {
    streams: aws_sdk_dynamodbstreams::Client,
    dynamodb: Client,
    table: String,
    aggregator: Aggregator,
    idle_wait: Duration,
}

/// What one pass over the stream's shards did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Shards read in this pass.
    pub shards_read: usize,
    /// Shards found finished (closed and read to the end) in this pass.
    pub shards_finished: usize,
    /// Records that kept failing, sent to the dead-letter items.
    pub dead_lettered: usize,
    /// The batches counted, merged.
    pub batch: BatchReport,
}

/// A stream shard's saved position.
#[derive(Debug, Clone, Default)]
struct Position {
    /// The last record counted.
    sequence_number: Option<String>,
    /// Closed and read to the end.
    finished: bool,
}

impl StreamConsumer {
    /// A consumer of `table`'s stream, counting with `aggregator`. `streams` is a client
    /// of the same account and region (see [`streams_client`]).
    pub fn new(
        dynamodb: Client,
        streams: aws_sdk_dynamodbstreams::Client,
        table: impl Into<String>,
        aggregator: Aggregator,
    ) -> Self {
        StreamConsumer {
            streams,
            dynamodb,
            table: table.into(),
            aggregator,
            idle_wait: Duration::from_secs(1),
        }
    }

    /// How long [`Self::run`] waits after a pass that found nothing new (default 1 s).
    pub fn idle_wait(mut self, wait: Duration) -> Self {
        self.idle_wait = wait;
        self
    }

    /// Passes over the stream until `stop` completes (finishing the pass under way).
    /// While DynamoDB is unavailable it waits (up to 30 s between tries) and goes on; other
    /// errors (no stream, access denied) end it.
    pub async fn run(&self, stop: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(stop);
        let mut outage = 0;
        loop {
            let report = match self.poll().await {
                Ok(report) => {
                    outage = 0;
                    report
                }
                Err(e @ Error::Unavailable { .. }) => {
                    outage += 1;
                    let wait = self.idle_wait * 2u32.saturating_pow(outage.min(5));
                    let wait = wait.min(Duration::from_secs(30));
                    tracing::warn!(error = %e, ?wait, "stream consumer: DynamoDB unavailable; reading again later");
                    tokio::select! {
                        () = &mut stop => return Ok(()),
                        () = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            // A pass that counted something reads on at once; one that only met records
            // counting nothing (among them this consumer's own snapshot writes, read
            // again until a position is saved past them) waits like an empty one.
            let counted = report.batch.deltas > 0;
            if counted {
                tracing::info!(
                    records = report.batch.records,
                    snapshot_writes = report.batch.snapshot_writes,
                    already_counted = report.batch.already_counted,
                    skipped = report.batch.skipped.values().sum::<usize>(),
                    "stream records counted"
                );
            }
            if futures_util::FutureExt::now_or_never(&mut stop).is_some() {
                return Ok(());
            }
            if counted {
                continue;
            }
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = tokio::time::sleep(self.idle_wait) => {}
            }
        }
    }

    /// One pass: every shard whose parent is finished is read from its saved position to
    /// the end of what the stream holds now.
    pub async fn poll(&self) -> Result<PollReport, Error> {
        let arn = self.stream_arn().await?;
        let shards = self.shards(&arn).await?;
        let mut positions = self.positions().await?;
        let known: HashSet<&str> = shards.iter().filter_map(Shard::shard_id).collect();
        let mut report = PollReport::default();
        // Parents before children: a pass may finish a parent and then read its child.
        let mut pending: Vec<&Shard> = shards.iter().collect();
        loop {
            let ready: Vec<&Shard> = pending
                .iter()
                .copied()
                .filter(|s| {
                    let id = s.shard_id().unwrap_or_default();
                    let done = positions.get(id).is_some_and(|p| p.finished);
                    let parent_done = s.parent_shard_id().is_none_or(|parent| {
                        // A parent older than the stream's 24 hours is gone: nothing to wait for.
                        !known.contains(parent) || positions.get(parent).is_some_and(|p| p.finished)
                    });
                    !done && parent_done
                })
                .collect();
            if ready.is_empty() {
                break;
            }
            pending.retain(|s| !ready.iter().any(|r| r.shard_id() == s.shard_id()));
            for shard in ready {
                let id = shard.shard_id().unwrap_or_default().to_string();
                let position = positions.get(&id).cloned().unwrap_or_default();
                let finished = self.read_shard(&arn, &id, position, &mut report).await?;
                report.shards_read += 1;
                if finished {
                    report.shards_finished += 1;
                    positions.entry(id).or_default().finished = true;
                }
            }
        }
        Ok(report)
    }

    /// Reads one shard from `position` to the end of what it holds now; returns whether
    /// it is closed and read to the end.
    async fn read_shard(
        &self,
        arn: &str,
        shard: &str,
        mut position: Position,
        report: &mut PollReport,
    ) -> Result<bool, Error> {
        let mut iterator = Some(self.iterator(arn, shard, &position).await?);
        let mut unsaved = 0;
        while let Some(current) = iterator.take() {
            let out = match self
                .streams
                .get_records()
                .shard_iterator(&current)
                .limit(RECORDS_PER_CALL)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e)
                    if matches!(
                        e.as_service_error(),
                        Some(GetRecordsError::ExpiredIteratorException(_))
                    ) =>
                {
                    // Iterators expire after 15 minutes: take a new one where we stand.
                    iterator = Some(self.iterator(arn, shard, &position).await?);
                    continue;
                }
                Err(e) => return Err(errors::map("GetRecords", &self.table, e)),
            };
            let records: Vec<StreamRecord> = out.records().iter().map(stream_record).collect();
            let next = out.next_shard_iterator().map(str::to_string);
            if records.is_empty() {
                match next {
                    // Open and read up to now.
                    Some(_) => return Ok(false),
                    None => {
                        position.finished = true;
                        self.save(shard, &position).await?;
                        return Ok(true);
                    }
                }
            }
            let batch = self.count(shard, &records, report).await?;
            let counted = batch.deltas > 0;
            merge(&mut report.batch, batch);
            position.sequence_number = records.last().map(|r| r.sequence_number.clone());
            position.finished = next.is_none();
            unsaved += records.len();
            // Saving writes to the table, and so to its stream: a save after records that
            // counted nothing (the snapshot and position writes of the last batch, among
            // others) would feed itself forever. Those are saved only once many piled up;
            // until then a restart reads them again, and counts nothing.
            if counted || position.finished || unsaved >= SAVE_AFTER_UNCOUNTED {
                self.save(shard, &position).await?;
                unsaved = 0;
            }
            if position.finished {
                return Ok(true);
            }
            iterator = next;
        }
        Ok(false)
    }

    /// Counts a batch; on a failure other than an outage, record by record, sending the
    /// records that still fail to the dead-letter items.
    async fn count(
        &self,
        shard: &str,
        records: &[StreamRecord],
        report: &mut PollReport,
    ) -> Result<BatchReport, Error> {
        match self.aggregator.process(records).await {
            Ok(batch) => return Ok(batch),
            Err(e @ Error::Unavailable { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, records = records.len(), "a batch failed; counting it record by record")
            }
        }
        let mut total = BatchReport::default();
        for record in records {
            match self.aggregator.process(std::slice::from_ref(record)).await {
                Ok(batch) => merge(&mut total, batch),
                Err(e @ Error::Unavailable { .. }) => return Err(e),
                Err(e) => {
                    self.dead_letter(shard, record, &e).await?;
                    report.dead_lettered += 1;
                    total.records += 1;
                }
            }
        }
        Ok(total)
    }

    /// Keeps a record that cannot be counted, for an operator (14 days).
    async fn dead_letter(
        &self,
        shard: &str,
        record: &StreamRecord,
        error: &Error,
    ) -> Result<(), Error> {
        tracing::error!(error = %error, sequence_number = %record.sequence_number, "a stream record cannot be counted; kept as a dead letter");
        let key = record
            .new_image
            .as_ref()
            .or(record.old_image.as_ref())
            .and_then(|i| i.get("PK"))
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default();
        let ttl = super::now_s().saturating_add(14 * 86_400);
        self.dynamodb
            .put_item()
            .table_name(&self.table)
            .item("PK", AttributeValue::S(POSITIONS_PK.into()))
            .item(
                "SK",
                AttributeValue::S(format!("#DEAD#{}", record.sequence_number)),
            )
            .item("stream_shard", AttributeValue::S(shard.to_string()))
            .item(
                "sequence_number",
                AttributeValue::S(record.sequence_number.clone()),
            )
            .item("item", AttributeValue::S(key))
            .item("error", AttributeValue::S(error.to_string()))
            .item("ttl", AttributeValue::N(ttl.to_string()))
            .send()
            .await
            .map_err(|e| errors::map("PutItem", &self.table, e))?;
        Ok(())
    }

    async fn iterator(&self, arn: &str, shard: &str, position: &Position) -> Result<String, Error> {
        let request = self
            .streams
            .get_shard_iterator()
            .stream_arn(arn)
            .shard_id(shard);
        let request = match &position.sequence_number {
            Some(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
            None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let out = request
            .send()
            .await
            .map_err(|e| errors::map("GetShardIterator", &self.table, e))?;
        out.shard_iterator().map(str::to_string).ok_or_else(|| {
            Error::unavailable("no shard iterator", "GetShardIterator answered none")
        })
    }

    /// The table's stream, which must be on (`deploy --stream`).
    async fn stream_arn(&self) -> Result<String, Error> {
        let out = self
            .dynamodb
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| errors::map("DescribeTable", &self.table, e))?;
        out.table()
            .and_then(|t| t.latest_stream_arn())
            .map(str::to_string)
            .ok_or_else(|| {
                Error::validation(
                    "table",
                    &self.table,
                    "has no stream: create it with a stream (`zae-limiter deploy --stream`)",
                )
            })
    }

    async fn shards(&self, arn: &str) -> Result<Vec<Shard>, Error> {
        let mut shards = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let out = self
                .streams
                .describe_stream()
                .stream_arn(arn)
                .set_exclusive_start_shard_id(start.clone())
                .send()
                .await
                .map_err(|e| errors::map("DescribeStream", &self.table, e))?;
            let Some(description) = out.stream_description() else {
                return Ok(shards);
            };
            let before = shards.len();
            for shard in description.shards() {
                if !shards
                    .iter()
                    .any(|s: &Shard| s.shard_id() == shard.shard_id())
                {
                    shards.push(shard.clone());
                }
            }
            match description.last_evaluated_shard_id() {
                // A page with nothing new ends it too (DynamoDB Local names the last shard
                // of the last page).
                Some(last) if shards.len() > before => start = Some(last.to_string()),
                _ => return Ok(shards),
            }
        }
    }

    /// Every saved position.
    async fn positions(&self) -> Result<HashMap<String, Position>, Error> {
        let mut positions = HashMap::new();
        let mut start = None;
        loop {
            let out = self
                .dynamodb
                .query()
                .table_name(&self.table)
                .key_condition_expression("PK = :pk")
                .expression_attribute_values(":pk", AttributeValue::S(POSITIONS_PK.into()))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| errors::map("Query", &self.table, e))?;
            for item in out.items() {
                let Some(shard) = item
                    .get("SK")
                    .and_then(|v| v.as_s().ok())
                    .and_then(|sk| sk.strip_prefix("#SHARD#"))
                else {
                    continue;
                };
                positions.insert(
                    shard.to_string(),
                    Position {
                        sequence_number: item
                            .get("sequence_number")
                            .and_then(|v| v.as_s().ok())
                            .cloned(),
                        finished: item
                            .get("finished")
                            .and_then(|v| v.as_bool().ok())
                            .copied()
                            .unwrap_or(false),
                    },
                );
            }
            match out.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(positions),
            }
        }
    }

    async fn save(&self, shard: &str, position: &Position) -> Result<(), Error> {
        let mut put = self
            .dynamodb
            .put_item()
            .table_name(&self.table)
            .item("PK", AttributeValue::S(POSITIONS_PK.into()))
            .item("SK", AttributeValue::S(format!("#SHARD#{shard}")))
            .item("finished", AttributeValue::Bool(position.finished));
        if let Some(seq) = &position.sequence_number {
            put = put.item("sequence_number", AttributeValue::S(seq.clone()));
        }
        if position.finished {
            let ttl = super::now_s().saturating_add(FINISHED_KEPT_S);
            put = put.item("ttl", AttributeValue::N(ttl.to_string()));
        }
        put.send()
            .await
            .map_err(|e| errors::map("PutItem", &self.table, e))?;
        Ok(())
    }
}

/// A DynamoDB Streams client in `region` (the environment's when `None`), on
/// `endpoint_url` when given: DynamoDB Local serves both APIs on one endpoint, and is
/// reached with the same credentials the repository uses for it.
pub async fn streams_client(
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> aws_sdk_dynamodbstreams::Client {
    use crate::repository::dynamodb::builder::{is_loopback, local_credentials};
    use aws_sdk_dynamodbstreams::config::{BehaviorVersion, Region};
    let mut config = if endpoint_url.is_some_and(is_loopback) {
        aws_sdk_dynamodbstreams::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.unwrap_or("us-east-1").to_string()))
            .credentials_provider(local_credentials())
    } else {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(Region::new(region.to_string()));
        }
        aws_sdk_dynamodbstreams::config::Builder::from(&loader.load().await)
    };
    if let Some(url) = endpoint_url {
        config = config.endpoint_url(url);
    }
    aws_sdk_dynamodbstreams::Client::from_conf(config.build())
}

/// A stream record as the aggregator reads it.
pub fn stream_record(record: &Record) -> StreamRecord {
    let data = record.dynamodb();
    StreamRecord {
        kind: match record.event_name() {
            Some(OperationType::Insert) => ChangeKind::Insert,
            Some(OperationType::Remove) => ChangeKind::Remove,
            _ => ChangeKind::Modify,
        },
        sequence_number: data
            .and_then(|d| d.sequence_number())
            .unwrap_or_default()
            .to_string(),
        created_ms: data
            .and_then(|d| d.approximate_creation_date_time())
            .and_then(|t| t.to_millis().ok()),
        old_image: data.and_then(|d| d.old_image()).map(image),
        new_image: data.and_then(|d| d.new_image()).map(image),
    }
}

fn image(values: &HashMap<String, StreamValue>) -> HashMap<String, AttributeValue> {
    values.iter().map(|(k, v)| (k.clone(), value(v))).collect()
}

/// The streams API's attribute value as the DynamoDB API's (the same JSON shape).
fn value(v: &StreamValue) -> AttributeValue {
    use aws_sdk_dynamodb::primitives::Blob;
    match v {
        StreamValue::S(s) => AttributeValue::S(s.clone()),
        StreamValue::N(n) => AttributeValue::N(n.clone()),
        StreamValue::B(b) => AttributeValue::B(Blob::new(b.as_ref())),
        StreamValue::Bool(b) => AttributeValue::Bool(*b),
        StreamValue::Null(n) => AttributeValue::Null(*n),
        StreamValue::Ss(v) => AttributeValue::Ss(v.clone()),
        StreamValue::Ns(v) => AttributeValue::Ns(v.clone()),
        StreamValue::Bs(v) => AttributeValue::Bs(v.iter().map(|b| Blob::new(b.as_ref())).collect()),
        StreamValue::L(v) => AttributeValue::L(v.iter().map(value).collect()),
        StreamValue::M(m) => AttributeValue::M(image(m)),
        // A type this SDK does not know: as a null, which no count reads.
        _ => AttributeValue::Null(true),
    }
}

fn merge(total: &mut BatchReport, batch: BatchReport) {
    total.records += batch.records;
    total.deltas += batch.deltas;
    total.snapshot_writes += batch.snapshot_writes;
    total.already_counted += batch.already_counted;
    total.shards.doubled += batch.shards.doubled;
    total.shards.stamped += batch.shards.stamped;
    total.shards.created += batch.shards.created;
    for (skip, n) in batch.skipped {
        *total.skipped.entry(skip).or_default() += n;
    }
}
