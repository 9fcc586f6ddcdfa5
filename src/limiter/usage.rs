//! Usage and capacity queries on [`RateLimiter`]: usage snapshots (the aggregator's), their
//! summary, and how much of a limit is in use now across a resource's entities.

use super::RateLimiter;
use crate::naming;
use crate::usage::{
    EntityCapacity, ResourceCapacity, UsagePage, UsageQuery, UsageScope, UsageSummary,
};
use crate::Error;

/// Snapshots read per call while summarising.
const SUMMARY_PAGE: usize = 1_000;

impl RateLimiter {
    /// One page of usage snapshots, newest first: an entity's (on one resource or all), or
    /// every entity's on a resource. Pages are full (only the last is shorter); pass
    /// [`UsagePage::next_page_token`] to [`UsageQuery::after`] for the next. Needs a backend
    /// that keeps snapshots (DynamoDB, with the aggregator running); the in-memory one
    /// answers [`Error::NotSupported`].
    pub async fn usage_snapshots(&self, query: &UsageQuery) -> Result<UsagePage, Error> {
        match &query.scope {
            UsageScope::Entity {
                entity_id,
                resource,
            } => {
                naming::validate_entity_id(entity_id)?;
                if let Some(r) = resource {
                    naming::validate_resource(r)?;
                }
            }
            UsageScope::Resource(r) => naming::validate_resource(r)?,
        }
        if let (Some(from), Some(to)) = (query.from_ms, query.to_ms) {
            if from > to {
                return Err(Error::validation(
                    "to",
                    to.to_string(),
                    "the range ends before it starts",
                ));
            }
        }
        self.inner.repo.usage_snapshots(query).await
    }

    /// Totals and averages per limit over every snapshot `query` matches (all pages).
    pub async fn usage_summary(&self, query: &UsageQuery) -> Result<UsageSummary, Error> {
        let mut query = query.clone().page_size(SUMMARY_PAGE);
        query.page_token = None;
        let mut snapshots = Vec::new();
        loop {
            let page = self.usage_snapshots(&query).await?;
            snapshots.extend(page.snapshots);
            match page.next_page_token {
                Some(token) => query.page_token = Some(token),
                None => return Ok(UsageSummary::of(&snapshots)),
            }
        }
    }

    /// Limit `limit` of `resource` now, across every entity with a bucket for it (only the
    /// entities without a parent when `parents_only`): capacity, available and
    /// utilisation, in total and per entity.
    pub async fn resource_capacity(
        &self,
        resource: &str,
        limit: &str,
        parents_only: bool,
    ) -> Result<ResourceCapacity, Error> {
        naming::validate_resource(resource)?;
        naming::validate_limit_name(limit)?;
        let now = self.now_ms();
        let entities = self
            .inner
            .repo
            .resource_buckets(resource)
            .await?
            .into_iter()
            .filter(|b| !parents_only || b.parent_id.is_none())
            .filter_map(|b| {
                let state = b.states.get(limit)?;
                Some(EntityCapacity::of(&b.entity_id, b.parent_id, state, now))
            })
            .collect();
        Ok(ResourceCapacity::of(resource, limit, entities))
    }

    /// One entity's limit `limit` of `resource` now; `None` when it has no bucket for it.
    pub async fn entity_capacity(
        &self,
        entity_id: &str,
        resource: &str,
        limit: &str,
    ) -> Result<Option<EntityCapacity>, Error> {
        naming::validate_limit_name(limit)?;
        let states = self.bucket_states(entity_id, resource).await?;
        let Some(state) = states.get(limit) else {
            return Ok(None);
        };
        let parent = self
            .inner
            .repo
            .get_entity(entity_id)
            .await?
            .and_then(|e| e.parent_id);
        Ok(Some(EntityCapacity::of(
            entity_id,
            parent,
            state,
            self.now_ms(),
        )))
    }
}
