//! Entities: create, read, delete, list children.

use std::collections::BTreeMap;
use std::future::IntoFuture;

use super::{BoxFuture, RateLimiter};
use crate::{naming, Entity, Error, Field};

impl RateLimiter {
    /// Starts creating an entity; set options, then `.await` it.
    pub fn create_entity(&self, entity_id: impl Into<String>) -> CreateEntity {
        CreateEntity {
            limiter: self.clone(),
            id: entity_id.into(),
            name: None,
            parent_id: None,
            cascade: false,
            metadata: BTreeMap::new(),
        }
    }

    /// Reads an entity.
    pub async fn get_entity(&self, entity_id: &str) -> Result<Option<Entity>, Error> {
        naming::validate_entity_id(entity_id)?;
        self.inner.repo.get_entity(entity_id).await
    }

    /// Deletes an entity with its stored limits and buckets; [`Error::EntityNotFound`] if
    /// it does not exist. Its children keep their `parent_id` but cascade to nothing.
    pub async fn delete_entity(&self, entity_id: &str) -> Result<(), Error> {
        naming::validate_entity_id(entity_id)?;
        let existed = self.inner.repo.delete_entity(entity_id).await?;
        self.invalidate_config_cache();
        if existed {
            Ok(())
        } else {
            Err(Error::EntityNotFound {
                entity_id: entity_id.to_string(),
            })
        }
    }

    /// The entities whose parent is `parent_id`, by id.
    pub async fn get_children(&self, parent_id: &str) -> Result<Vec<Entity>, Error> {
        naming::validate_identifier(Field::ParentId, parent_id)?;
        self.inner.repo.get_children(parent_id).await
    }
}

/// An entity being created: `.name`, `.parent`, `.cascade`, `.metadata`, then `.await`.
#[must_use = "nothing is created until it is awaited"]
#[derive(Debug)]
pub struct CreateEntity {
    limiter: RateLimiter,
    id: String,
    name: Option<String>,
    parent_id: Option<String>,
    cascade: bool,
    metadata: BTreeMap<String, String>,
}

impl CreateEntity {
    /// A display name (default: the id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The parent entity.
    pub fn parent(mut self, parent_id: impl Into<String>) -> Self {
        self.parent_id = Some(parent_id.into());
        self
    }

    /// Whether acquires also charge the parent (default false).
    pub fn cascade(mut self, cascade: bool) -> Self {
        self.cascade = cascade;
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    async fn run(self) -> Result<Entity, Error> {
        naming::validate_entity_id(&self.id)?;
        if let Some(parent) = &self.parent_id {
            naming::validate_identifier(Field::ParentId, parent)?;
            if parent == &self.id {
                return Err(Error::validation(
                    "parent_id",
                    parent.clone(),
                    "an entity cannot be its own parent",
                ));
            }
        }
        let entity = Entity {
            name: self.name.unwrap_or_else(|| self.id.clone()),
            id: self.id,
            parent_id: self.parent_id,
            cascade: self.cascade,
            metadata: self.metadata,
            created_at_ms: self.limiter.now_ms(),
        };
        self.limiter.inner.repo.create_entity(&entity).await?;
        self.limiter.invalidate_config_cache();
        Ok(entity)
    }
}

impl IntoFuture for CreateEntity {
    type Output = Result<Entity, Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
