//! `vigil-sim bench` at a tiny scale against the debug `vigil` binary: every
//! row of the table has a figure, and nothing was lost on the way. No timing
//! is asserted. vigil-sim does not depend on vigil, so the binary is looked
//! up in the workspace's target directory; without it the test says so and
//! passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use vigil_sim::bench::{BenchOptions, Report, Rows, run};

fn debug_vigil() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("debug/vigil")
}

/// Runs the bench at a tiny scale against the debug binary and prints its
/// report; `None` (after a SKIP line) when the binary is not built.
fn tiny_bench(
    rows: Rows,
    inflight: u16,
    local_filters: usize,
    topics_per_device: u16,
) -> Option<(Report, String)> {
    let vigil = debug_vigil();
    if !vigil.is_file() {
        eprintln!(
            "SKIP: no {} (cargo build -p vigil first); the bench test needs the real binary",
            vigil.display()
        );
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = BenchOptions {
        scale: 0.002,
        out: Some(dir.path().to_path_buf()),
        vigil,
        ten_million: false,
        mosquitto: false,
        rows,
        inflight,
        local_filters,
        topics_per_device,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime.block_on(run(&opts)).unwrap();
    let text = report.to_string();
    println!("{text}");
    // Every Vigil the bench started was configured with the devices' window.
    let configs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("vigil-") && name.ends_with(".toml")
        })
        .collect();
    assert!(!configs.is_empty(), "no Vigil configuration in {dir:?}");
    for config in &configs {
        let written = std::fs::read_to_string(config).unwrap();
        assert!(
            written.contains(&format!("\nmax_inflight = {inflight}\n")),
            "{} lacks max_inflight = {inflight}:\n{written}",
            config.display()
        );
    }
    Some((report, text))
}

#[test]
fn a_tiny_bench_fills_every_row_and_loses_nothing() {
    let Some((report, text)) = tiny_bench(Rows::All, vigil_sim::bench::INFLIGHT, 0, 1) else {
        return;
    };

    for row in 1..=7u8 {
        let lines: Vec<_> = report.lines.iter().filter(|l| l.row == row).collect();
        assert!(
            lines
                .iter()
                .any(|l| l.measured && l.vigil.chars().any(|c| c.is_ascii_digit())),
            "row {row} has no figure: {lines:?}"
        );
        for l in lines {
            assert!(
                l.measured || l.vigil == "not run (--ten-million)",
                "row {row}: {}",
                l.vigil
            );
            assert!(
                text.lines()
                    .any(|t| t.starts_with(&format!("{row}  ")) && t.contains(&l.vigil)),
                "row {row} is not printed as a table line:\n{text}"
            );
        }
    }
    // Warm-up, three latency loads (1,000/s before and after row 1, 80 %),
    // row 1, the fill (as stored) and the drain.
    assert_eq!(report.deliveries.len(), 7, "{:?}", report.deliveries);
    for d in &report.deliveries {
        assert!(
            d.unique >= d.want && d.ok(),
            "{}: {} of {} counted ({d:?})",
            d.phase,
            d.unique,
            d.want
        );
    }
    assert!(report.complete());
}

#[test]
fn an_ingest_only_bench_measures_row_2_and_says_what_it_skipped() {
    let Some((report, text)) = tiny_bench(Rows::Ingest, 8, 0, 1) else {
        return;
    };

    let row2: Vec<_> = report.lines.iter().filter(|l| l.row == 2).collect();
    assert_eq!(row2.len(), 3, "fill, bare rumqttd, ratio: {row2:?}");
    for l in &row2 {
        assert!(l.measured, "row 2 not measured: {l:?}");
        assert!(l.vigil.chars().any(|c| c.is_ascii_digit()), "{l:?}");
    }
    // Row 5's empty-store RSS is taken on the way; everything that needs the
    // online phase or the drain says it was not run, and why.
    for l in report.lines.iter().filter(|l| l.row != 2) {
        assert!(
            l.measured
                || l.vigil == "not run (--ingest-only)"
                || l.vigil == "not run (--ten-million)",
            "row {}: {}",
            l.row,
            l.vigil
        );
    }
    for row in [1u8, 3, 4, 7] {
        assert!(
            report
                .lines
                .iter()
                .filter(|l| l.row == row)
                .all(|l| l.vigil == "not run (--ingest-only)"),
            "row {row} ran:\n{text}"
        );
    }
    assert!(
        text.contains("row 2: CPU during the fill"),
        "the fill's CPU note is missing:\n{text}"
    );
    // `--inflight 8`: the devices keep 8 in flight (and `tiny_bench` checked
    // that Vigil was configured with `gate.max_inflight = 8`).
    assert!(
        text.contains("up to 8 in flight each"),
        "the header does not say the window:\n{text}"
    );
    // Only the fill was loaded, and Vigil stored all of it.
    assert_eq!(report.deliveries.len(), 1, "{:?}", report.deliveries);
    assert!(report.deliveries[0].ok(), "{:?}", report.deliveries[0]);
    assert!(report.complete());
}

#[test]
fn a_latency_only_bench_measures_row_4_at_1000_and_says_what_it_skipped() {
    let Some((report, text)) = tiny_bench(Rows::Latency, vigil_sim::bench::INFLIGHT, 0, 1) else {
        return;
    };

    let row4: Vec<_> = report.lines.iter().filter(|l| l.row == 4).collect();
    assert_eq!(row4.len(), 3, "1,000/s, after row 1, 80 %: {row4:?}");
    assert!(
        row4[0].measured,
        "row 4 at 1,000/s not measured: {:?}",
        row4[0]
    );
    assert!(row4[0].vigil.contains("p99"), "{:?}", row4[0]);
    for l in report.lines.iter().filter(|l| !std::ptr::eq(*l, row4[0])) {
        assert!(
            l.vigil == "not run (--latency-only)" || l.vigil == "not run (--ten-million)",
            "row {} ran:\n{text}",
            l.row
        );
    }
    assert!(
        text.contains("the disk's own floor") && text.contains("row 4 at 1,000/s:"),
        "row 4's notes are missing:\n{text}"
    );
    // The warm-up and the paced load, each counted whole at the cloud.
    assert_eq!(report.deliveries.len(), 2, "{:?}", report.deliveries);
    for d in &report.deliveries {
        assert!(d.unique >= d.want && d.ok(), "{d:?}");
    }
    assert!(report.complete());
}

/// `--local-filters`: a local subscriber holds 250 filters (three
/// SUBSCRIBEs) on the gate through the fill, none matching a device's
/// topic; every publish of the fill is checked and kept from the embedded
/// broker, and all of them are stored.
#[test]
fn a_local_subscriber_holds_its_filters_through_the_fill() {
    let Some((report, text)) = tiny_bench(Rows::Ingest, 8, 250, 1) else {
        return;
    };
    assert!(report.complete(), "{text}");
    assert!(
        text.contains("a local subscriber (bench-display) holds 250 filters"),
        "{text}"
    );
    let note = report
        .notes
        .iter()
        .find(|n| n.contains("held 250 distinct filters"))
        .unwrap_or_else(|| panic!("no local subscriber's note:\n{text}"));
    // "... kept X of the fill's Y from the embedded broker ..."
    let figures: Vec<u64> = note
        .split_once(" kept ")
        .and_then(|(_, rest)| rest.split_once(" from the embedded broker"))
        .map(|(counts, _)| {
            counts
                .split(" of the fill's ")
                .map(|n| n.replace(',', "").parse().unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(figures.len(), 2, "{note}");
    assert!(figures[1] > 0, "{note}");
    assert_eq!(figures[0], figures[1], "{note}");
    assert_fill_stored(&report);
}

/// Devices publishing to more topics than the gate's per-connection topic
/// memo holds (32) miss it on every publish: the slow path, checked in full
/// each time, stores everything.
#[test]
fn devices_on_more_topics_than_the_memo_holds_lose_nothing() {
    let Some((report, text)) = tiny_bench(Rows::Ingest, 8, 0, 40) else {
        return;
    };
    assert!(report.complete(), "{text}");
    assert!(
        text.contains("published to 40 topics in turn"),
        "the report does not say the topics:\n{text}"
    );
    assert_fill_stored(&report);
}

/// Vigil's `/status` counted every message of the fill as stored.
fn assert_fill_stored(report: &Report) {
    let stored = report
        .deliveries
        .iter()
        .find(|d| d.phase.starts_with("row 2: fill"))
        .unwrap();
    assert!(stored.ok() && stored.unique == stored.want, "{stored:?}");
}
