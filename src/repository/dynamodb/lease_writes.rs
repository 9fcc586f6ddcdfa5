//! Lease writes (adjust, commit, rollback, a cascade's give-back) that land exactly once.
//!
//! Each is one conditional update sent as a single-item `TransactWriteItems` with a
//! `ClientRequestToken`: DynamoDB applies a token at most once within ten minutes, so a
//! re-send (the SDK's retries, or ours) never debits or refunds twice. A write whose
//! outcome is unknown (a timeout, a response lost after the write landed) is remembered
//! under the caller's write id; the next write under that id first sends it again, token
//! and all, which tells whether it landed. [`crate::Lease`] gives every item write an id
//! and re-issues an unresolved one before anything else, so a commit or rollback that
//! timed out is neither lost nor applied twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update as TxUpdate,
};
use parking_lot::Mutex;

use super::acquire::{backoff, build_error};
use super::codec::{Image, Item};
use super::expr::{Expr, Update};
use super::{errors, Inner};
use crate::Error;

/// How long DynamoDB remembers a `ClientRequestToken` (ten minutes), less a margin for
/// clock and transit.
const TOKEN_WINDOW: Duration = Duration::from_secs(9 * 60);

/// Re-sends of one request after transaction conflicts or throttling (neither applied it).
const CONFLICT_RETRIES: usize = 8;

/// How a tokened write ended.
pub(super) enum Sent {
    /// Applied (now, or by an earlier send of the same token).
    Applied,
    /// A condition failed; the item as it was (`None`: it does not exist). Not applied.
    ConditionFailed(Option<Image>),
}

/// A write whose outcome is unknown, kept to be sent again with its token.
struct InDoubt {
    items: Vec<TransactWriteItem>,
    token: String,
    /// Whether it credits a bucket (a refund twice would over-admit).
    credits: bool,
    /// When it was first sent: its token dedupes for [`TOKEN_WINDOW`] from then.
    since: Instant,
}

/// The writes in doubt, by write id.
#[derive(Default)]
pub(super) struct InDoubtWrites(Mutex<HashMap<String, InDoubt>>);

impl InDoubtWrites {
    fn remember(&self, write_id: &str, doubt: InDoubt) {
        let mut map = self.0.lock();
        // Ids nobody re-issues (a caller that gave up) expire with their token.
        map.retain(|_, d| d.since.elapsed() < TOKEN_WINDOW * 2);
        map.insert(write_id.to_string(), doubt);
    }

    fn take(&self, write_id: &str) -> Option<InDoubt> {
        self.0.lock().remove(write_id)
    }

    /// How many writes are in doubt now.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
}

/// A fresh client request token (at most 36 characters).
fn new_token() -> String {
    format!("zl{:032x}", rand::random::<u128>())
}

impl Inner {
    /// Sends `update` to the item at `key` as a tokened single-item transaction (see the
    /// module docs), returning the item as it was when a condition failed.
    pub(super) async fn send_once(
        &self,
        write_id: &str,
        key: Item,
        update: &Update,
        expr: &Expr,
        credits: bool,
    ) -> Result<Sent, Error> {
        let tx = TxUpdate::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression(update.expression())
            .set_condition_expression(update.condition())
            .set_expression_attribute_names(expr.names())
            .set_expression_attribute_values(expr.values())
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(build_error)?;
        let doubt = InDoubt {
            items: vec![TransactWriteItem::builder().update(tx).build()],
            token: new_token(),
            credits,
            since: Instant::now(),
        };
        self.send_tokened(write_id, doubt).await
    }

    /// Sends a tokened transaction until its outcome is known; an unknown outcome is
    /// remembered under `write_id` and reported as [`Error::Unavailable`].
    async fn send_tokened(&self, write_id: &str, doubt: InDoubt) -> Result<Sent, Error> {
        let mut attempt = 0;
        loop {
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(doubt.items.clone()))
                .client_request_token(&doubt.token)
                .send()
                .await;
            let error = match sent {
                Ok(_) => return Ok(Sent::Applied),
                Err(e) => e,
            };
            if let Some(TransactWriteItemsError::TransactionCanceledException(c)) =
                error.as_service_error()
            {
                let failed = c
                    .cancellation_reasons()
                    .iter()
                    .find(|r| r.code() == Some("ConditionalCheckFailed"));
                if let Some(reason) = failed {
                    let image = reason.item().filter(|i| !i.is_empty()).map(Image::parse);
                    return Ok(Sent::ConditionFailed(image));
                }
                // A conflict with another transaction, or throttling: not applied.
                if attempt < CONFLICT_RETRIES {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
                return Err(errors::map("TransactWriteItems", &self.table, error));
            }
            if errors::retry_as_is(&error) && attempt < CONFLICT_RETRIES {
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
            if errors::outcome_unknown(&error) {
                let mapped = errors::map("TransactWriteItems", &self.table, error);
                self.in_doubt.remember(write_id, doubt);
                return Err(Error::Unavailable {
                    message: format!(
                        "{mapped}; the write's outcome is unknown and it will be sent again, \
                         with its idempotency token, before anything else is written for it"
                    ),
                    source: Some(Box::new(mapped)),
                });
            }
            return Err(errors::map("TransactWriteItems", &self.table, error));
        }
    }

    /// Resolves the write left in doubt under `write_id`, if any: `true` if it landed,
    /// `false` if it certainly did not (or there was none). Still unknown: `Unavailable`,
    /// and it stays in doubt.
    pub(super) async fn resolve_in_doubt(&self, write_id: &str) -> Result<bool, Error> {
        let Some(doubt) = self.in_doubt.take(write_id) else {
            return Ok(false);
        };
        if doubt.since.elapsed() >= TOKEN_WINDOW {
            // The token no longer dedupes, so a re-send could apply twice. A credit is
            // given up (a refund twice would over-admit); a debit is written again (never
            // under-charge).
            if doubt.credits {
                tracing::error!(
                    write_id,
                    "a credit's outcome stayed unknown past DynamoDB's ten-minute idempotency \
                     window; it is not sent again, so up to its amount may stay charged"
                );
                return Ok(true);
            }
            tracing::warn!(
                write_id,
                "a debit's outcome stayed unknown past DynamoDB's ten-minute idempotency \
                 window; it is written again"
            );
            return Ok(false);
        }
        Ok(match self.send_tokened(write_id, doubt).await? {
            Sent::Applied => true,
            Sent::ConditionFailed(_) => false,
        })
    }
}
