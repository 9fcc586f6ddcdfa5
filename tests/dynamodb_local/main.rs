//! Every test against DynamoDB Local that shares one server: the repository, the behaviour
//! suite on it, lost responses, and the server helper itself. The server starts once for
//! the binary (on first use), and each test works in a namespace of its own.

#[path = "../dynamo/mod.rs"]
mod dynamo;
#[path = "../suite/mod.rs"]
mod suite;

mod local_server;
mod lost_responses;
mod repository;
mod suite_cases;
