//! `deploy`, `status`, `delete`, `cfn-template`, `version`, `check`: the table as a whole.

use serde_json::{json, Value};
use zae_limiter::repository::dynamodb::{
    check_schema_version, Billing, TableOptions, TableStatusReport, SCHEMA_VERSION,
};
use zae_limiter::Error;

use super::confirm;
use crate::args::{BillingArg, CfnTemplateArgs, Global, TableOptionArgs};
use crate::connect;
use crate::failure::{Failure, Outcome, ERROR, NOT_FOUND};
use crate::output::Out;

fn options(args: &TableOptionArgs) -> Result<TableOptions, Failure> {
    let billing = match args.billing {
        BillingArg::OnDemand => Billing::OnDemand,
        BillingArg::Provisioned => {
            if args.read_capacity < 1 || args.write_capacity < 1 {
                return Err(Failure::bad_arguments(format!(
                    "provisioned capacity must be at least 1 (got read {}, write {})",
                    args.read_capacity, args.write_capacity
                )));
            }
            Billing::Provisioned {
                read: args.read_capacity,
                write: args.write_capacity,
            }
        }
    };
    Ok(TableOptions {
        billing,
        stream: args.stream,
        point_in_time_recovery: args.pitr,
        deletion_protection: args.deletion_protection,
        tags: args.tags.clone(),
    })
}

fn billing_text(report: &TableStatusReport) -> String {
    match report.provisioned {
        Some((r, w)) if report.billing == "PROVISIONED" => {
            format!("provisioned ({r} RCU, {w} WCU)")
        }
        _ if report.billing == "PAY_PER_REQUEST" => "on-demand".into(),
        _ => report.billing.to_lowercase(),
    }
}

/// The requested options an existing table does not have and `deploy` leaves alone
/// (billing and stream; PITR where the endpoint has none).
fn differences(wanted: &TableOptions, live: &TableStatusReport) -> Vec<String> {
    let mut out = Vec::new();
    let live_provisioned = live.billing == "PROVISIONED";
    match wanted.billing {
        Billing::OnDemand if live_provisioned => out.push("billing is provisioned".into()),
        Billing::Provisioned { .. } if !live_provisioned => out.push("billing is on-demand".into()),
        _ => {}
    }
    match (wanted.point_in_time_recovery, live.point_in_time_recovery) {
        (true, Some(false)) => out.push("point-in-time recovery is off".into()),
        (true, None) => out.push("this endpoint has no point-in-time recovery".into()),
        _ => {}
    }
    if wanted.stream && live.stream.is_none() {
        out.push("no stream".into());
    }
    out
}

pub async fn deploy(global: &Global, args: &TableOptionArgs, out: Out) -> Outcome {
    let options = options(args)?;
    let existing = match connect::table(global).await {
        Ok(table) => Some(table),
        Err(f) if f.code == NOT_FOUND => None,
        Err(f) => return Err(f),
    };
    let existed = existing.is_some();
    let repo = connect::builder(global)
        .table_options(options.clone())
        .build()
        .await?;
    let table = match existing {
        Some(table) => table,
        None => connect::table(global).await?,
    };
    let enabled = if existed {
        table.enable_options(&options).await?
    } else {
        Vec::new()
    };
    let report = table.status().await?;
    let unmet = if existed {
        differences(&options, &report)
    } else {
        Vec::new()
    };
    let mut lines = vec![if existed && enabled.is_empty() {
        format!("Table {} exists; unchanged.", report.table)
    } else if existed {
        format!("Table {} exists; {}.", report.table, enabled.join("; "))
    } else {
        format!(
            "Created table {} ({}{}{}{}).",
            report.table,
            billing_text(&report),
            match (
                options.point_in_time_recovery,
                report.point_in_time_recovery
            ) {
                (_, Some(true)) => ", point-in-time recovery",
                (true, _) => ", point-in-time recovery not supported by this endpoint",
                _ => "",
            },
            if report.deletion_protection {
                ", deletion protection"
            } else {
                ""
            },
            if report.stream.is_some() {
                ", stream"
            } else {
                ""
            },
        )
    }];
    if !unmet.is_empty() {
        lines.push(format!(
            "note: the existing table differs from the options given: {}; deploy does not change billing or streams, change them with the AWS console or CLI",
            unmet.join(", ")
        ));
    }
    lines.push(format!(
        "Namespace {} is registered (id {}).",
        repo.namespace(),
        repo.namespace_id()
    ));
    out.message(
        lines.join("\n"),
        json!({
            "table": report.table,
            "created": !existed,
            "namespace": repo.namespace(),
            "namespace_id": repo.namespace_id(),
            "billing": report.billing,
            "point_in_time_recovery": report.point_in_time_recovery,
            "deletion_protection": report.deletion_protection,
            "stream": report.stream,
            "changed": enabled,
            "differences": unmet,
        }),
    );
    Ok(())
}

pub async fn status(global: &Global, out: Out) -> Outcome {
    let table = connect::table(global).await?;
    let report = table.status().await?;
    let namespaces = table.namespaces().await?;
    let compatible = report
        .schema_version
        .as_deref()
        .map(|v| check_schema_version(v).is_ok());
    let names: Vec<Value> = namespaces
        .iter()
        .filter(|n| n.status == "active")
        .map(|n| json!(n.name))
        .collect();
    out.record(vec![
        ("table", json!(report.table)),
        ("status", json!(report.status)),
        (
            "billing",
            if out.json() {
                json!(report.billing)
            } else {
                json!(billing_text(&report))
            },
        ),
        ("items", json!(report.item_count)),
        ("namespaces", Value::Array(names)),
        ("schema_version", json!(report.schema_version)),
        ("compatible", json!(compatible)),
        ("stream", json!(report.stream)),
        ("ttl", json!(report.ttl_enabled)),
        (
            "point_in_time_recovery",
            json!(report.point_in_time_recovery),
        ),
        ("deletion_protection", json!(report.deletion_protection)),
    ]);
    Ok(())
}

pub async fn delete(global: &Global, yes: bool, out: Out) -> Outcome {
    let table = connect::table(global).await?;
    confirm(
        &format!("delete table {} and every namespace in it", table.name()),
        table.name(),
        yes,
    )?;
    match table.delete().await {
        Ok(()) => {}
        Err(e @ Error::Backend { .. }) if table.status().await.is_ok_and(|r| r.deletion_protection) => {
            return Err(Failure::from(e).hint(format!(
                "deletion protection is on; turn it off first: aws dynamodb update-table --table-name {} --no-deletion-protection-enabled",
                table.name()
            )))
        }
        Err(e) => return Err(e.into()),
    }
    out.message(
        format!("Deleted table {}.", table.name()),
        json!({ "table": table.name(), "deleted": true }),
    );
    Ok(())
}

pub fn cfn_template(global: &Global, args: &CfnTemplateArgs, out: Out) -> Outcome {
    let options = options(&args.table)?;
    let template = if args.aggregator {
        options.cloudformation_template_with_aggregator(&global.table)
    } else {
        options.cloudformation_template(&global.table)
    };
    if out.json() {
        out.message("", template);
    } else {
        let yaml = serde_norway::to_string(&template)
            .map_err(|e| Failure::new(ERROR, format!("rendering YAML: {e}")))?;
        print!("{yaml}");
    }
    Ok(())
}

pub async fn list(global: &Global, out: Out) -> Outcome {
    let tables = connect::builder(global).discover_tables().await?;
    let rows = tables
        .into_iter()
        .map(|t| {
            vec![
                json!(t.table),
                json!(t.schema_version),
                json!(t.compatible),
                json!(t.namespaces),
                json!(t.stream),
                json!(t.aggregator),
            ]
        })
        .collect();
    out.table(
        &[
            "table",
            "schema_version",
            "compatible",
            "namespaces",
            "stream",
            "aggregator",
        ],
        rows,
    );
    Ok(())
}

pub fn version(out: Out) {
    out.record(vec![
        ("client_version", json!(env!("CARGO_PKG_VERSION"))),
        ("schema_version", json!(SCHEMA_VERSION)),
    ]);
}

pub async fn check(global: &Global, out: Out) -> Outcome {
    let table = connect::table(global).await?;
    let Some(stored) = table.schema_version().await? else {
        return Err(Failure::new(
            NOT_FOUND,
            format!(
                "table {} has no zae-limiter version record",
                table.name()
            ),
        )
        .hint("run `zae-limiter deploy` to write it (a table created from `cfn-template` needs this once)"));
    };
    check_schema_version(&stored).map_err(|e| Failure::from(e).hint(format!(
        "this client (zae-limiter {}) reads and writes schema {SCHEMA_VERSION}; use a release for schema {stored}",
        env!("CARGO_PKG_VERSION")
    )))?;
    // Records using Python library features this client refuses (fail closed) rather
    // than enforce with other numbers.
    let uses = table.unsupported_features().await?;
    let names: std::collections::HashMap<String, String> = table
        .namespaces()
        .await?
        .into_iter()
        .map(|n| (n.id, n.name))
        .collect();
    let namespace = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for u in &uses {
        *counts.entry(u.feature.as_str()).or_default() += 1;
    }
    let unsupported = if out.json() {
        json!(uses
            .iter()
            .map(|u| json!({
                "feature": u.feature,
                "namespace": namespace(&u.namespace_id),
                "record": u.record,
                "subject": u.subject,
            }))
            .collect::<Vec<_>>())
    } else if uses.is_empty() {
        json!("none")
    } else {
        let parts: Vec<String> = counts.iter().map(|(f, n)| format!("{f} ({n})")).collect();
        json!(format!(
            "{}; acquires on these records fail until this client supports them",
            parts.join(", ")
        ))
    };
    out.record(vec![
        ("table", json!(table.name())),
        ("schema_version", json!(stored)),
        ("client_schema_version", json!(SCHEMA_VERSION)),
        ("client_version", json!(env!("CARGO_PKG_VERSION"))),
        ("compatible", json!(true)),
        ("unsupported_features", unsupported),
    ]);
    if !out.json() {
        const SHOWN: usize = 50;
        for u in uses.iter().take(SHOWN) {
            println!(
                "  {}: {} {} {}",
                u.feature,
                namespace(&u.namespace_id),
                u.record,
                u.subject
            );
        }
        if uses.len() > SHOWN {
            println!(
                "  ... and {} more (--output json lists all)",
                uses.len() - SHOWN
            );
        }
    }
    Ok(())
}
