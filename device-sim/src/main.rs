//! `vigil-sim`: simulated bedside devices, a fault-injecting proxy, a verifying
//! cloud and outage scenarios with a loss oracle.
//!
//! Not built yet (issue 5). It exits non-zero so nothing can mistake it for a
//! working simulator.

fn main() -> std::process::ExitCode {
    eprintln!(
        "vigil-sim: not implemented yet (devices, proxy, cloud and scenarios arrive with issue 5)"
    );
    std::process::ExitCode::FAILURE
}
