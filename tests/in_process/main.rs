//! Every test that runs in this process with no server: the bucket arithmetic, the
//! reference vectors, the behaviour suite on the in-memory backend, the layer, the
//! blocking API, concurrency and outages. One binary, linked once.

#[path = "../common/mod.rs"]
mod common;
#[path = "../suite/mod.rs"]
mod suite;

#[cfg(feature = "blocking")]
mod blocking;
mod bucket_properties;
mod capacity;
mod concurrency;
mod conformance;
mod lease_histories;
mod memory_backend;
#[cfg(feature = "metrics")]
mod metrics_recorded;
#[cfg(feature = "metrics")]
#[path = "../common/metrics_snapshot.rs"]
mod metrics_snapshot;
mod middleware;
mod reservations;
mod tracing_events;
mod unavailable;
