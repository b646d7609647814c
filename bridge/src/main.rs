//! The `vigil` binary: everything lives in [`vigil::cli`].

/// jemalloc rather than glibc's malloc, on Linux x86-64. A record's memory is
/// allocated on one thread (the gate's, the store writer's) and freed on
/// another (the writer's, fjall's flush worker's), the case glibc's per-thread
/// caches do not serve. Measured in session 26 (`device-sim/BENCHMARKS.md`):
/// in three interleaved `vigil-sim bench` pairs Vigil spent 4.5–4.6 µs of CPU
/// per message in the durable fill against 5.0–6.1, end to end was 11–17 %
/// faster and the drain 14–25 %, for about 6 MiB more RSS (43 MiB with
/// 1,000,000 queued, 41 MiB with 10,000,000). Not on other targets: jemalloc
/// fixes the page size when it is built, and a gateway's ARM kernel with
/// 16 KiB or 64 KiB pages would stop a build made for 4 KiB pages at start.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    vigil::cli::main()
}
