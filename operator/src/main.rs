//! `chimera`: the Chimera control plane's single binary.

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // One TLS provider for every client in the binary (kube, lapin, reqwest): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli::run(cli::Cli::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("chimera: {error:#}");
            ExitCode::FAILURE
        }
    }
}
