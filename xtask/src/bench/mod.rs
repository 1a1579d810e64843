//! `cargo xtask bench <area>`: one module per area, each printing its figures (and ratios
//! against the reference tool run side by side, where one exists) as Markdown table rows
//! ready for docs/benchmarks.md.

mod cp;
mod deps;
mod enroll;
mod image;
mod join;
mod pxe;
mod store;
mod tunnel;

use crate::error::Error;

/// The benchmark areas, for `--help` and error messages.
pub const AREAS: &[&str] = &[
    "cp", "deps", "enroll", "image", "join", "pxe", "store", "tunnel",
];

/// Runs the benchmark `area`.
pub fn run(area: &str, cold: bool) -> Result<(), Error> {
    match area {
        "cp" => cp::run(),
        "deps" => deps::run(cold),
        "enroll" => enroll::run(),
        "image" => image::run(cold),
        "join" => join::run(),
        "tunnel" => tunnel::run(),
        "pxe" => pxe::run(),
        "store" => store::run(),
        other => Err(Error::Usage(format!(
            "unknown bench area {other:?}; available: {}",
            AREAS.join(", ")
        ))),
    }
}
