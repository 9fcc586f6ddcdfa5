//! `system|resource|entity set-limits|get-limits|delete-limits` and `system set-defaults`.

use serde_json::{json, Value};
use zae_limiter::repository::ConfigScope;
use zae_limiter::{Access, Error, Limit, OnUnavailable, RateLimiter};

use crate::args::{Global, OnUnavailableArg, ResourceCommand, SystemCommand};
use crate::connect;
use crate::failure::Outcome;
use crate::output::Out;

/// A scope for people: `system`, `resource gpt-4`, `entity key-1 (all resources)`.
pub fn describe(scope: &ConfigScope) -> String {
    match scope {
        ConfigScope::System => "system".into(),
        ConfigScope::Resource(r) => format!("resource {r}"),
        ConfigScope::Entity {
            entity_id,
            resource,
        } if resource == zae_limiter::naming::DEFAULT_RESOURCE => {
            format!("entity {entity_id} (all resources)")
        }
        ConfigScope::Entity {
            entity_id,
            resource,
        } => format!("entity {entity_id} on {resource}"),
    }
}

/// A scope for programs.
pub fn scope_json(scope: &ConfigScope) -> Value {
    match scope {
        ConfigScope::System => json!({ "level": "system" }),
        ConfigScope::Resource(r) => json!({ "level": "resource", "resource": r }),
        ConfigScope::Entity {
            entity_id,
            resource,
        } => json!({ "level": "entity", "entity_id": entity_id, "resource": resource }),
    }
}

/// Limits in their compact text form, joined.
pub fn specs(limits: &[Limit]) -> String {
    limits
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stores limits at a scope through the limiter's per-level methods (which validate).
pub async fn store(
    limiter: &RateLimiter,
    scope: &ConfigScope,
    limits: &[Limit],
) -> Result<(), Error> {
    match scope {
        ConfigScope::System => limiter.set_system_limits(limits).await,
        ConfigScope::Resource(r) => limiter.set_resource_limits(r, limits).await,
        ConfigScope::Entity {
            entity_id,
            resource,
        } => limiter.set_entity_limits(entity_id, resource, limits).await,
    }
}

/// Deletes the limits at a scope; false if there were none.
pub async fn remove(limiter: &RateLimiter, scope: &ConfigScope) -> Result<bool, Error> {
    match scope {
        ConfigScope::System => limiter.delete_system_limits().await,
        ConfigScope::Resource(r) => limiter.delete_resource_limits(r).await,
        ConfigScope::Entity {
            entity_id,
            resource,
        } => limiter.delete_entity_limits(entity_id, resource).await,
    }
}

pub async fn set(limiter: &RateLimiter, scope: ConfigScope, limits: &[Limit], out: Out) -> Outcome {
    store(limiter, &scope, limits).await?;
    out.message(
        format!("Stored limits for {}: {}.", describe(&scope), specs(limits)),
        json!({ "scope": scope_json(&scope), "limits": limits }),
    );
    Ok(())
}

pub async fn get(limiter: &RateLimiter, scope: ConfigScope, out: Out) -> Outcome {
    let limits = match &scope {
        ConfigScope::System => limiter.get_system_limits().await?,
        ConfigScope::Resource(r) => limiter.get_resource_limits(r).await?,
        ConfigScope::Entity {
            entity_id,
            resource,
        } => limiter.get_entity_limits(entity_id, resource).await?,
    };
    let on_unavailable = match scope {
        ConfigScope::System => Some(limiter.get_on_unavailable().await?),
        _ => None,
    };
    let limits = limits.unwrap_or_default();
    if out.json() {
        let mut body = json!({ "scope": scope_json(&scope), "limits": limits });
        if let Some(policy) = on_unavailable {
            body["on_unavailable"] = json!(policy.map(|p| p.as_str()));
        }
        out.message("", body);
        return Ok(());
    }
    if limits.is_empty() {
        println!("No limits stored for {}.", describe(&scope));
    } else {
        limits_table(&limits, out);
    }
    if let Some(policy) = on_unavailable {
        println!(
            "on_unavailable: {}",
            policy.map_or("not set (block)", |p| p.as_str())
        );
    }
    Ok(())
}

/// Limits as a table: name, capacity, refill, period, and the compact form.
pub fn limits_table(limits: &[Limit], out: Out) {
    let rows = limits
        .iter()
        .map(|l| {
            vec![
                json!(l.name),
                json!(l.capacity),
                json!(l.refill_amount),
                json!(l.refill_period_seconds),
                json!(l.to_string()),
            ]
        })
        .collect();
    out.table(
        &[
            "limit",
            "capacity",
            "refill_amount",
            "refill_period_seconds",
            "spec",
        ],
        rows,
    );
}

pub async fn delete(limiter: &RateLimiter, scope: ConfigScope, out: Out) -> Outcome {
    let deleted = remove(limiter, &scope).await?;
    out.message(
        if deleted {
            format!("Deleted the limits of {}.", describe(&scope))
        } else {
            format!("{} had no limits; nothing deleted.", describe(&scope))
        },
        json!({ "scope": scope_json(&scope), "deleted": deleted }),
    );
    Ok(())
}

pub async fn system(global: &Global, command: SystemCommand, out: Out) -> Outcome {
    let limiter = connect::limiter(global).await?;
    match command {
        SystemCommand::SetLimits(args) => {
            set(&limiter, ConfigScope::System, &args.limits, out).await
        }
        SystemCommand::GetLimits => get(&limiter, ConfigScope::System, out).await,
        SystemCommand::DeleteLimits => delete(&limiter, ConfigScope::System, out).await,
        SystemCommand::SetDefaults { on_unavailable } => {
            let policy = match on_unavailable {
                OnUnavailableArg::Allow => Some(OnUnavailable::Allow),
                OnUnavailableArg::Block => Some(OnUnavailable::Block),
                OnUnavailableArg::Unset => None,
            };
            limiter.set_on_unavailable(policy).await?;
            let shown = policy.map_or("not set (block)", |p| p.as_str());
            out.message(
                format!("on_unavailable: {shown}"),
                json!({ "on_unavailable": policy.map(|p| p.as_str()) }),
            );
            Ok(())
        }
    }
}

pub async fn resource(global: &Global, command: ResourceCommand, out: Out) -> Outcome {
    let limiter = connect::limiter(global).await?;
    match command {
        ResourceCommand::SetLimits { resource, limits } => {
            set(
                &limiter,
                ConfigScope::Resource(resource),
                &limits.limits,
                out,
            )
            .await
        }
        ResourceCommand::GetLimits { resource } => {
            get(&limiter, ConfigScope::Resource(resource), out).await
        }
        ResourceCommand::DeleteLimits { resource } => {
            delete(&limiter, ConfigScope::Resource(resource), out).await
        }
        ResourceCommand::Capacity {
            resource,
            limit,
            parents_only,
        } => {
            let capacity = limiter
                .resource_capacity(&resource, &limit, parents_only)
                .await?;
            super::usage::capacity(&out, &capacity);
            Ok(())
        }
        ResourceCommand::Disable { resource } => {
            let stamped = limiter.disable_resource(&resource).await?;
            flagged(
                out,
                &format!("resource {resource}"),
                Some(Access::Disabled),
                stamped,
            );
            Ok(())
        }
        ResourceCommand::Enable { resource } => {
            let stamped = limiter.enable_resource(&resource).await?;
            flagged(
                out,
                &format!("resource {resource}"),
                Some(Access::Enabled),
                stamped,
            );
            Ok(())
        }
        ResourceCommand::Bypass { resource } => {
            let stamped = limiter.bypass_resource(&resource).await?;
            flagged(
                out,
                &format!("resource {resource}"),
                Some(Access::Bypassed),
                stamped,
            );
            Ok(())
        }
        ResourceCommand::ClearDisabled { resource } => {
            let stamped = limiter.clear_resource_disabled(&resource).await?;
            flagged(out, &format!("resource {resource}"), None, stamped);
            Ok(())
        }
    }
}

/// Reports a `disabled` flag written and the buckets stamped.
pub fn flagged(out: Out, what: &str, access: Option<Access>, stamped: usize) {
    let (state, flag) = match access {
        Some(Access::Disabled) => ("disabled", json!(true)),
        Some(Access::Enabled) => ("enabled", json!(false)),
        Some(Access::Bypassed) => (
            "bypassed (admitted and counted, nothing taken)",
            json!("bypass"),
        ),
        None => ("inheriting", Value::Null),
    };
    out.message(
        format!("{what} is {state}; {stamped} bucket items stamped."),
        json!({ "target": what, "disabled": flag, "buckets_stamped": stamped }),
    );
}
