//! `cargo xtask bench deps`: warm and cold times of the upstream binary cache.

use std::time::Instant;

use tether_upstream::{Builder, Cache, Pins};

use crate::error::Error;
use crate::steps::fmt_duration;

/// Warm: every pinned binary found and its sha256 verified. Cold (`--cold`): every binary
/// built from scratch into a temporary binary cache with an empty Go build cache (the Go
/// module download cache is kept: network speed is not ours to measure).
pub fn run(cold: bool) -> Result<(), Error> {
    let pins = Pins::default();
    println!("| case | component | version | time |");
    println!("|---|---|---|---|");
    let warm_builder = Builder::new(Cache::from_env());
    let start = Instant::now();
    for (c, v) in pins.defaults()? {
        let r = warm_builder.ensure(c, &v)?;
        println!(
            "| warm | {} | {v} | {} |",
            c.name(),
            fmt_duration(r.elapsed)
        );
    }
    println!("| warm | total | | {} |", fmt_duration(start.elapsed()));
    if cold {
        let tmp = std::env::temp_dir().join(format!("tether-bench-deps-{}", std::process::id()));
        let gocache = tmp.join("gocache");
        // SAFETY: single-threaded at this point; the Go child processes inherit it.
        unsafe { std::env::set_var("GOCACHE", &gocache) };
        let cold_builder = Builder::new(Cache::at(tmp.join("cache")));
        let start = Instant::now();
        for (c, v) in pins.defaults()? {
            let r = cold_builder.ensure(c, &v)?;
            println!(
                "| cold | {} | {v} | {} |",
                c.name(),
                fmt_duration(r.elapsed)
            );
        }
        println!("| cold | total | | {} |", fmt_duration(start.elapsed()));
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}
