//! What every subcommand shares: how it answers (`Output`, `print`: text for a person,
//! `--output json` for a program), how it fails (`Failure`, with the exit code: 1 failed,
//! 2 bad usage), and how it reads a duration argument.

use std::time::Duration;

use clap::ValueEnum;
use rampart_core::parse_duration;
use serde::Serialize;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// A command's failure and its exit code (1 failed, 2 bad usage).
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn usage(error: anyhow::Error) -> Failure {
        Failure { code: 2, error }
    }
    pub fn failed(error: anyhow::Error) -> Failure {
        Failure { code: 1, error }
    }
    /// A failure (exit 1) that says `message`.
    pub fn message(message: impl std::fmt::Display) -> Failure {
        Failure::failed(anyhow::anyhow!("{message}"))
    }
}

impl From<rampart_client::ClientError> for Failure {
    fn from(error: rampart_client::ClientError) -> Failure {
        let code = match &error {
            rampart_client::ClientError::BadEndpoint(_) => 2,
            rampart_client::ClientError::Api { status: 400, .. } => 2,
            _ => 1,
        };
        Failure {
            code,
            error: error.into(),
        }
    }
}

pub fn print<T: Serialize>(output: Output, value: &T, text: impl FnOnce(&T) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).expect("answers encode")),
        Output::Text => println!("{}", text(value)),
    }
}

pub fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}
