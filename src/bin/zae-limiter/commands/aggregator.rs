//! `aggregator run`: the table's stream into usage snapshots.

use serde_json::json;
use zae_limiter::aggregator::{streams_client, Aggregator, PollReport, StreamConsumer};

use crate::args::{AggregatorCommand, Global};
use crate::connect;
use crate::failure::Outcome;
use crate::output::Out;

pub async fn run(global: &Global, command: AggregatorCommand, out: Out) -> Outcome {
    match command {
        AggregatorCommand::Run(args) => {
            let table = connect::table(global).await?;
            let client = table.client().clone();
            let streams =
                streams_client(global.region.as_deref(), global.endpoint_url.as_deref()).await;
            let aggregator = Aggregator::new(client.clone(), table.name())
                .windows(args.windows)
                .ttl_days(args.ttl_days);
            let consumer = StreamConsumer::new(client, streams, table.name(), aggregator)
                .idle_wait(args.idle_wait);
            if args.once {
                report(&out, &consumer.poll().await?);
            } else {
                eprintln!("Reading the stream of {} (Ctrl-C stops).", table.name());
                consumer
                    .run(async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await?;
            }
        }
    }
    Ok(())
}

fn report(out: &Out, report: &PollReport) {
    let skipped: usize = report.batch.skipped.values().sum();
    out.record(vec![
        ("shards_read", json!(report.shards_read)),
        ("shards_finished", json!(report.shards_finished)),
        ("records", json!(report.batch.records)),
        ("consumptions", json!(report.batch.deltas)),
        ("snapshot_writes", json!(report.batch.snapshot_writes)),
        ("already_counted", json!(report.batch.already_counted)),
        ("skipped", json!(skipped)),
    ]);
}
