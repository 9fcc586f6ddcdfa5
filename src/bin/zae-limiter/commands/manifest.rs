//! `limits plan|diff|apply -f limits.yaml`: compare the live limits with a manifest, and
//! make them equal.

use std::io::Read;

use serde_json::{json, Value};
use zae_limiter::repository::ConfigScope;
use zae_limiter::{Limit, OnUnavailable, RateLimiter};

use super::config::{describe, remove, scope_json, specs, store};
use crate::args::{Global, ManifestArgs, ManifestCommand};
use crate::connect;
use crate::failure::{Failure, Outcome, ERROR};
use crate::manifest::{self, Desired};
use crate::output::Out;

/// One difference between the live state and the manifest.
#[derive(Debug)]
enum Change {
    Add(ConfigScope, Vec<Limit>),
    Update(ConfigScope, Vec<Limit>, Vec<Limit>),
    Delete(ConfigScope, Vec<Limit>),
    Policy(Option<OnUnavailable>, Option<OnUnavailable>),
}

fn sorted(mut limits: Vec<Limit>) -> Vec<Limit> {
    limits.sort_by(|a, b| a.name.cmp(&b.name));
    limits
}

fn policy_text(p: Option<OnUnavailable>) -> &'static str {
    p.map_or("not set", |p| p.as_str())
}

/// What it takes to go from `live` to `desired`: additions and updates in scope order,
/// then deletions.
fn changes(live: Desired, desired: &Desired) -> Vec<Change> {
    let mut out = Vec::new();
    let mut live_limits = live.limits;
    for (scope, wanted) in &desired.limits {
        let wanted = sorted(wanted.clone());
        match live_limits.remove(scope).map(sorted) {
            None => out.push(Change::Add(scope.clone(), wanted)),
            Some(have) if have != wanted => out.push(Change::Update(scope.clone(), have, wanted)),
            Some(_) => {}
        }
    }
    if live.on_unavailable != desired.on_unavailable {
        out.push(Change::Policy(live.on_unavailable, desired.on_unavailable));
    }
    for (scope, have) in live_limits {
        out.push(Change::Delete(scope, sorted(have)));
    }
    out
}

/// Per-limit detail of an update: `tpm:100 -> tpm:200`, `+ rpm:5`, `- rph:9`.
fn update_detail(have: &[Limit], wanted: &[Limit]) -> String {
    let mut parts = Vec::new();
    for w in wanted {
        match have.iter().find(|h| h.name == w.name) {
            None => parts.push(format!("+{w}")),
            Some(h) if h != w => parts.push(format!("{h} -> {w}")),
            Some(_) => {}
        }
    }
    for h in have {
        if !wanted.iter().any(|w| w.name == h.name) {
            parts.push(format!("-{h}"));
        }
    }
    parts.join(", ")
}

fn change_json(change: &Change) -> Value {
    match change {
        Change::Add(scope, after) => {
            json!({ "action": "add", "scope": scope_json(scope), "before": null, "after": after })
        }
        Change::Update(scope, before, after) => {
            json!({ "action": "change", "scope": scope_json(scope), "before": before, "after": after })
        }
        Change::Delete(scope, before) => {
            json!({ "action": "delete", "scope": scope_json(scope), "before": before, "after": null })
        }
        Change::Policy(before, after) => json!({
            "action": "change",
            "scope": { "level": "system", "setting": "on_unavailable" },
            "before": before.map(|p| p.as_str()),
            "after": after.map(|p| p.as_str()),
        }),
    }
}

/// Counts of additions, changes and deletions.
fn counts(changes: &[Change]) -> (usize, usize, usize) {
    changes
        .iter()
        .fold((0, 0, 0), |(a, c, d), change| match change {
            Change::Add(..) => (a + 1, c, d),
            Change::Update(..) | Change::Policy(..) => (a, c + 1, d),
            Change::Delete(..) => (a, c, d + 1),
        })
}

fn read_manifest(args: &ManifestArgs) -> Result<Desired, Failure> {
    let path = &args.file;
    let text = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::bad_arguments(format!("reading the manifest from stdin: {e}")))?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|e| {
            Failure::bad_arguments(format!("cannot read manifest {}: {e}", path.display()))
        })?
    };
    manifest::parse(&text).map_err(|e| {
        Failure::bad_arguments(format!("invalid manifest {}: {e}", path.display())).hint(
            "each limit needs a positive `capacity`; optional: refill_amount, period (seconds or 30s/1m/1h), burst",
        )
    })
}

async fn live(limiter: &RateLimiter) -> Result<Desired, Failure> {
    Ok(Desired {
        limits: limiter.list_limits().await?.into_iter().collect(),
        on_unavailable: limiter.get_on_unavailable().await?,
    })
}

pub async fn run(global: &Global, command: ManifestCommand, out: Out) -> Outcome {
    let args = match &command {
        ManifestCommand::Plan(args) => args,
        ManifestCommand::Diff { manifest, .. } => manifest,
        ManifestCommand::Apply(args) => args,
        ManifestCommand::Export => return export(global, out).await,
    };
    // Validate the whole manifest before touching the table.
    let desired = read_manifest(args)?;
    let limiter = connect::limiter(global).await?;
    let changes = changes(live(&limiter).await?, &desired);
    let (add, change, delete) = counts(&changes);
    match command {
        ManifestCommand::Plan(_) => {
            if out.json() {
                out.message(
                    "",
                    json!({
                        "changes": changes.iter().map(change_json).collect::<Vec<_>>(),
                        "summary": { "add": add, "change": change, "delete": delete },
                    }),
                );
            } else {
                for c in &changes {
                    println!("{}", plan_line(c));
                }
                if changes.is_empty() {
                    println!("No changes: the live limits match the manifest.");
                } else {
                    println!("Plan: {add} to add, {change} to change, {delete} to delete.");
                }
            }
        }
        ManifestCommand::Diff { exit_code, .. } => {
            if out.json() {
                out.message(
                    "",
                    json!({
                        "drift": !changes.is_empty(),
                        "differences": changes.iter().map(change_json).collect::<Vec<_>>(),
                    }),
                );
            } else if changes.is_empty() {
                println!("No drift: the live limits match {}.", args.file.display());
            } else {
                for c in &changes {
                    println!("{}", drift_line(c));
                }
                println!(
                    "Drift: {} difference(s) between the table and {}.",
                    changes.len(),
                    args.file.display()
                );
            }
            if exit_code && !changes.is_empty() {
                return Err(
                    Failure::new(ERROR, "the live limits differ from the manifest").hint(format!(
                        "`zae-limiter limits apply -f {}` makes them equal",
                        args.file.display()
                    )),
                );
            }
        }
        ManifestCommand::Export => {} // answered above
        ManifestCommand::Apply(_) => {
            for c in &changes {
                apply_one(&limiter, c).await?;
            }
            out.message(
                format!(
                    "Applied {}: {add} added, {change} changed, {delete} deleted.",
                    args.file.display()
                ),
                json!({ "added": add, "changed": change, "deleted": delete }),
            );
        }
    }
    Ok(())
}

/// Prints the live limits as a manifest: YAML, or JSON with `--output json` (which the
/// manifest reader takes as well).
async fn export(global: &Global, out: Out) -> Outcome {
    let limiter = connect::limiter(global).await?;
    let manifest = manifest::render(&live(&limiter).await?);
    if out.json() {
        out.message("", manifest);
        return Ok(());
    }
    let yaml = serde_norway::to_string(&manifest)
        .map_err(|e| Failure::new(ERROR, format!("rendering YAML: {e}")))?;
    println!(
        "# zae-limiter limits of table {}, namespace {}",
        global.table, global.namespace
    );
    if manifest.as_object().is_some_and(|m| m.is_empty()) {
        println!("# (nothing stored)");
    } else {
        print!("{yaml}");
    }
    Ok(())
}

fn plan_line(change: &Change) -> String {
    match change {
        Change::Add(scope, after) => format!("+ {}: {}", describe(scope), specs(after)),
        Change::Update(scope, before, after) => {
            format!("~ {}: {}", describe(scope), update_detail(before, after))
        }
        Change::Delete(scope, before) => format!("- {}: {}", describe(scope), specs(before)),
        Change::Policy(before, after) => format!(
            "~ system on_unavailable: {} -> {}",
            policy_text(*before),
            policy_text(*after)
        ),
    }
}

fn drift_line(change: &Change) -> String {
    match change {
        Change::Add(scope, after) => {
            format!(
                "missing from the table: {} ({})",
                describe(scope),
                specs(after)
            )
        }
        Change::Update(scope, before, after) => format!(
            "differs: {}: table has {}; manifest has {}",
            describe(scope),
            specs(before),
            specs(after)
        ),
        Change::Delete(scope, before) => {
            format!(
                "not in the manifest: {} ({})",
                describe(scope),
                specs(before)
            )
        }
        Change::Policy(before, after) => format!(
            "differs: system on_unavailable: table has {}; manifest has {}",
            policy_text(*before),
            policy_text(*after)
        ),
    }
}

async fn apply_one(limiter: &RateLimiter, change: &Change) -> Outcome {
    match change {
        Change::Add(scope, limits) | Change::Update(scope, _, limits) => {
            store(limiter, scope, limits).await?
        }
        Change::Delete(scope, _) => {
            remove(limiter, scope).await?;
        }
        Change::Policy(_, after) => limiter.set_on_unavailable(*after).await?,
    }
    Ok(())
}
