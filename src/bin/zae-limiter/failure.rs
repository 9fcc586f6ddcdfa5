//! Failures and exit codes: every error says what was wrong and what to do about it.

use zae_limiter::repository::dynamodb::TableError;
use zae_limiter::{Error, Field};

/// Exit code: something failed.
pub const ERROR: u8 = 1;
/// Exit code: the arguments (or a file they name) are invalid.
pub const BAD_ARGUMENTS: u8 = 2;
/// Exit code: AWS or DynamoDB failed or refused.
pub const AWS: u8 = 3;
/// Exit code: the table or namespace does not exist.
pub const NOT_FOUND: u8 = 4;

/// A failed command: the message, a hint on what to do, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn bad_arguments(message: impl Into<String>) -> Self {
        Failure::new(BAD_ARGUMENTS, message)
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Prints the failure to stderr.
    pub fn report(&self) {
        eprintln!("error: {}", self.message);
        if let Some(hint) = &self.hint {
            eprintln!("hint: {hint}");
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        let (code, hint) = match &error {
            Error::Table(TableError::TableNotFound { .. }) => (
                NOT_FOUND,
                "create it with `zae-limiter deploy`, or check --table, --region and --endpoint-url".to_string(),
            ),
            Error::Table(TableError::NamespaceNotFound { namespace }) => (
                NOT_FOUND,
                format!("register it with `zae-limiter namespace register {namespace}`, or pick another with -N; `zae-limiter namespace list` shows them"),
            ),
            Error::Unavailable { .. } => (
                AWS,
                "check the endpoint, region and credentials; for DynamoDB Local, `zae-limiter local status` shows whether it runs".to_string(),
            ),
            Error::Backend { .. } => (
                AWS,
                "DynamoDB refused the request: check the credentials' permissions on the table (and deletion protection, for delete)".to_string(),
            ),
            Error::InvalidIdentifier { .. } => (
                BAD_ARGUMENTS,
                "ids are 1 to 256 characters: a letter or digit, then letters, digits and _ . - : @".to_string(),
            ),
            Error::InvalidName { field, .. } => (
                BAD_ARGUMENTS,
                match field {
                    Field::Table => "DynamoDB table names are 3 to 255 letters, digits and _ . -",
                    Field::Resource => "resources are 1 to 64 characters: a letter, then letters, digits and _ . - /",
                    Field::Namespace => "namespaces are 1 to 64 characters: a letter, then letters, digits and _ . -",
                    _ => "names are 1 to 64 characters: a letter, then letters, digits and _ . -",
                }
                .to_string(),
            ),
            Error::Validation { .. } => (BAD_ARGUMENTS, "see the command's --help".to_string()),
            Error::EntityNotFound { .. } => (
                ERROR,
                "`zae-limiter entity create` creates it".to_string(),
            ),
            Error::EntityExists { .. } => (
                ERROR,
                "pick another id, or `zae-limiter entity show` the existing one".to_string(),
            ),
            Error::Table(TableError::IncompatibleSchema { .. }) => (
                ERROR,
                "use a zae-limiter release that reads this schema, or deploy a new table".to_string(),
            ),
            _ => (ERROR, "run with RUST_LOG=debug for details".to_string()),
        };
        Failure {
            code,
            message,
            hint: Some(hint),
        }
    }
}

impl From<zae_limiter::local::LocalError> for Failure {
    fn from(error: zae_limiter::local::LocalError) -> Self {
        Failure::new(ERROR, error.to_string())
    }
}

/// The result of a command.
pub type Outcome = Result<(), Failure>;
