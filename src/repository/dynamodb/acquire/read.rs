//! Reads of bucket items: one, or a batch.

use super::MAX_ATTEMPTS;
use aws_sdk_dynamodb::types::KeysAndAttributes;

use crate::repository::dynamodb::codec::{self, Image, Item};
use crate::repository::dynamodb::errors::build_error;
use crate::repository::dynamodb::retry::backoff;
use crate::repository::dynamodb::{errors, keys, table, Inner};
use crate::repository::ItemRequest;
use crate::Error;

impl Inner {
    /// The key of an entity's bucket item in `slot` (see [`keys::slot`]).
    pub(in crate::repository::dynamodb) fn bucket_key(&self, entity_id: &str, slot: &str) -> Item {
        codec::key(keys::bucket_pk(&self.ns, entity_id, slot), keys::STATE_SK)
    }

    /// A consistent read of an entity's bucket item in `slot` (see [`keys::slot`]).
    pub(in crate::repository::dynamodb) async fn read_bucket(
        &self,
        entity_id: &str,
        slot: &str,
    ) -> Result<Option<Image>, Error> {
        let pk = keys::bucket_pk(&self.ns, entity_id, slot);
        let item = table::get_item(&self.client, &self.table, &pk, keys::STATE_SK).await?;
        Ok(item.as_ref().map(Image::parse))
    }

    /// Consistent reads of several bucket items in one `BatchGetItem`, in order.
    pub(super) async fn read_buckets(
        &self,
        items: &[&ItemRequest],
    ) -> Result<Vec<Option<Image>>, Error> {
        let keys: Vec<Item> = items
            .iter()
            .map(|i| self.bucket_key(&i.entity_id, &super::slot(i)))
            .collect();
        let found = self.batch_get(keys.clone(), true).await?;
        Ok(keys
            .iter()
            .map(|k| {
                found
                    .iter()
                    .find(|f| f.get("PK") == k.get("PK"))
                    .map(Image::parse)
            })
            .collect())
    }

    /// `BatchGetItem` of up to 100 keys of the table (see [`batch_get`]).
    pub(in crate::repository::dynamodb) async fn batch_get(
        &self,
        keys: Vec<Item>,
        consistent: bool,
    ) -> Result<Vec<Item>, Error> {
        batch_get(&self.client, &self.table, keys, consistent).await
    }
}

/// `BatchGetItem` of up to 100 keys, retrying unprocessed keys; never returns a partial
/// answer (a missing record would read as "nothing stored").
pub(crate) async fn batch_get(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    keys: Vec<Item>,
    consistent: bool,
) -> Result<Vec<Item>, Error> {
    let mut pending = Some(
        KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .consistent_read(consistent)
            .build()
            .map_err(build_error)?,
    );
    let mut found = Vec::new();
    for attempt in 0..MAX_ATTEMPTS {
        let Some(request) = pending.take() else {
            return Ok(found);
        };
        let out = client
            .batch_get_item()
            .request_items(table, request)
            .send()
            .await
            .map_err(|e| errors::map("BatchGetItem", table, e))?;
        if let Some(items) = out.responses().and_then(|r| r.get(table)) {
            found.extend(items.iter().cloned());
        }
        pending = out
            .unprocessed_keys()
            .and_then(|u| u.get(table))
            .filter(|k| !k.keys().is_empty())
            .cloned();
        if pending.is_some() {
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
    Err(Error::Unavailable {
        message: "DynamoDB BatchGetItem left keys unprocessed after retries (throttled)".into(),
        source: None,
    })
}
