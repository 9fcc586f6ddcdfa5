//! Stored limits at the system, resource and entity levels, and the outage policy.

use super::RateLimiter;
use crate::repository::{Access, ConfigScope};
use crate::{limit, naming, Error, Limit, OnUnavailable};

impl RateLimiter {
    async fn set_scope(&self, scope: ConfigScope, limits: &[Limit]) -> Result<(), Error> {
        if limits.is_empty() {
            return Err(Error::validation(
                "limits",
                "[]",
                "must not be empty; delete the limits instead",
            ));
        }
        limit::validate_all(limits)?;
        self.inner.repo.set_limits(&scope, limits).await?;
        self.invalidate_config_cache();
        Ok(())
    }

    async fn delete_scope(&self, scope: ConfigScope) -> Result<bool, Error> {
        let deleted = self.inner.repo.delete_limits(&scope).await?;
        self.invalidate_config_cache();
        Ok(deleted)
    }

    fn entity_scope(entity_id: &str, resource: &str) -> Result<ConfigScope, Error> {
        naming::validate_entity_id(entity_id)?;
        naming::validate_entity_config_resource(resource)?;
        Ok(ConfigScope::Entity {
            entity_id: entity_id.to_string(),
            resource: resource.to_string(),
        })
    }

    fn resource_scope(resource: &str) -> Result<ConfigScope, Error> {
        naming::validate_resource(resource)?;
        Ok(ConfigScope::Resource(resource.to_string()))
    }

    /// Stores system-wide limits (the lowest stored level).
    pub async fn set_system_limits(&self, limits: &[Limit]) -> Result<(), Error> {
        self.set_scope(ConfigScope::System, limits).await
    }

    /// Reads the system-wide limits.
    pub async fn get_system_limits(&self) -> Result<Option<Vec<Limit>>, Error> {
        self.inner.repo.get_limits(&ConfigScope::System).await
    }

    /// Deletes the system-wide limits; false if there were none.
    pub async fn delete_system_limits(&self) -> Result<bool, Error> {
        self.delete_scope(ConfigScope::System).await
    }

    /// Stores the system's policy for backend outages (`None` clears it: `Block`).
    pub async fn set_on_unavailable(&self, policy: Option<OnUnavailable>) -> Result<(), Error> {
        self.inner.repo.set_on_unavailable(policy).await?;
        self.invalidate_config_cache();
        Ok(())
    }

    /// Reads the system's policy for backend outages, if one is stored.
    pub async fn get_on_unavailable(&self) -> Result<Option<OnUnavailable>, Error> {
        self.inner.repo.get_on_unavailable().await
    }

    /// Every level that has limits stored (system, resources, entities), sorted by scope:
    /// the whole stored configuration, for export and comparison.
    pub async fn list_limits(&self) -> Result<Vec<(ConfigScope, Vec<Limit>)>, Error> {
        self.inner.repo.list_limits().await
    }

    /// Stores limits for a resource, for every entity without its own.
    pub async fn set_resource_limits(&self, resource: &str, limits: &[Limit]) -> Result<(), Error> {
        self.set_scope(Self::resource_scope(resource)?, limits)
            .await
    }

    /// Reads a resource's limits.
    pub async fn get_resource_limits(&self, resource: &str) -> Result<Option<Vec<Limit>>, Error> {
        self.inner
            .repo
            .get_limits(&Self::resource_scope(resource)?)
            .await
    }

    /// Deletes a resource's limits; false if there were none.
    pub async fn delete_resource_limits(&self, resource: &str) -> Result<bool, Error> {
        self.delete_scope(Self::resource_scope(resource)?).await
    }

    /// Stores limits for an entity on a resource; resource `"_default_"` means every
    /// resource without entity limits of its own.
    pub async fn set_entity_limits(
        &self,
        entity_id: &str,
        resource: &str,
        limits: &[Limit],
    ) -> Result<(), Error> {
        self.set_scope(Self::entity_scope(entity_id, resource)?, limits)
            .await
    }

    /// Reads an entity's limits for a resource (or `"_default_"`).
    pub async fn get_entity_limits(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<Option<Vec<Limit>>, Error> {
        self.inner
            .repo
            .get_limits(&Self::entity_scope(entity_id, resource)?)
            .await
    }

    /// Deletes an entity's limits for a resource (or `"_default_"`); false if none.
    pub async fn delete_entity_limits(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<bool, Error> {
        self.delete_scope(Self::entity_scope(entity_id, resource)?)
            .await
    }

    /// Switches `resource` off for every entity without a flag of its own, as the Python
    /// library's `disable_resource`: acquires fail with [`Error::ResourceDisabled`] (the
    /// layer answers 403). Returns how many bucket items were stamped.
    pub async fn disable_resource(&self, resource: &str) -> Result<usize, Error> {
        self.set_access(Self::resource_scope(resource)?, Some(Access::Disabled))
            .await
    }

    /// Switches `resource` on explicitly (overriding nothing above it: the resource is the
    /// top level the flag walks). Returns how many bucket items were unstamped.
    pub async fn enable_resource(&self, resource: &str) -> Result<usize, Error> {
        self.set_access(Self::resource_scope(resource)?, Some(Access::Enabled))
            .await
    }

    /// Removes the resource's flag: it inherits again (enabled).
    pub async fn clear_resource_disabled(&self, resource: &str) -> Result<usize, Error> {
        self.set_access(Self::resource_scope(resource)?, None).await
    }

    /// Switches `resource` off for one entity (`"_default_"`: every resource without a flag
    /// of the entity's own), as the Python library's `disable_entity`.
    pub async fn disable_entity(&self, entity_id: &str, resource: &str) -> Result<usize, Error> {
        self.set_access(
            Self::entity_scope(entity_id, resource)?,
            Some(Access::Disabled),
        )
        .await
    }

    /// Switches `resource` on for one entity, overriding a resource-wide disable.
    pub async fn enable_entity(&self, entity_id: &str, resource: &str) -> Result<usize, Error> {
        self.set_access(
            Self::entity_scope(entity_id, resource)?,
            Some(Access::Enabled),
        )
        .await
    }

    /// Removes the entity's own flag for `resource`: it inherits again.
    pub async fn clear_entity_disabled(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<usize, Error> {
        self.set_access(Self::entity_scope(entity_id, resource)?, None)
            .await
    }

    /// Bypasses `resource` for every entity without a flag of its own, as the Python
    /// library's `bypass_resource`: acquires are admitted whatever the balance and counted
    /// (`tc`), nothing is taken. For an incident or a migration, without deleting limits;
    /// undo it with [`Self::enable_resource`] or [`Self::clear_resource_disabled`].
    /// Returns how many bucket items were stamped.
    pub async fn bypass_resource(&self, resource: &str) -> Result<usize, Error> {
        self.set_access(Self::resource_scope(resource)?, Some(Access::Bypassed))
            .await
    }

    /// Bypasses `resource` for one entity (`"_default_"`: every resource without a flag of
    /// the entity's own), as the Python library's `bypass_entity`. A cascade parent is
    /// still enforced unless it is bypassed too.
    pub async fn bypass_entity(&self, entity_id: &str, resource: &str) -> Result<usize, Error> {
        self.set_access(
            Self::entity_scope(entity_id, resource)?,
            Some(Access::Bypassed),
        )
        .await
    }

    async fn set_access(&self, scope: ConfigScope, access: Option<Access>) -> Result<usize, Error> {
        let stamped = self.inner.repo.set_access(&scope, access).await?;
        self.invalidate_config_cache();
        Ok(stamped)
    }
}
