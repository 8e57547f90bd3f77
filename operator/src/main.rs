//! `chimera`: the Chimera control plane's single binary.

use std::process::ExitCode;

use chimera_operator::cli::{Cli, run};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // One TLS provider for every client in the binary (kube, lapin, reqwest): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("chimera: {error:#}");
            ExitCode::FAILURE
        }
    }
}
