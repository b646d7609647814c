//! A client of Vigil's operator endpoints (`/status`, `/metrics`), for the
//! bench and the scenarios: HTTP/1.0, one request per connection, at most
//! 1 MiB and 5 s.

use std::net::SocketAddr;
use std::time::Duration;

/// `GET path` did not give a body.
#[derive(Debug, thiserror::Error)]
#[error("Vigil's operator endpoint http://{addr}{path}: {reason}")]
pub struct OperatorError {
    /// Vigil's operator listener (`http.listen`).
    pub addr: SocketAddr,
    /// The path asked for.
    pub path: String,
    /// What went wrong: no connection, no answer within 5 s, not HTTP.
    pub reason: String,
}

/// The body of `GET path` from Vigil's operator endpoint.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, OperatorError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fail = |reason: String| OperatorError {
        addr,
        path: path.to_string(),
        reason,
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.take(1 << 20).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| fail("no answer within 5 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .and_then(|i| raw.get(i + 4..))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| fail("not an HTTP response".into()))
}

/// Vigil's own count of evictions, `vigil_evicted_total` summed over its
/// priorities; `None` when `/metrics` has no such counter (not Vigil's
/// operator listener).
pub async fn evictions(addr: SocketAddr) -> Result<Option<u64>, OperatorError> {
    let body = get(addr, "/metrics").await?;
    Ok(counter_sum(
        &String::from_utf8_lossy(&body),
        "vigil_evicted_total",
    ))
}

/// The sum of a counter family over its labels in Prometheus text (e.g.
/// `vigil_evicted_total`, one line per priority); `None` when no line has
/// that name.
pub fn counter_sum(metrics: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name{labels} value` or `name value`; not a longer name.
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} ").map(|(_, v)| v),
            None => rest.strip_prefix(' '),
        };
        if let Some(n) = value.and_then(|v| v.trim().parse::<u64>().ok()) {
            found = Some(found.unwrap_or(0u64).saturating_add(n));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_family_is_summed_over_its_labels() {
        let text = "# HELP vigil_evicted Messages evicted.\n\
                    # TYPE vigil_evicted counter\n\
                    vigil_evicted_total{priority=\"0\"} 0\n\
                    vigil_evicted_total{priority=\"3\"} 2597\n\
                    vigil_evicted_total_other 9\n\
                    vigil_refused_total 4\n";
        assert_eq!(counter_sum(text, "vigil_evicted_total"), Some(2597));
        assert_eq!(counter_sum(text, "vigil_refused_total"), Some(4));
        assert_eq!(counter_sum(text, "vigil_missing_total"), None);
    }
}
