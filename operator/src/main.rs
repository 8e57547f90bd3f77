//! `chimera`: the Chimera control plane's single binary.

use std::process::ExitCode;

use chimera_operator::cli::{Cli, run};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("chimera: {error:#}");
            ExitCode::FAILURE
        }
    }
}
