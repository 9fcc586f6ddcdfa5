//! SDK errors as the crate's [`Error`]: transient failures (network, timeouts, throttling,
//! server errors) become [`Error::Unavailable`], which the outage policy decides on; a
//! missing table becomes [`TableError::TableNotFound`]; anything retrying cannot fix
//! (access denied, a malformed request) becomes [`Error::Backend`], which never admits.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

use super::codec::Image;
use crate::{Error, ErrorCategory};

/// What only the DynamoDB backend can find wrong: its table or namespace is missing or not
/// usable by this client ([`Error::Table`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// The table does not exist, or holds no zae-limiter version record.
    #[error("rate limiter table {table:?} not found: {reason}")]
    TableNotFound {
        /// The table name.
        table: String,
        /// What was missing.
        reason: String,
    },
    /// The namespace is not registered in the table.
    #[error("namespace not found: {namespace}")]
    NamespaceNotFound {
        /// The namespace name.
        namespace: String,
    },
    /// The table's schema cannot be used by this client.
    #[error("incompatible schema: {message}")]
    IncompatibleSchema {
        /// Why it is incompatible.
        message: String,
    },
}

impl TableError {
    /// The broad kind: a missing table or namespace is infrastructure, a schema a version.
    pub fn category(&self) -> ErrorCategory {
        match self {
            TableError::TableNotFound { .. } | TableError::NamespaceNotFound { .. } => {
                ErrorCategory::Infrastructure
            }
            TableError::IncompatibleSchema { .. } => ErrorCategory::Version,
        }
    }
}

/// Error codes that a retry later may fix.
const TRANSIENT_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "TransactionInProgressException",
    "TransactionConflictException",
    "LimitExceededException",
];

/// Maps an SDK error from `operation` on `table`.
pub(crate) fn map<E, R>(operation: &str, table: &str, error: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match &error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown");
            let message = service.err().message().unwrap_or("").to_string();
            if code == "ResourceNotFoundException" {
                return TableError::TableNotFound {
                    table: table.to_string(),
                    reason: message.to_string(),
                }
                .into();
            }
            let text = format!("DynamoDB {operation} failed: {code}: {message}");
            if TRANSIENT_CODES.contains(&code) {
                Error::unavailable(text, error)
            } else {
                Error::Backend {
                    message: text,
                    source: Some(Box::new(error)),
                }
            }
        }
        SdkError::ConstructionFailure(_) => Error::Backend {
            message: format!("DynamoDB {operation}: the request could not be built"),
            source: Some(Box::new(error)),
        },
        SdkError::TimeoutError(_) => {
            Error::unavailable(format!("DynamoDB {operation} timed out"), error)
        }
        _ => Error::unavailable(
            format!("DynamoDB {operation} failed: {}", describe(&error)),
            error,
        ),
    }
}

/// The innermost cause's text, which names the real problem (connection refused, ...).
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Error codes whose request may have been applied before the failure was reported.
const MAYBE_APPLIED_CODES: &[&str] = &[
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "TransactionInProgressException",
];

/// A conditional write's result: `Ok(true)` written, `Ok(false)` its condition failed
/// (an expected outcome: already done, raced, or gone), any other error mapped.
pub(crate) fn written<T, E, R>(
    result: Result<T, SdkError<E, R>>,
    operation: &str,
    table: &str,
) -> Result<bool, Error>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
        Err(e) => Err(map(operation, table, e)),
    }
}

/// Whether a failed request may nevertheless have been applied: the outcome is unknown
/// (a timeout, a connection lost after sending, a server error). Such a write is never
/// simply sent again (it could apply twice); it is resolved (see `lease_writes`).
pub(super) fn outcome_unknown<E>(error: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::ConstructionFailure(_) => false,
        SdkError::ServiceError(_) => service_failure(error, MAYBE_APPLIED_CODES),
        // A refused connection carried nothing.
        SdkError::DispatchFailure(failure)
            if failure
                .as_connector_error()
                .is_some_and(|c| connection_refused(c)) =>
        {
            false
        }
        // Timeouts, other dispatch failures (the connection may have carried the
        // request), unreadable responses.
        _ => true,
    }
}

/// Whether the cause of `error` is a refused connection (nothing was sent).
fn connection_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Whether a retry later may succeed (the network, a server error, throttling), whatever
/// became of this request.
pub(crate) fn transient<E>(error: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::ConstructionFailure(_) => false,
        SdkError::ServiceError(_) => service_failure(error, TRANSIENT_CODES),
        _ => true,
    }
}

/// For a service error: whether its code is one of `codes`, or DynamoDB answered 5xx.
fn service_failure<E>(error: &SdkError<E, HttpResponse>, codes: &[&str]) -> bool
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::ServiceError(service) => {
            codes.contains(&service.err().code().unwrap_or(""))
                || service.raw().status().is_server_error()
        }
        _ => false,
    }
}

/// Whether a request certainly was not applied and may be sent again as it is
/// (throttling, capacity).
pub(super) fn retry_as_is<E>(error: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    match error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("");
            TRANSIENT_CODES.contains(&code) && !MAYBE_APPLIED_CODES.contains(&code)
        }
        _ => false,
    }
}

/// The image a failed conditional `UpdateItem` returned: `Some(None)` when the condition
/// failed on a missing item, `None` when the error is not a failed condition.
pub(super) fn conditional_image<R>(
    error: &aws_sdk_dynamodb::error::SdkError<UpdateItemError, R>,
) -> Option<Option<Image>> {
    match error.as_service_error()? {
        UpdateItemError::ConditionalCheckFailedException(c) => {
            Some(c.item().filter(|i| !i.is_empty()).map(Image::parse))
        }
        _ => None,
    }
}

pub(super) fn build_error(e: aws_sdk_dynamodb::error::BuildError) -> Error {
    Error::Backend {
        message: format!("could not build a DynamoDB request: {e}"),
        source: Some(Box::new(e)),
    }
}
