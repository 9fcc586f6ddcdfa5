//! `entity create|show|delete|children|status|set-limits|get-limits|delete-limits`.

use serde_json::json;
use zae_limiter::repository::ConfigScope;
use zae_limiter::{bucket, Access, Entity, Error};

use super::config;
use crate::args::{EntityCommand, Global};
use crate::connect;
use crate::failure::Outcome;
use crate::output::{duration_ms, timestamp, Out};

fn entity_scope(entity_id: String, resource: String) -> ConfigScope {
    ConfigScope::Entity {
        entity_id,
        resource,
    }
}

fn show(entity: &Entity, out: Out) {
    out.record(vec![
        ("id", json!(entity.id)),
        ("name", json!(entity.name)),
        ("parent_id", json!(entity.parent_id)),
        ("cascade", json!(entity.cascade)),
        ("metadata", json!(entity.metadata)),
        ("created_at", timestamp(entity.created_at_ms)),
    ]);
}

pub async fn run(global: &Global, command: EntityCommand, out: Out) -> Outcome {
    let limiter = connect::limiter(global).await?;
    match command {
        EntityCommand::Create {
            entity,
            name,
            parent,
            cascade,
            metadata,
        } => {
            let mut create = limiter.create_entity(&entity).cascade(cascade);
            if let Some(name) = name {
                create = create.name(name);
            }
            if let Some(parent) = parent {
                create = create.parent(parent);
            }
            for (k, v) in metadata {
                create = create.metadata(k, v);
            }
            let created = create.await?;
            show(&created, out);
        }
        EntityCommand::Show { entity } => {
            let found = limiter
                .get_entity(&entity)
                .await?
                .ok_or(Error::EntityNotFound { entity_id: entity })?;
            show(&found, out);
        }
        EntityCommand::Delete { entity } => {
            limiter.delete_entity(&entity).await?;
            out.message(
                format!("Deleted entity {entity} with its limits and buckets."),
                json!({ "entity_id": entity, "deleted": true }),
            );
        }
        EntityCommand::Children { entity } => {
            let rows = limiter
                .get_children(&entity)
                .await?
                .into_iter()
                .map(|c| {
                    vec![
                        json!(c.id),
                        json!(c.name),
                        json!(c.cascade),
                        timestamp(c.created_at_ms),
                    ]
                })
                .collect();
            out.table(&["id", "name", "cascade", "created_at"], rows);
        }
        EntityCommand::Status { entity, resource } => {
            let (limits, _, source) = limiter.resolve_limits(&entity, &resource).await?;
            let stored = limiter.bucket_states(&entity, &resource).await?;
            let now = limiter.now_ms();
            let rows = limits
                .iter()
                .map(|limit| {
                    // A limit with no bucket yet is full; a stored one is refilled to now
                    // under the limit as configured.
                    let state = zae_limiter::repository::reconcile_bucket(
                        stored.get(&limit.name),
                        limit,
                        now,
                    );
                    let tokens = bucket::available(&state, now);
                    let to_full = bucket::time_until_available(&state, limit.capacity, now);
                    vec![
                        json!(limit.name),
                        json!(tokens),
                        json!(limit.capacity),
                        json!(format!(
                            "{}/{}",
                            limit.refill_amount,
                            duration_ms(limit.refill_period_seconds * 1000)
                        )),
                        if out.json() {
                            json!(to_full)
                        } else {
                            json!(duration_ms(to_full))
                        },
                        json!(stored.contains_key(&limit.name)),
                        // Net consumption over the bucket's life: tokens a node holds in
                        // a reservation slice were taken, so they count here until they
                        // go back.
                        json!(state.total_consumed_milli / 1000),
                    ]
                })
                .collect();
            let to_full = if out.json() {
                "ms_to_full"
            } else {
                "time_to_full"
            };
            if !out.json() {
                println!(
                    "{entity} on {resource}: limits from {}",
                    serde_json::to_value(source)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                );
            }
            out.table(
                &[
                    "limit", "tokens", "capacity", "refill", to_full, "stored", "consumed",
                ],
                rows,
            );
            if !out.json() {
                println!(
                    "(tokens that limiters hold in reservation slices count as consumed until \
                     they go back; each limiter's own slices: RateLimiter::reservation)"
                );
            }
        }
        EntityCommand::SetLimits {
            entity,
            resource,
            limits,
        } => {
            config::set(
                &limiter,
                entity_scope(entity, resource),
                &limits.limits,
                out,
            )
            .await?
        }
        EntityCommand::GetLimits { entity, resource } => {
            config::get(&limiter, entity_scope(entity, resource), out).await?
        }
        EntityCommand::DeleteLimits { entity, resource } => {
            config::delete(&limiter, entity_scope(entity, resource), out).await?
        }
        EntityCommand::Disable { entity, resource } => {
            let stamped = limiter.disable_entity(&entity, &resource).await?;
            config::flagged(
                out,
                &format!("{entity} on {resource}"),
                Some(Access::Disabled),
                stamped,
            );
        }
        EntityCommand::Enable { entity, resource } => {
            let stamped = limiter.enable_entity(&entity, &resource).await?;
            config::flagged(
                out,
                &format!("{entity} on {resource}"),
                Some(Access::Enabled),
                stamped,
            );
        }
        EntityCommand::Bypass { entity, resource } => {
            let stamped = limiter.bypass_entity(&entity, &resource).await?;
            config::flagged(
                out,
                &format!("{entity} on {resource}"),
                Some(Access::Bypassed),
                stamped,
            );
        }
        EntityCommand::ClearDisabled { entity, resource } => {
            let stamped = limiter.clear_entity_disabled(&entity, &resource).await?;
            config::flagged(out, &format!("{entity} on {resource}"), None, stamped);
        }
    }
    Ok(())
}
