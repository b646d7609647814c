//! `vigil-sim`: simulated bedside devices, a fault-injecting proxy, a verifying
//! cloud and outage scenarios with a loss oracle (issue 5, in progress).
//!
//! Built so far: `vigil-sim pki` and `vigil-sim judge`. Any other command
//! exits non-zero and says it is not built yet, so nothing can mistake it for
//! a working simulator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vigil_sim::ledger::{self, Arrived, Sent};

/// Simulated bedside devices, fault proxy and verifying cloud for Vigil.
#[derive(Debug, Parser)]
#[command(name = "vigil-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes the development PKI (CA; cloud server for localhost/127.0.0.1;
    /// vigil, subscriber and device client certificates) in a directory.
    Pki {
        /// Where to write the PEM files (keys get mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Judges a run from its two ledgers (JSON lines) and prints the
    /// report; exits 1 when anything acknowledged was lost or anything
    /// unexpected arrived.
    Judge {
        /// The devices' ledger.
        #[arg(long)]
        sent: PathBuf,
        /// The verifying cloud's ledger.
        #[arg(long)]
        received: PathBuf,
    },
    /// Not built yet: devices, proxy, cloud, scenario.
    #[command(external_subcommand)]
    Other(Vec<String>),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pki { out } => {
            let pki = vigil_sim::pki::loopback(&out)?;
            println!("development PKI written to {}", pki.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Judge { sent, received } => {
            let sent: Vec<Sent> = ledger::read(&sent)?;
            let received: Vec<Arrived> = ledger::read(&received)?;
            let report = vigil_sim::oracle::judge(&sent, &received);
            println!("{report}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Other(args) => {
            eprintln!(
                "vigil-sim {}: not built yet (devices, proxy, cloud and scenarios arrive with issue 5)",
                args.first().map(String::as_str).unwrap_or_default()
            );
            Ok(ExitCode::from(2))
        }
    }
}
