//! An LLM gateway: requests *and* tokens per minute per API key, with the key's project
//! charged too (cascade).
//!
//! ```text
//! cargo run --example llm_gateway
//! curl -s localhost:3001/v1/chat/completions -H 'authorization: Bearer sk-acme-1' \
//!      -H 'content-type: application/json' \
//!      -d '{"messages":[{"role":"user","content":"Tell me a story"}],"max_tokens":200}'
//! curl -sN localhost:3001/v1/chat/stream -H 'authorization: Bearer sk-acme-1' \
//!      -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":50}'
//! ```
//!
//! How it fits together:
//! - a small middleware reads the JSON body (bounded) and estimates the tokens the call can
//!   use (prompt plus `max_tokens`), putting a [`TokenEstimate`] in the request extensions;
//! - the [`RateLimitLayer`] consumes 1 `rpm` and the estimate of `tpm` before the handler
//!   runs, from the key and from its project;
//! - `/v1/chat/completions` reports the true count with [`Usage`], and the layer adjusts the
//!   lease by actual minus estimate;
//! - `/v1/chat/stream` adjusts through the [`LeaseHandle`] as tokens stream, and the lease
//!   settles when the stream ends (or rolls back if the client hangs up).
//!
//! Limits live in the limiter's store, as operators would set them: 20 requests and 2,000
//! tokens a minute per key (resource level), 5,000 tokens a minute per project.
//! Serves on `$ADDR` (default `127.0.0.1:3001`). In memory by default; with
//! `ZAE_DYNAMODB_ENDPOINT=http://...` (or `--dynamodb`, which starts DynamoDB Local) the
//! limits and buckets live in DynamoDB, shared by every gateway pointed at it.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use zae_limiter::middleware::{extract, RateLimitLayer, Usage};
use zae_limiter::{LeaseHandle, Limit, RateLimiter};

#[path = "support/mod.rs"]
mod support;

/// The most request body the estimator reads.
const MAX_BODY: usize = 1 << 20;

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(default = "default_max_tokens")]
    max_tokens: u64,
}

#[derive(Deserialize)]
struct Message {
    content: String,
}

fn default_max_tokens() -> u64 {
    256
}

/// Tokens the request may use at most: its prompt plus `max_tokens`.
#[derive(Clone, Copy, Debug)]
struct TokenEstimate(u64);

/// A stand-in tokenizer: about four characters a token.
fn count_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

fn prompt_tokens(req: &ChatRequest) -> u64 {
    req.messages.iter().map(|m| count_tokens(&m.content)).sum()
}

/// Reads the JSON body once, estimates its tokens, and passes the request on intact.
async fn estimate_tokens(request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    };
    let chat: ChatRequest = match serde_json::from_slice(&bytes) {
        Ok(chat) => chat,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("invalid chat request: {e}\n"),
            )
                .into_response()
        }
    };
    parts
        .extensions
        .insert(TokenEstimate(prompt_tokens(&chat) + chat.max_tokens));
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The "model": answers with a number of tokens that depends on the prompt.
fn completion_for(chat: &ChatRequest) -> Vec<String> {
    let n = (prompt_tokens(chat) * 3).clamp(5, chat.max_tokens.max(1));
    (0..n).map(|i| format!("tok{i} ")).collect()
}

async fn complete(Json(chat): Json<ChatRequest>) -> impl IntoResponse {
    let completion = completion_for(&chat);
    let total = prompt_tokens(&chat) + completion.len() as u64;
    (
        Usage::new().with("tpm", total),
        Json(serde_json::json!({
            "choices": [{"message": {"role": "assistant", "content": completion.concat()}}],
            "usage": {"prompt_tokens": prompt_tokens(&chat), "completion_tokens": completion.len(), "total_tokens": total},
        })),
    )
}

async fn stream(lease: LeaseHandle, Json(chat): Json<ChatRequest>) -> impl IntoResponse {
    // The lease holds the estimate (prompt + max_tokens); return what the stream does not
    // use as it finishes.
    let estimate = lease.consumed().get("tpm").copied().unwrap_or(0);
    let prompt = prompt_tokens(&chat) as i64;
    let tokens = completion_for(&chat);
    let streamed = tokens.len() as i64;
    let chunks =
        futures_util::stream::iter(tokens.into_iter().enumerate()).then(move |(i, tok)| {
            let lease = lease.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if i as i64 == streamed - 1 {
                    // Last token: the true total is prompt + streamed.
                    let _ = lease.adjust([("tpm", prompt + streamed - estimate)]);
                }
                Ok::<_, Infallible>(format!("data: {tok}\n\n"))
            }
        });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(chunks),
    )
}

/// The gateway's router over a limiter whose store holds the limits.
fn app(limiter: RateLimiter) -> Router {
    let rate_limit = RateLimitLayer::new(limiter)
        .entity(extract::bearer())
        .resource(extract::fixed("chat"))
        .unit("tpm", "tokens")
        .consume(|head: &Parts| {
            let estimate = head.extensions.get::<TokenEstimate>().map_or(0, |e| e.0);
            [("rpm", 1), ("tpm", estimate)]
        });
    Router::new()
        .route("/v1/chat/completions", post(complete))
        .route("/v1/chat/stream", post(stream))
        // Layers run bottom-up: estimate first, then limit.
        .layer(rate_limit)
        .layer(middleware::from_fn(estimate_tokens))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    support::init_tracing();

    let backend = support::from_env().await?;
    tracing::info!("rate limits held by the {}", backend.description);
    let limiter = backend.limiter();
    // What an operator would store (with the CLI, against DynamoDB, in production).
    limiter
        .set_resource_limits(
            "chat",
            &[
                Limit::per_minute("rpm", 20),
                Limit::per_minute("tpm", 2_000),
            ],
        )
        .await?;
    support::created_or_exists(limiter.create_entity("acme").name("Acme Corp").await)?;
    limiter
        .set_entity_limits(
            "acme",
            "chat",
            &[
                Limit::per_minute("rpm", 100),
                Limit::per_minute("tpm", 5_000),
            ],
        )
        .await?;
    // Keys are secrets: each is known by its digest (what `extract::bearer()` yields), so
    // no key reaches the table, a response or a log.
    for (n, key) in ["sk-acme-1", "sk-acme-2"].into_iter().enumerate() {
        support::created_or_exists(
            limiter
                .create_entity(extract::secret_id(key))
                .name(format!("Acme key {}", n + 1))
                .parent("acme")
                .cascade(true)
                .await,
        )?;
    }

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3001".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(limiter)).await?;
    Ok(())
}
