//! `vigil inspect` and `vigil dead-letter` on a store with known contents,
//! run as the binary a user runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{ingest, open};

use common::process::KEY_B64;

/// `vigil <command...> <dir> <rest...>`.
fn vigil_with(command: &[&str], dir: &Path, rest: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(command)
        .arg(dir)
        .args(rest)
        .env("VIGIL_STORAGE_KEY", KEY_B64)
        .env("VIGIL_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (messages, bytes) per priority from `vigil inspect`'s table.
fn lanes(text: &str) -> Vec<(u64, u64)> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let [p, messages, bytes, ..] = cols[..]
            && let (Ok(p), Ok(m), Ok(b)) = (p.parse::<usize>(), messages.parse(), bytes.parse())
        {
            assert_eq!(p, rows.len(), "rows in priority order: {text}");
            rows.push((m, b));
        }
    }
    rows
}

fn vigil(command: &[&str], dir: &Path) -> (bool, String, String) {
    vigil_with(command, dir, &[])
}

fn figure(text: &str, name: &str) -> u64 {
    let rest = &text[text
        .find(name)
        .unwrap_or_else(|| panic!("{name} in {text}"))
        + name.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn inspect_and_dead_letter_report_and_change_known_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = open(&dir);
    for _ in 0..5 {
        store.append(ingest("bed-1", 0, 40)).await.unwrap();
    }
    let mut p2 = Vec::new();
    for _ in 0..7 {
        p2.push(store.append(ingest("bed-2", 2, 100)).await.unwrap().seq);
    }
    let mut p3 = Vec::new();
    for _ in 0..3 {
        p3.push(store.append(ingest("bed-3", 3, 10)).await.unwrap().seq);
    }
    store.ack(2, p2[..2].to_vec()).await.unwrap();
    store
        .dead_letter(3, p3[0], "cloud refused: 0x87 not authorized".into())
        .await
        .unwrap()
        .unwrap();
    let expected = store.stats();
    store.close().await.unwrap();
    drop(store);

    let (ok, out, err) = vigil(&["inspect"], &dir);
    assert!(ok, "{out}{err}");
    let rows = lanes(&out);
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [5, 0, 5, 2],
        "{out}"
    );
    for (row, lane) in rows.iter().zip(&expected.lanes) {
        assert_eq!(row.1, lane.bytes, "bytes as the store counts them: {out}");
    }
    assert!(rows[2].1 > rows[0].1, "100-byte payloads take more: {out}");
    assert_eq!(figure(&out, "dead-letter"), 1, "{out}");
    assert_eq!(figure(&out, "quarantine"), 0, "{out}");

    // --events prints every queued event as a JSON line.
    let (ok, out, _) = vigil_with(&["inspect"], &dir, &["--events"]);
    assert!(ok);
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 12, "{out}");
    assert_eq!(events.iter().filter(|e| e["device"] == "bed-2").count(), 5);

    // The dead letter is listed with its reason and never its payload.
    let (ok, out, err) = vigil(&["dead-letter", "list"], &dir);
    assert!(ok, "{err}");
    assert!(
        out.contains("0x87 not authorized") && out.contains("bed-3"),
        "{out}"
    );
    assert!(out.contains("1 dead letters"), "{out}");
    let number = out
        .lines()
        .find(|l| l.contains("bed-3"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();

    // Requeue puts it back in its lane.
    let (ok, out, err) = vigil_with(&["dead-letter", "requeue"], &dir, &[&number]);
    assert!(ok, "{out}{err}");
    let (_, out, _) = vigil(&["inspect"], &dir);
    assert_eq!(lanes(&out)[3].0, 3, "{out}");
    assert_eq!(figure(&out, "dead-letter"), 0, "{out}");

    // An unknown number is an error naming it.
    let (ok, _, err) = vigil_with(&["dead-letter", "purge"], &dir, &["999999"]);
    assert!(!ok);
    assert!(err.contains("999999") && err.contains("list"), "{err}");

    // Purge deletes dead letters for good.
    let store = open(&dir);
    let head = store.read(3, None, 1).await.unwrap()[0].seq;
    store.dead_letter(3, head, "oversize".into()).await.unwrap();
    store.close().await.unwrap();
    drop(store);
    let (ok, out, err) = vigil_with(&["dead-letter", "purge"], &dir, &["--all"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("purged"), "{out}");
    let (_, out, _) = vigil(&["inspect"], &dir);
    assert_eq!(figure(&out, "dead-letter"), 0, "{out}");
    assert_eq!(lanes(&out)[3].0, 2, "{out}");
}

#[test]
fn inspect_refuses_a_directory_that_is_not_a_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = vigil(&["inspect"], tmp.path());
    assert!(!ok);
    assert!(err.contains("not a Vigil data directory"), "{err}");
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "nothing was created"
    );
}

/// The offline commands refuse a store a running Vigil holds (fjall's lock),
/// instead of reading or changing it underneath.
#[tokio::test(flavor = "multi_thread")]
async fn offline_commands_refuse_a_store_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = open(&dir);
    store.append(ingest("bed-1", 1, 10)).await.unwrap();
    for command in [&["inspect"][..], &["dead-letter", "list"][..]] {
        let (ok, _, err) = vigil(command, &dir);
        assert!(!ok, "{command:?} on a store in use");
        assert!(err.contains("in use"), "{command:?}: {err}");
    }
    store.close().await.unwrap();
}
