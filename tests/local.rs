//! `zae_limiter::local`: the errors a machine without Java or npm gets, and a real start.

use zae_limiter::local::{DynamoDbLocal, LocalError};

#[tokio::test]
async fn missing_java_is_a_clear_error() {
    let err = DynamoDbLocal::builder()
        .java("/nonexistent/zae-java")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, LocalError::JavaNotFound), "{err:?}");
    assert!(err.to_string().contains("Java 17"), "{err}");
}

#[tokio::test]
async fn missing_npm_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("zae-no-npm-{}", std::process::id()));
    let err = DynamoDbLocal::builder()
        .install_dir(&dir)
        .npm("/nonexistent/zae-npm")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, LocalError::NpmNotFound), "{err:?}");
    assert!(err.to_string().contains("npm"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn starts_answers_and_stops() {
    let mut local = DynamoDbLocal::start().await.unwrap();
    let url = local.endpoint_url().to_string();
    assert!(url.starts_with("http://127.0.0.1:"));
    let addr = format!("127.0.0.1:{}", local.port());
    assert!(tokio::net::TcpStream::connect(&addr).await.is_ok());
    local.stop();
    let mut closed = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(closed, "the server is gone once stopped");
}
