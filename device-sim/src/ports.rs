//! Loopback ports for the processes a test or a benchmark starts, chosen
//! where nothing else will take them before those processes bind.
//!
//! The usual "bind port 0, read the port, release it" hands out a port from
//! the kernel's ephemeral range, and gives it back to that range: until the
//! child binds it, any other `bind(0)` (Vigil's embedded broker picks its
//! loopback ports that way) or any outgoing connection may get the same port.
//! CI once saw exactly that (Vigil's broker took the operator port a test had
//! just picked). These ports come from below the ephemeral range instead,
//! which the kernel never hands out on its own, and each is handed out once
//! per process (a shared counter walks the range from an offset set by the
//! process id, so two processes start far apart).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out (below it live many well-known services).
const FLOOR: u32 = 10_000;

/// With fewer candidate ports than this below the ephemeral range, a port
/// the kernel picks (`bind(0)`) is used instead.
const MIN_SPAN: u32 = 1_000;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A loopback port that is free now and that the kernel will not hand to
/// anyone else on its own: below the ephemeral range of
/// `/proc/sys/net/ipv4/ip_local_port_range` (or one the kernel picks, if
/// that range leaves too little room below it).
pub fn free_loopback_port() -> std::io::Result<u16> {
    let low = ephemeral_low().unwrap_or(32_768).min(u32::from(u16::MAX));
    let span = low.saturating_sub(FLOOR);
    if span < MIN_SPAN {
        return TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()
            .map(|a| a.port());
    }
    let offset = std::process::id().wrapping_mul(7_919) % span;
    first_free(span, offset, &NEXT).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("every loopback port from {FLOOR} to {low} is in use"),
        )
    })
}

/// The first bindable port of `FLOOR..FLOOR + span`, walking from `offset`
/// by the shared `steps` counter.
fn first_free(span: u32, offset: u32, steps: &AtomicU32) -> Option<u16> {
    (0..span).find_map(|_| {
        let step = steps.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FLOOR + (offset + step % span) % span).ok()?;
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .is_ok()
            .then_some(port)
    })
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_below_the_ephemeral_range_and_bindable() {
        let low = ephemeral_low().unwrap_or(32_768);
        let ports: Vec<u16> = (0..50).map(|_| free_loopback_port().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for p in &ports {
            if low - FLOOR >= MIN_SPAN {
                assert!(
                    u32::from(*p) >= FLOOR && u32::from(*p) < low,
                    "{p} outside {FLOOR}..{low}"
                );
            }
            TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).unwrap();
        }
    }

    #[test]
    fn a_port_taken_by_another_socket_is_skipped() {
        let span = 2_000;
        // Hold the port a walk from `offset` would try first.
        let (offset, held) = (std::process::id() % 1_000..span)
            .find_map(|o| {
                let port = u16::try_from(FLOOR + o).ok()?;
                TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                    .ok()
                    .map(|l| (o, l))
            })
            .unwrap();
        let held_port = held.local_addr().unwrap().port();
        let steps = AtomicU32::new(0);
        let got = first_free(span, offset, &steps).unwrap();
        assert_ne!(got, held_port, "the held port was handed out");
        assert!(
            steps.load(Ordering::Relaxed) >= 2,
            "the walk did not step past it"
        );
        TcpListener::bind((Ipv4Addr::LOCALHOST, got)).unwrap();
    }
}
