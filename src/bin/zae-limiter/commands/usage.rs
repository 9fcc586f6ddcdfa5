//! `usage list|summary` and `resource capacity`: what entities consumed per window, and
//! how much of a limit is in use now.

use serde_json::{json, Value};
use textplots::{Chart, Plot, Shape};
use zae_limiter::usage::{ResourceCapacity, UsageQuery, UsageSnapshot};

use crate::args::{Global, UsageArgs, UsageCommand};
use crate::connect;
use crate::failure::Outcome;
use crate::output::{print_json, Out};

pub async fn run(global: &Global, command: UsageCommand, out: Out) -> Outcome {
    let limiter = connect::limiter(global).await?;
    match command {
        UsageCommand::List(args) => {
            let page = limiter.usage_snapshots(&query(&args)).await?;
            if out.json() {
                print_json(&serde_json::to_value(&page).unwrap_or(Value::Null));
                return Ok(());
            }
            let rows = page
                .snapshots
                .iter()
                .map(|s| {
                    vec![
                        json!(s.entity_id),
                        json!(s.resource),
                        json!(s.window),
                        json!(s.window_start),
                        json!(counters(s)),
                        json!(s.total_events),
                    ]
                })
                .collect();
            out.table(
                &[
                    "entity",
                    "resource",
                    "window",
                    "window_start",
                    "usage",
                    "events",
                ],
                rows,
            );
            if let Some(token) = &page.next_page_token {
                println!("\nmore: --page-token '{token}'");
            }
            if let Some(limit) = &args.chart {
                println!("\n{}", chart(&page.snapshots, limit));
            }
        }
        UsageCommand::Summary(args) => {
            let summary = limiter.usage_summary(&query(&args)).await?;
            let mut fields = vec![
                ("snapshots", json!(summary.snapshots)),
                ("first_window_start", json!(summary.first_window_start)),
                ("last_window_start", json!(summary.last_window_start)),
            ];
            if out.json() {
                fields.push(("total", json!(summary.total)));
                fields.push(("average", json!(summary.average)));
            } else {
                for (limit, total) in &summary.total {
                    let average = summary.average.get(limit).copied().unwrap_or(0.0);
                    fields.push((
                        limit.as_str(),
                        json!(format!("{total} in all, {average:.1} a window")),
                    ));
                }
            }
            out.record(fields);
        }
    }
    Ok(())
}

fn query(args: &UsageArgs) -> UsageQuery {
    let mut query = match (&args.entity, &args.resource) {
        (Some(entity), Some(resource)) => UsageQuery::entity(entity).on(resource),
        (Some(entity), None) => UsageQuery::entity(entity),
        (None, Some(resource)) => UsageQuery::resource(resource),
        // clap requires one of them.
        (None, None) => UsageQuery::entity(""),
    }
    .between(args.from, args.to)
    .page_size(args.page_size);
    if let Some(window) = args.window {
        query = query.window(window);
    }
    if let Some(token) = &args.page_token {
        query = query.after(token);
    }
    query
}

/// `rpm=5 tpm=150` (and `tpm#od=1` for overdraws).
fn counters(s: &UsageSnapshot) -> String {
    s.counters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(s.overdrawn.iter().map(|(k, v)| format!("{k}#od={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A bar per window of `limit`'s usage, oldest on the left (snapshots of one window kind
/// and entity read best; others are drawn in start order all the same).
fn chart(snapshots: &[UsageSnapshot], limit: &str) -> String {
    let mut points: Vec<(&str, f32)> = snapshots
        .iter()
        .map(|s| {
            let used = s.counters.get(limit).copied().unwrap_or(0);
            (s.window_start.as_str(), used as f32)
        })
        .collect();
    points.sort_by(|a, b| a.0.cmp(b.0));
    if points.is_empty() {
        return format!("{limit}: no snapshots to draw");
    }
    // textplots draws each bar from the point before it: bar `i` spans `i..i + 1`.
    let bars: Vec<(f32, f32)> = std::iter::once((0.0, 0.0))
        .chain(
            points
                .iter()
                .enumerate()
                .map(|(i, (_, v))| ((i + 1) as f32, *v)),
        )
        .collect();
    let top = bars.iter().map(|(_, v)| *v).fold(0.0, f32::max);
    let mut out = format!(
        "{limit} per window, {} to {} (most {top}):\n",
        points[0].0,
        points[points.len() - 1].0
    );
    // One bar per window: a step to each value and back, `width` dots per window.
    let shape = Shape::Bars(&bars);
    let mut chart = Chart::new_with_y_range(120, 32, 0.0, points.len() as f32, 0.0, top.max(1.0));
    let chart = chart.lineplot(&shape);
    chart.axis();
    chart.figures();
    out.push_str(&chart.to_string());
    out
}

/// `resource capacity`: totals, then one row per entity.
pub fn capacity(out: &Out, capacity: &ResourceCapacity) {
    if out.json() {
        print_json(&serde_json::to_value(capacity).unwrap_or(Value::Null));
        return;
    }
    println!(
        "{} {}: {} of {} available ({:.1}% in use) over {} entities\n",
        capacity.resource,
        capacity.limit,
        capacity.available,
        capacity.capacity,
        capacity.utilisation,
        capacity.entities.len()
    );
    let rows = capacity
        .entities
        .iter()
        .map(|e| {
            vec![
                json!(e.entity_id),
                json!(e.parent_id),
                json!(e.capacity),
                json!(e.available),
                json!(format!("{:.1}%", e.utilisation)),
            ]
        })
        .collect();
    out.table(
        &["entity", "parent", "capacity", "available", "in_use"],
        rows,
    );
}
