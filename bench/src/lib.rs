//! rbench: an elbencho-class storage benchmark. The binary is a thin shell
//! over these modules: configuration, per-thread work, I/O engines,
//! statistics and printers.

pub mod chart;
pub mod clock;
pub mod config;
pub mod dist;
pub mod engine;
pub mod error;
pub mod fill;
pub mod k8s;
pub mod live;
pub mod paths;
pub mod report;
pub mod run;
pub mod stats;
pub mod units;
pub mod work;
