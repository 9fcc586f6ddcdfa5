//! Listing every stored limit of a namespace, for tools that export or compare the whole
//! configuration (`zae-limiter limits plan`).
//!
//! Config records are found through GSI4 (every record of the namespace, keys only) by
//! sort-key prefix, so bucket and audit records are never read; each config is then read
//! with a consistent `GetItem`.

use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::codec::{self, get_str, s, Item};
use super::{errors, keys, Inner};
use crate::repository::ConfigScope;
use crate::{Error, Limit};

/// How many config records are read at once.
const READ_CONCURRENCY: usize = 16;

impl Inner {
    /// Every level with limits stored in this namespace, sorted by scope.
    pub(super) async fn list_limits(&self) -> Result<Vec<(ConfigScope, Vec<Limit>)>, Error> {
        let mut found: Vec<(String, String)> = Vec::new();
        for prefix in [
            keys::system_pk(&self.ns),
            keys::resource_pk(&self.ns, ""),
            keys::entity_pk(&self.ns, ""),
        ] {
            found.extend(self.config_keys(&prefix).await?);
        }
        let mut all: Vec<(ConfigScope, Vec<Limit>)> = stream::iter(found)
            .map(|(pk, sk)| async move {
                let Some(scope) = self.scope_of(&pk, &sk) else {
                    return Ok(None);
                };
                let item = self.get_record(&pk, &sk).await?;
                Ok::<_, Error>(
                    item.as_ref()
                        .and_then(codec::config_limits)
                        .filter(|l| !l.is_empty())
                        .map(|limits| (scope, limits)),
                )
            })
            .buffer_unordered(READ_CONCURRENCY)
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// The keys of config records whose GSI4 sort key starts with `prefix`.
    async fn config_keys(&self, prefix: &str) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name("GSI4")
                .key_condition_expression("GSI4PK = :ns AND begins_with(GSI4SK, :prefix)")
                .filter_expression("begins_with(SK, :config)")
                .expression_attribute_values(":ns", s(&self.ns))
                .expression_attribute_values(":prefix", s(prefix))
                .expression_attribute_values(":config", s(keys::CONFIG_SK))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| errors::map("Query", &self.table, e))?;
            for item in page.items() {
                if let (Some(pk), Some(sk)) = (get_str(item, "PK"), get_str(item, "SK")) {
                    out.push((pk.to_string(), sk.to_string()));
                }
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                return Ok(out);
            }
        }
    }

    /// The config scope a record's key stands for.
    fn scope_of(&self, pk: &str, sk: &str) -> Option<ConfigScope> {
        if pk == keys::system_pk(&self.ns) && sk == keys::CONFIG_SK {
            return Some(ConfigScope::System);
        }
        if let Some(resource) = pk.strip_prefix(&keys::resource_pk(&self.ns, "")) {
            return (sk == keys::CONFIG_SK).then(|| ConfigScope::Resource(resource.to_string()));
        }
        let entity_id = pk.strip_prefix(&keys::entity_pk(&self.ns, ""))?;
        let resource = sk.strip_prefix(&keys::entity_config_sk(""))?;
        Some(ConfigScope::Entity {
            entity_id: entity_id.to_string(),
            resource: resource.to_string(),
        })
    }
}
