//! Every test against DynamoDB Local that shares one server: the repository, the behaviour
//! suite on it, lost responses, the table shared with the Python zae-limiter, and the
//! server helper itself. The server starts once for
//! the binary (on first use), and each test works in a namespace of its own.

#[path = "../dynamo/mod.rs"]
mod dynamo;
#[path = "../python/mod.rs"]
mod python;
#[path = "../suite/mod.rs"]
mod suite;

#[cfg(feature = "aggregator")]
mod aggregator;
#[cfg(feature = "aggregator")]
#[path = "../common/lambda_records.rs"]
mod lambda_records;
mod local_server;
mod lost_responses;
#[cfg(feature = "metrics")]
mod metrics_recorded;
#[cfg(feature = "metrics")]
#[path = "../common/metrics_snapshot.rs"]
mod metrics_snapshot;
mod python_interop;
mod repository;
mod reservations;
mod suite_cases;
